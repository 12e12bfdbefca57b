#pragma once

#include <sluice/dataset.h>
#include <sluice/export.h>
#include <sluice/options.h>
#include <sluice/sampler.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sluice {

/// One field of a batch. Fixed-size fields are dense: `shape` is [B, ...] and `data` holds
/// B * fixed_bytes. Variable-size fields are values + offsets: sample i is
/// data[offsets[i], offsets[i+1]) and `shape` is [-1]. Views into the batch's buffer.
/// With `device: cuda:N`, `data` is device memory (do not touch it from the host); offsets
/// stay in host memory.
struct FieldView {
  std::string_view name;
  DType dtype = DType::kUInt8;
  std::vector<int64_t> shape;
  std::span<const std::byte> data;
  DeviceKind device = DeviceKind::kCpu;  // kCuda: `data` is on GPU `device_index`
  int device_index = 0;
  std::span<const uint64_t> offsets;  // B + 1 entries for a variable-size field, else empty

  bool fixed_size() const { return offsets.empty(); }
  /// The bytes of sample i of this batch.
  std::span<const std::byte> sample(size_t i) const;
};

/// A batch in a pooled, 64-byte-aligned buffer. Immutable; shared by every holder of its
/// shared_ptr, and its buffer goes back to the loader's pool when the last holder lets go
/// (even after the Loader is destroyed). Thread-safe to read.
class SLUICE_EXPORT Batch {
 public:
  virtual ~Batch() = default;
  virtual size_t size() const = 0;  // samples, padding included
  virtual uint64_t epoch() const = 0;
  virtual uint64_t step() const = 0;  // batch number in the epoch, on this rank
  /// Global sample indices, in delivery order.
  virtual std::span<const uint64_t> indices() const = 0;
  /// 1 where the sample is padding (drop_last: false); such samples repeat a real one.
  virtual std::span<const uint8_t> padding() const = 0;
  virtual size_t num_fields() const = 0;
  virtual FieldView field(size_t i) const = 0;
  /// Throws Error(kInvalidArgument) naming the field when there is none of that name.
  virtual FieldView field(std::string_view name) const = 0;
  /// `device: cuda:N` only (a no-op otherwise): makes `stream` (a cudaStream_t; nullptr is the
  /// legacy default stream) wait for the batch's copy to the device without blocking the host,
  /// and keeps the device buffer from being reused until the work queued on `stream` before
  /// the batch is dropped has finished. Call it before launching work that reads the batch;
  /// the last stream given wins. Throws Error(kIo) naming the CUDA error.
  virtual void use_on_stream(void* stream) const { (void)stream; }
};

/// What a Loader has done so far; cheap to read at any time.
struct LoaderStats {
  uint64_t batches = 0;  // delivered to the consumer
  uint64_t samples = 0;
  uint64_t bytes = 0;         // record bytes delivered
  double wait_seconds = 0;    // consumer time spent blocked in next()
  std::string engine;         // the IO engine in use and its features
  bool direct_io = false;     // reads bypass the page cache (O_DIRECT)
  bool pinned = false;        // batch buffers are page-locked (device: pinned / cuda:N)
  uint64_t batches_held = 0;  // delivered batches still alive (their buffers not yet back)
  // Page-locked host memory and device memory that sluice holds in this process, all loaders
  // together (batches still alive included): flat from epoch to epoch once the pools are warm.
  uint64_t pinned_bytes = 0;
  uint64_t device_bytes = 0;
  // Samples whose transform failed and that became padding (transform_errors: skip).
  uint64_t transform_skipped = 0;
  // With a cache (an s3:// dataset or cache.dir): bytes fetched from the source (gaps between
  // coalesced samples included), and samples of delivered batches that were in the cache when
  // their batch was built, or had to be waited for.
  uint64_t source_bytes = 0;
  uint64_t source_requests = 0;
  uint64_t cache_hits = 0;
  uint64_t cache_misses = 0;
  // Checkpoints written in this process since the loader opened (sluice's checkpoint writer)
  // to the device the loader reads its dataset from: their bytes, and how long their writes
  // were held back so that the reads went first (CheckpointOptions::share).
  uint64_t checkpoint_bytes = 0;
  double checkpoint_held_seconds = 0;

  // Where the time goes. User + system CPU of the whole process since the loader opened.
  double cpu_seconds = 0;
  // Reads in flight over time: under O_DIRECT the IO thread's one queue (the device's queue as
  // sluice drives it), through the page cache the loader threads' queues together. The mean
  // count, the share of time at each level (0, 1, 2-3, 4-7, ..., 128-255, 256+; the first is
  // io_idle_fraction: nothing in flight, e.g. between a batch's last completion and the next
  // submission), and the completions reaped.
  double io_inflight_mean = 0;
  double io_idle_fraction = 0;
  std::vector<double> io_inflight_hist;
  uint64_t io_completions = 0;
  // Seconds the loader threads spent, all together, in each stage of building batches.
  struct Stages {
    double window = 0;    // waiting for the consumer (the batch was past the prefetch window)
    double buffer = 0;    // waiting for a free batch buffer
    double plan = 0;      // the sampler's order and the read plan
    double cache = 0;     // waiting for the node cache's fetches
    double read = 0;      // local reads
    double remote = 0;    // waiting for peers
    double assemble = 0;  // checksums, copies into the batch, transforms
    double device = 0;    // queueing the copy to the GPU
    /// f(name, seconds) for each stage in the order above (const or not): the one list that
    /// printers and bindings walk.
    template <class Self, class F>
    static void each(Self& s, F&& f) {
      f("window", s.window);
      f("buffer", s.buffer);
      f("plan", s.plan);
      f("cache", s.cache);
      f("read", s.read);
      f("remote", s.remote);
      f("assemble", s.assemble);
      f("device", s.device);
    }
  } stage_seconds;
};

/// The dataset a Loader with `options` reads, opened as Loader::open opens it: a local
/// dataset.path in place; an s3:// one on a local mirror of its source that holds the metadata
/// only (in memory, or under cache.dir), for tools that look at a dataset without loading it
/// (`sluice inspect`, `order`). `fetch_all`: every byte of the source copied into the mirror
/// first, so that Dataset::verify checks what the source holds. A mirror made in memory is
/// removed when the last reference goes; errors name the source, as the Loader's do.
SLUICE_EXPORT std::shared_ptr<Dataset> open_dataset(const LoaderOptions& options,
                                                    bool fetch_all = false);

/// Turns the sampler's order into ready batches: `prefetch` batches are read ahead with the IO
/// engine by loader threads, each batch assembled in a pooled buffer. Not thread-safe: one
/// consumer thread calls next(). Throws sluice::Error.
class SLUICE_EXPORT Loader {
 public:
  static std::unique_ptr<Loader> open(const LoaderOptions& options);
  virtual ~Loader() = default;

  /// The next batch of the current epoch, or nullptr once the epoch is over; the call after
  /// that starts the following epoch. Rethrows a read or corruption error of this batch
  /// (naming shard, offset and sample); waits at most the IO timeout.
  virtual std::shared_ptr<const Batch> next() = 0;
  /// Waits at most `max_wait` until next() can return without blocking: its batch, its error or
  /// the epoch's end is ready, or the wait for that batch has run past the IO timeout (next()
  /// then throws). False when `max_wait` ran out first. For callers that must stay responsive,
  /// e.g. to Ctrl-C between short waits.
  virtual bool wait(std::chrono::milliseconds max_wait) = 0;
  /// Restarts at the beginning of `epoch`, dropping batches read ahead.
  virtual void set_epoch(uint64_t epoch) = 0;
  virtual uint64_t epoch() const = 0;
  /// Batches this rank gets per epoch (equal on every rank); from a resume point, what is left.
  virtual uint64_t num_batches() const = 0;
  /// Batches this rank gets in a whole epoch, wherever the loader stands.
  virtual uint64_t batches_per_epoch() const = 0;
  /// Batches of the current epoch not yet delivered by next() (0 once its last one was).
  virtual uint64_t batches_left() const = 0;
  /// Where the consumer stands: resuming from it with load_state() delivers exactly the
  /// samples not yet delivered, on any world size.
  virtual SamplerState state() const = 0;
  virtual void load_state(const SamplerState& state) = 0;

  virtual const Dataset& dataset() const = 0;
  virtual const LoaderOptions& options() const = 0;
  virtual LoaderStats stats() const = 0;
};

}  // namespace sluice
