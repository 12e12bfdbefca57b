#pragma once

// A number in a JSON file sluice wrote and reads back (a checkpoint's index.json, an embedding
// table's manifest.json): an integer in [0, max]. A float or a negative number there is damage,
// and converting one with nlohmann's get<uint64_t>() would be undefined behaviour. Header-only:
// its users link nlohmann-json themselves.

#include "common/errors.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>

namespace sluice::detail {

/// `j[key]`, or Error(kCorruption) naming the file, the key and what is there.
inline uint64_t json_number(const nlohmann::json& j, const char* key,
                            const std::filesystem::path& file, uint64_t max = UINT64_MAX) {
  const auto& v = j.at(key);
  if (!v.is_number_unsigned() || v.get<uint64_t>() > max)
    fail(ErrorCode::kCorruption, "{}: {}: expected an integer from 0 to {}, got {}", file.string(),
         key, max, v.dump());
  return v.get<uint64_t>();
}

}  // namespace sluice::detail
