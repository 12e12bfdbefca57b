#pragma once

// Where a row lives (README.md, "Layout"): a shard file is a run of units; a unit is one 4 KiB
// page holding floor(4096 / row_bytes) rows when a row fits a page, else the whole pages one
// row needs. So a row of at most 4 KiB never straddles a page, and every unit is read and
// written whole with O_DIRECT.

#include <sluice/embedding.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace sluice::embed {

inline constexpr uint64_t kPage = 4096;

struct Layout {
  uint64_t rows = 0;
  uint32_t dim = 0;
  EmbeddingDtype dtype = EmbeddingDtype::kFloat32;
  uint64_t row_bytes = 0;
  uint64_t unit_bytes = 0;     // a page, or the pages one row spans
  uint64_t rows_per_unit = 0;  // 1 when a row spans pages
  uint64_t rows_per_shard = 0;
  std::vector<std::string> shard_files;  // rows-00000.bin, ...

  static Layout make(uint64_t rows, uint32_t dim, EmbeddingDtype dtype, uint64_t shard_bytes);

  uint64_t shards() const { return shard_files.size(); }
  uint64_t shard_of(uint64_t row) const { return row / rows_per_shard; }
  uint64_t rows_in_shard(uint64_t shard) const;
  uint64_t shard_bytes(uint64_t shard) const;
  /// The unit of `row` within its shard, and the row's byte offset inside that unit.
  uint64_t unit_of(uint64_t row) const { return row % rows_per_shard / rows_per_unit; }
  uint64_t offset_in_unit(uint64_t row) const {
    return row % rows_per_shard % rows_per_unit * row_bytes;
  }
  uint64_t units_in_shard(uint64_t shard) const {
    return (rows_in_shard(shard) + rows_per_unit - 1) / rows_per_unit;
  }
};

inline constexpr const char* kManifest = "manifest.json";
inline constexpr const char* kJournal = "journal";
inline constexpr const char* kLock = "lock";

/// The manifest's JSON text, and back; reading checks every field (kCorruption naming the
/// file) and that the layout it describes is the one make() gives.
std::string manifest_text(const Layout& layout, const EmbeddingSpec& spec);
Layout read_manifest(const std::filesystem::path& dir);

}  // namespace sluice::embed
