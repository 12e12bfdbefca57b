#pragma once

// Batch building: one step's samples -> the bytes of a BatchStorage, laid out field by field.
// Local samples are read with coalesced aligned reads (read::ReadPlan) through the thread's
// engine or the loader's IO service; remote ones come from their peers (PeerReads). Every
// record is checked and split, then the fields are copied into place. A dataset of one
// fixed-size field whose records are whole aligned blocks is read straight into its batch
// slots instead (no staging, no copy).

#include "io/engine.h"
#include "pipeline/buffer_pool.h"
#include "pipeline/peers.h"
#include "pipeline/worker_stats.h"
#include "read/record_reader.h"
#include "transform/image.h"

#include <sluice/dataset.h>
#include <sluice/sampler.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <optional>
#include <span>
#include <vector>

namespace sluice::io {
class Service;
}

namespace sluice::pipeline {

struct BuildOptions {
  bool verify = true;           // check every record against its checksum
  uint32_t timeout_ms = 30000;  // a batch's local reads, in all
  bool direct = false;          // the descriptors are O_DIRECT: reads are aligned
  // A packed dataset of one fixed-size field: its record size (a record is that field); else 0.
  uint64_t one_field_bytes = 0;
  bool direct_to_batch = false;  // records go straight into their batch slots (see above)
  // Per dataset field: its transform (config `transforms`), or null: its bytes as stored.
  std::vector<std::shared_ptr<const transform::ImageTransform>> transforms;
  uint64_t seed = 0;                   // with the epoch and index: each sample's key
  bool skip_transform_errors = false;  // transform_errors: skip
  std::atomic<uint64_t>* transform_skipped = nullptr;  // counts them (the loader's)
};

/// One loader thread's batch building (not thread-safe); kept across epochs, so its staging
/// buffer and peer connections are reused. Shares the loader's dataset, peer set and IO service.
class BatchBuilder {
 public:
  /// `stats`: this thread's accounts (kRead, kRemote and kAssemble are added here; `queue` is
  /// noted by reads through `engine`). It must outlive the builder.
  BatchBuilder(std::shared_ptr<const Dataset> dataset, const BuildOptions& options, PeerSet& peers,
               io::Service* service, const std::atomic<bool>* cancel, WorkerStats& stats);

  /// Reads and lays out the samples `refs` into `out` (its data, field offsets and sizes; not
  /// its indices, epoch or step), with `engine`, or through the IO service when there is one.
  /// Throws sluice::Error naming the file, sample or peer.
  void build(std::span<const SampleRef> refs, io::Engine* engine, BatchStorage& out);

  /// After build() threw: a read was given up on while still in flight (io::ReadFailure), so
  /// the batch's storage, the staging buffer and the engine may still be written into. The
  /// caller leaks the storage and engine; leak_staging() does the same for the staging buffer.
  bool reads_in_flight() const { return reads_in_flight_; }
  void leak_staging() { staging_.leak(); }

 private:
  void read_into_batch(std::span<const SampleRef> refs, io::Engine* engine, BatchStorage& out);
  void read_local(io::Engine* engine, std::chrono::steady_clock::time_point deadline);
  void transform_field(size_t f, std::span<const SampleRef> refs, BatchStorage& out,
                       std::byte* dst);
  // Field f's transform, or null when its bytes go into the batch as stored.
  const transform::ImageTransform* transform_of(size_t f) const {
    return f < options_.transforms.size() ? options_.transforms[f].get() : nullptr;
  }

  std::shared_ptr<const Dataset> dataset_;
  BuildOptions options_;
  PeerSet& peers_;
  io::Service* service_;
  const std::atomic<bool>* cancel_;
  WorkerStats& stats_;
  std::chrono::steady_clock::duration waited_{};  // this build's reads and peers so far
  std::unique_ptr<PeerReads> peer_reads_;         // made with the first remote sample

  // Reused from batch to batch: nothing here is allocated per sample.
  AlignedBuffer staging_;
  bool reads_in_flight_ = false;
  read::ReadPlan plan_;  // the batch's local reads
  std::vector<SampleExtent> extents_;
  std::vector<uint32_t> order_;                          // samples sorted by (shard, offset)
  std::vector<uint64_t> record_at_;                      // where each local record is in staging
  std::vector<std::span<const std::byte>> field_spans_;  // n * num_fields
  std::vector<std::span<const std::byte>> parts_;        // one record's fields
  std::vector<uint8_t> remote_;                          // per sample: read from a peer
  std::vector<RemoteSample> remote_samples_;
};

}  // namespace sluice::pipeline
