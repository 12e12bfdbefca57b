#pragma once

// Embedding tables on NVMe (src/embed/README.md): rows of `dim` elements stored in shard files
// under a manifest, gathered with O_DIRECT reads through the IO engine, updated through a
// journal so that a crash never leaves a row half old and half new, and cached in host memory
// by a policy that knows which ids the next batches look up (Belady) or by LRU.

#include <sluice/export.h>
#include <sluice/options.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>

namespace sluice {

enum class EmbeddingDtype { kFloat32, kFloat16, kBFloat16 };

SLUICE_EXPORT std::string_view to_string(EmbeddingDtype dtype);
/// "float32", "float16" or "bfloat16"; kInvalidArgument naming the value otherwise.
SLUICE_EXPORT EmbeddingDtype embedding_dtype(std::string_view name);
SLUICE_EXPORT size_t element_bytes(EmbeddingDtype dtype);

/// What a new table is: its shape, element type and first values.
struct EmbeddingSpec {
  uint64_t rows = 0;
  uint32_t dim = 0;
  EmbeddingDtype dtype = EmbeddingDtype::kFloat32;
  // "zeros", "normal:STD" (mean 0) or "uniform:A" (in [-A, A)); each row's values depend only
  // on (seed, row), so a table is the same whatever its shard size.
  std::string init = "zeros";
  uint64_t seed = 0;
  uint64_t shard_bytes = uint64_t{1} << 30;  // the largest shard file
};

struct EmbeddingOptions {
  uint64_t cache_bytes = 0;  // host memory for cached rows; 0: none
  CachePolicy policy = CachePolicy::kClairvoyant;
  bool readonly = false;        // several processes may open a table read-only; one read-write
  uint32_t queue_depth = 64;    // reads in flight
  uint32_t timeout_ms = 30000;  // a gather's reads, then the device counts as hung
  uint64_t max_dirty_bytes = 256 << 20;  // updates held before update() flushes by itself
};

struct EmbeddingStats {
  uint64_t gathers = 0;
  uint64_t ids = 0;         // ids asked for, duplicates included
  uint64_t unique_ids = 0;  // what the gathers needed after duplicates
  uint64_t rows_from_disk = 0;
  uint64_t read_ios = 0;  // reads issued (adjacent pages merged)
  uint64_t bytes_read = 0;
  uint64_t cache_hits = 0;
  uint64_t dirty_hits = 0;  // rows served from updates not yet flushed
  uint64_t cached_rows = 0;
  uint64_t rows_updated = 0;
  uint64_t flushes = 0;
  uint64_t future_batches = 0;  // fed and not yet gathered
};

/// One open table. Thread-safe: gathers from many threads, updates and flushes from any.
class SLUICE_EXPORT EmbeddingTable {
 public:
  /// Makes a new table at `path` (a directory that must not exist yet): shard files and a
  /// manifest, written beside it and renamed into place, so a killed create leaves no table
  /// (and the next create beside it removes what it left).
  /// `data`, when given, holds spec.rows x spec.dim elements row-major in spec.dtype (the
  /// rows of from_array); otherwise spec.init says the values.
  static void create(const std::filesystem::path& path, const EmbeddingSpec& spec,
                     const std::byte* data = nullptr);
  /// Opens a table; replays what a crash left in its journal first. Errors name the file.
  static std::unique_ptr<EmbeddingTable> open(const std::filesystem::path& path,
                                              const EmbeddingOptions& options = {});
  virtual ~EmbeddingTable() = default;

  virtual uint64_t rows() const = 0;
  virtual uint32_t dim() const = 0;
  virtual EmbeddingDtype dtype() const = 0;
  virtual size_t row_bytes() const = 0;
  virtual const std::filesystem::path& path() const = 0;

  /// Rows `ids` into `out` (ids.size() x row_bytes()), each id read once however often it
  /// appears; sees every update made before it, flushed or not. kInvalidArgument naming the
  /// first id out of range and its position.
  virtual void gather(std::span<const int64_t> ids, std::span<std::byte> out) = 0;
  /// Overwrites rows `ids` with `values` (ids.size() x row_bytes(); a repeated id: the last).
  /// Seen by gathers at once; durable after flush().
  virtual void update(std::span<const int64_t> ids, std::span<const std::byte> values) = 0;
  /// Makes every update before it durable: after a crash each row holds its last flushed value
  /// or a later update, never parts of two.
  virtual void flush() = 0;
  /// Tells the cache one future gather's ids, in the order gathers will come (the clairvoyant
  /// policy evicts the row whose next use is farthest). A gather of exactly a fed batch's ids
  /// (as a set) consumes it, and drops the batches fed before it that never came.
  virtual void feed_future(std::span<const int64_t> ids) = 0;

  /// Rows gathered ahead and handed out later (the Loader's look-ahead): gathers `ids` (sorted,
  /// without repeats; kInvalidArgument otherwise) into `rows` (ids.size() x row_bytes()) as
  /// gather() does, and until release(hold) every update() of one of them also writes the new
  /// row into its place in `rows`, from the updating thread. So the rows are current whenever
  /// they are handed out, and the update pays for it, not the consumer's wait. `rows` must stay
  /// valid and untouched until release() returns.
  virtual uint64_t gather_held(std::span<const int64_t> ids, std::span<std::byte> rows) = 0;
  /// Ends a hold: later updates leave its rows alone. An unknown hold is ignored.
  virtual void release(uint64_t hold) = 0;
  virtual EmbeddingStats stats() const = 0;
};

}  // namespace sluice
