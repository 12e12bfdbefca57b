#pragma once

// The config's key table: each dotted key (dataset.path, shuffle.mode, cache.dir, ...) and the
// setter that parses its value into LoaderOptions. Internal to src/config.

#include <sluice/options.h>

#include "config/parse.h"

#include <yaml-cpp/yaml.h>

#include <functional>
#include <string>
#include <string_view>

namespace sluice::config {

using Setter = std::function<void(LoaderOptions&, const YAML::Node&, const Context&)>;

// The setter of `key`, or nullptr when no key is called that.
const Setter* find_setter(std::string_view key);

// Whether `key` names a section: some key starts with "KEY.".
bool is_section(std::string_view key);

// For an override of a whole section with a scalar (Python's shuffle="none"): "expected a
// mapping of mode, block_size, buffer_size (e.g. shuffle: {mode: ...}), got "none"".
std::string section_expected(const std::string& section, const YAML::Node& got);

// Applies each key of `map` (under `prefix`, "" at the top) through its setter, descending into
// sections; unknown, duplicate and misplaced keys are config errors.
void apply_map(LoaderOptions& o, const YAML::Node& map, const std::string& prefix,
               const Context& ctx);

}  // namespace sluice::config
