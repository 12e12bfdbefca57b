#pragma once

// The config's values, read from YAML nodes and checked: scalars, sizes, enums by their
// spellings, peers, devices and the `transforms:` steps. Each error is a kConfig Error that
// names the source, the line and the key ("train.yaml:7: shuffle.mode: ..."). Internal to
// src/config: keys.cc sets options with these, config.cc prints options back with the tables.

#include <sluice/options.h>

#include <fmt/format.h>

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sluice::config {

// Where a value came from, for errors: "train.yaml:7: shuffle.mode: ...".
struct Context {
  const std::string& source;
  const std::filesystem::path& base_dir;
  bool lines = true;  // false for one-value overrides: their line is always 1
};

// Throws Error(kConfig) "SOURCE:LINE: KEY: WHAT" (no line when the node has no mark).
[[noreturn]] void config_error(const Context& ctx, const YAML::Node& node, std::string_view key,
                               const std::string& what);

// How a node looks in an error: "\"text\"", "nothing", "a mapping" or "a list".
std::string shown(const YAML::Node& node);

// The node's text; a config error "expected EXPECTED, got ..." when it is not a scalar.
std::string scalar(const Context& ctx, const YAML::Node& node, std::string_view key,
                   std::string_view expected);

// A whole decimal number in [min, max].
uint64_t parse_uint(const Context& ctx, const YAML::Node& node, std::string_view key,
                    uint64_t min = 0, uint64_t max = UINT64_MAX);

bool parse_bool(const Context& ctx, const YAML::Node& node, std::string_view key);

// A byte count: an integer, or with a K, M, G or T suffix (powers of 1024; "200G", "4.5T").
uint64_t parse_bytes(const Context& ctx, const YAML::Node& node, std::string_view key);

// Each enum's config spellings, in one table that both parsing and printing use.
template <typename E>
using Names = std::span<const std::pair<std::string_view, E>>;
inline constexpr std::pair<std::string_view, DatasetFormat> kFormatNames[] = {
    {"auto", DatasetFormat::kAuto},   {"shards", DatasetFormat::kShards},
    {"tar", DatasetFormat::kTar},     {"tokens", DatasetFormat::kTokens},
    {"files", DatasetFormat::kFiles}, {"npy", DatasetFormat::kNpy}};
inline constexpr std::pair<std::string_view, ShuffleMode> kShuffleNames[] = {
    {"global", ShuffleMode::kGlobal},
    {"block", ShuffleMode::kBlock},
    {"shard", ShuffleMode::kShard},
    {"none", ShuffleMode::kNone}};
inline constexpr std::pair<std::string_view, IoEngineKind> kEngineNames[] = {
    {"auto", IoEngineKind::kAuto},
    {"uring", IoEngineKind::kUring},
    {"threads", IoEngineKind::kThreads}};
inline constexpr std::pair<std::string_view, CachePolicy> kPolicyNames[] = {
    {"clairvoyant", CachePolicy::kClairvoyant}, {"lru", CachePolicy::kLru}};
inline constexpr std::pair<std::string_view, TransformErrors> kTransformErrorNames[] = {
    {"fail", TransformErrors::kFail}, {"skip", TransformErrors::kSkip}};
inline constexpr std::pair<std::string_view, TransformStep::Kind> kStepNames[] = {
    {"decode", TransformStep::Kind::kDecode},
    {"resize", TransformStep::Kind::kResize},
    {"center_crop", TransformStep::Kind::kCenterCrop},
    {"random_resized_crop", TransformStep::Kind::kRandomResizedCrop},
    {"flip", TransformStep::Kind::kFlip},
    {"normalize", TransformStep::Kind::kNormalize},
    {"layout", TransformStep::Kind::kLayout}};
inline constexpr std::pair<std::string_view, uint32_t> kTokenDtypeNames[] = {{"uint16", 2u},
                                                                             {"uint32", 4u}};

template <typename E>
std::string_view name_of(Names<E> names, E value) {
  for (const auto& [name, v] : names)
    if (v == value) return name;
  return "?";
}

template <typename E>
E parse_enum(const Context& ctx, const YAML::Node& node, std::string_view key, Names<E> values) {
  std::string names;
  for (const auto& [name, _] : values) names += (names.empty() ? "" : ", ") + std::string(name);
  std::string s = scalar(ctx, node, key, "one of " + names);
  for (const auto& [name, value] : values)
    if (s == name) return value;
  config_error(ctx, node, key, fmt::format("unknown value \"{}\" (expected {})", s, names));
}

// `env` (nullopt: the environment decides) or an integer in [min, UINT32_MAX].
std::optional<uint32_t> parse_rank(const Context& ctx, const YAML::Node& node, std::string_view key,
                                   uint64_t min);

// cpu, pinned, cuda or cuda:N.
DeviceOptions parse_device(const Context& ctx, const YAML::Node& node, std::string_view key);

// distributed.peers: a list of {address: HOST:PORT, shards: [0, 1, "4-7", ...]}.
std::vector<PeerOptions> parse_peers(const Context& ctx, const YAML::Node& node);

// One of two words: false for `a`, true for `b`.
bool second_of(const Context& ctx, const YAML::Node& node, const std::string& key,
               std::string_view a, std::string_view b);

// dataset.fields.NAME: optional | required.
void set_optional(LoaderOptions& o, const Context& ctx, const YAML::Node& node,
                  const std::string& field);

// transforms.FIELD: its steps, checked as a whole: decode first, a fixed size at the end of
// the geometry (a crop, or a resize to [h, w]), then normalize and layout at most once each,
// in that order.
FieldTransform parse_field_transform(const Context& ctx, const YAML::Node& node,
                                     const std::string& field);

// Puts `t` in place of the steps of the same field, or adds it.
void set_transform(LoaderOptions& o, FieldTransform t);

// transforms: a mapping of field: [steps]; replaces every field's steps.
void parse_transforms(LoaderOptions& o, const Context& ctx, const YAML::Node& node);

}  // namespace sluice::config
