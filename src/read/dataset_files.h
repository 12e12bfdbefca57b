#pragma once

// The one owner of a dataset's files for its readers (the loader and the shard server): the
// io.direct choice, the descriptor table the IO engine reads through (O_DIRECT descriptors, or
// the dataset's own), a files tree's case (each sample's file opened for its read), warming
// the page cache when the data fits in memory, and read-only mappings of packed shards.

#include <sluice/dataset.h>
#include <sluice/options.h>

#include "common/file.h"
#include "io/engine.h"
#include "read/direct.h"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <thread>
#include <vector>

namespace sluice::read {

/// The config's io section in the io layer's own terms, for the readers that start engines on
/// a dataset's files (the loader and the shard server); io itself never reads <sluice/options.h>.
inline io::EngineOptions engine_options(const IoOptions& io) {
  io::EngineOptions out;
  out.kind = io.engine == IoEngineKind::kUring     ? io::EngineKind::kUring
             : io.engine == IoEngineKind::kThreads ? io::EngineKind::kThreads
                                                   : io::EngineKind::kAuto;
  out.queue_depth = io.queue_depth;
  return out;
}

class DatasetFiles {
 public:
  /// Chooses direct I/O per `mode` (open_direct; `setting` names the config key in errors and
  /// in why()) and opens the descriptors. `may_warm`: warm the page cache when `auto` chose it
  /// because the data fits (false for a cache's mirror: its holes are not worth reading
  /// ahead). Throws Error(kUnsupported) when `mode` is on and O_DIRECT does not work.
  DatasetFiles(std::shared_ptr<const Dataset> dataset, DirectIo mode, const std::string& setting,
               bool may_warm);
  /// Stops the warming and waits for it; unmaps the shards.
  ~DatasetFiles();
  DatasetFiles(const DatasetFiles&) = delete;
  DatasetFiles& operator=(const DatasetFiles&) = delete;

  const Dataset& dataset() const { return *dataset_; }
  /// Reads go through O_DIRECT descriptors (and must be aligned to alignment()).
  bool direct() const { return direct_.on; }
  /// A files tree: each sample is its own file, which a read opens (ReadPlan) and closes.
  bool per_sample_files() const { return per_sample_; }
  /// The IO engine's descriptor table, by io::ReadOp::file: one per shard (-1: absent), or a
  /// files tree's root (each of its reads carries the sample file's own descriptor).
  const std::vector<int>& fds() const { return fds_; }
  /// What reads align to: the dataset's block under direct I/O, else 1.
  uint64_t alignment() const;
  /// Under io.direct auto: why it chose what it chose, and that it warms; else "".
  const std::string& why() const { return direct_.why; }

  /// Starts reading the local shards into the page cache on a thread of its own (once; nothing
  /// unless `auto` chose the page cache and `may_warm`).
  void start_warming();

  /// Maps a packed dataset's shards read-only when reads go through the page cache (the shard
  /// server sends large records straight from there). Shards that do not map stay unmapped.
  void map_shards();
  /// Shard `shard`'s mapped bytes; empty when not mapped.
  std::span<const std::byte> mapped(uint32_t shard) const;
  bool any_mapped() const { return !maps_.empty(); }

 private:
  std::shared_ptr<const Dataset> dataset_;
  bool per_sample_ = false;
  DirectFiles direct_;  // the io.direct choice (warm: and may_warm) and its descriptors
  std::vector<int> fds_;
  std::vector<std::span<const std::byte>> maps_;
  std::atomic<bool> warm_stop_{false};
  std::thread warm_thread_;
};

}  // namespace sluice::read
