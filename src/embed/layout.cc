#include "embed/layout.h"

#include <sluice/error.h>

#include "common/errors.h"
#include "common/file.h"
#include "common/json_number.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>

namespace sluice::embed {

namespace fs = std::filesystem;
using detail::fail;

namespace {
constexpr const char* kFormat = "sluice-embedding";
constexpr uint64_t kVersion = 1;

}  // namespace

Layout Layout::make(uint64_t rows, uint32_t dim, EmbeddingDtype dtype, uint64_t shard_bytes) {
  Layout l;
  l.rows = rows;
  l.dim = dim;
  l.dtype = dtype;
  l.row_bytes = uint64_t{dim} * element_bytes(dtype);
  if (l.row_bytes <= kPage) {
    l.unit_bytes = kPage;
    l.rows_per_unit = kPage / l.row_bytes;
  } else {
    l.unit_bytes = (l.row_bytes + kPage - 1) / kPage * kPage;
    l.rows_per_unit = 1;
  }
  const uint64_t units = std::max<uint64_t>(1, shard_bytes / l.unit_bytes);
  l.rows_per_shard = units * l.rows_per_unit;
  const uint64_t shards = (rows + l.rows_per_shard - 1) / l.rows_per_shard;
  for (uint64_t s = 0; s < shards; ++s) l.shard_files.push_back(fmt::format("rows-{:05}.bin", s));
  return l;
}

uint64_t Layout::rows_in_shard(uint64_t shard) const {
  return std::min(rows_per_shard, rows - shard * rows_per_shard);
}

uint64_t Layout::shard_bytes(uint64_t shard) const { return units_in_shard(shard) * unit_bytes; }

std::string manifest_text(const Layout& l, const EmbeddingSpec& spec) {
  nlohmann::json shards = nlohmann::json::array();
  for (uint64_t s = 0; s < l.shards(); ++s)
    shards.push_back(
        {{"file", l.shard_files[s]}, {"rows", l.rows_in_shard(s)}, {"bytes", l.shard_bytes(s)}});
  nlohmann::json m = {{"format", kFormat},
                      {"version", kVersion},
                      {"rows", l.rows},
                      {"dim", l.dim},
                      {"dtype", std::string(to_string(l.dtype))},
                      {"row_bytes", l.row_bytes},
                      {"unit_bytes", l.unit_bytes},
                      {"rows_per_unit", l.rows_per_unit},
                      {"rows_per_shard", l.rows_per_shard},
                      {"init", spec.init},
                      {"seed", spec.seed},
                      {"shards", shards}};
  return m.dump(1) + "\n";
}

Layout read_manifest(const fs::path& dir) {
  const fs::path file = dir / kManifest;
  std::error_code ec;
  if (!fs::exists(file, ec)) {
    if (!fs::exists(dir, ec))
      throw Error(ErrorCode::kNotFound,
                  fmt::format("embedding table {}: no such directory", dir.string()), ENOENT);
    throw Error(ErrorCode::kNotFound,
                fmt::format("{}: not an embedding table (no {})", dir.string(), kManifest), ENOENT);
  }
  auto fd = detail::open_file(file, O_RDONLY);
  std::string text(detail::file_size(fd.get(), file.string()), '\0');
  detail::pread_full(fd.get(), std::as_writable_bytes(std::span(text)), 0, file.string());
  try {
    auto m = nlohmann::json::parse(text);
    if (m.at("format").get<std::string>() != kFormat)
      fail(ErrorCode::kCorruption, "{}: format \"{}\", not {}", file.string(),
           m.at("format").get<std::string>(), kFormat);
    if (const uint64_t version = detail::json_number(m, "version", file); version != kVersion)
      fail(ErrorCode::kUnsupported, "{}: version {} (this sluice reads {})", file.string(), version,
           kVersion);
    const uint64_t rows = detail::json_number(m, "rows", file);
    const auto dim = static_cast<uint32_t>(detail::json_number(m, "dim", file, UINT32_MAX));
    EmbeddingDtype dtype;
    try {
      dtype = embedding_dtype(m.at("dtype").get<std::string>());
    } catch (const Error& e) {
      fail(ErrorCode::kCorruption, "{}: {}", file.string(), e.what());
    }
    if (rows == 0 || dim == 0) fail(ErrorCode::kCorruption, "{}: rows or dim is 0", file.string());
    const auto shard_files = m.at("shards");
    const uint64_t rows_per_shard = detail::json_number(m, "rows_per_shard", file);
    // The layout is a function of (rows, dim, dtype, rows per shard): recompute and compare.
    const uint64_t row_bytes = uint64_t{dim} * element_bytes(dtype);
    const uint64_t unit = row_bytes <= kPage ? kPage : (row_bytes + kPage - 1) / kPage * kPage;
    const uint64_t per_unit = row_bytes <= kPage ? kPage / row_bytes : 1;
    if (rows_per_shard == 0 || rows_per_shard % per_unit != 0)
      fail(ErrorCode::kCorruption, "{}: rows_per_shard {} is not a whole number of units",
           file.string(), rows_per_shard);
    // The shard list first: a damaged row count must not make a layout of 2^50 shards.
    if (rows > (uint64_t{1} << 62) || rows_per_shard / per_unit > UINT64_MAX / unit ||
        rows / rows_per_shard + (rows % rows_per_shard != 0) != shard_files.size())
      fail(ErrorCode::kCorruption, "{}: {} rows in shards of {} do not make its {} shards",
           file.string(), rows, rows_per_shard, shard_files.size());
    Layout l = Layout::make(rows, dim, dtype, rows_per_shard / per_unit * unit);
    if (detail::json_number(m, "row_bytes", file) != l.row_bytes ||
        detail::json_number(m, "unit_bytes", file) != l.unit_bytes ||
        detail::json_number(m, "rows_per_unit", file) != l.rows_per_unit ||
        l.rows_per_shard != rows_per_shard || shard_files.size() != l.shards())
      fail(ErrorCode::kCorruption, "{}: the layout fields disagree with rows, dim and dtype",
           file.string());
    for (uint64_t s = 0; s < l.shards(); ++s) {
      const auto& e = shard_files.at(s);
      if (e.at("file").get<std::string>() != l.shard_files[s] ||
          detail::json_number(e, "rows", file) != l.rows_in_shard(s) ||
          detail::json_number(e, "bytes", file) != l.shard_bytes(s))
        fail(ErrorCode::kCorruption, "{}: shard {} disagrees with the layout", file.string(), s);
    }
    return l;
  } catch (const nlohmann::json::exception& e) {
    fail(ErrorCode::kCorruption, "{}: not an embedding table manifest: {}", file.string(),
         e.what());
  }
}

}  // namespace sluice::embed
