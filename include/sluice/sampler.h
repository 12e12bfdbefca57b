#pragma once

#include <sluice/export.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace sluice {

/// How an epoch orders the samples (config `shuffle.mode`).
enum class ShuffleMode {
  kGlobal,  // a uniform pseudo-random permutation of all N samples, O(1) memory
  kBlock,   // blocks of `block_size` neighbouring samples in shuffled order, shuffled inside
  kShard,   // shards in shuffled order, then shuffled within windows of `buffer_size` samples
  kNone,    // 0, 1, ..., N-1
};

struct ShuffleOptions {
  ShuffleMode mode = ShuffleMode::kGlobal;
  uint64_t block_size = 4096;    // samples per block in kBlock mode
  uint64_t buffer_size = 16384;  // window of samples shuffled together in kShard mode
};

struct SamplerOptions {
  ShuffleOptions shuffle;
  uint64_t seed = 0;
  uint64_t batch_size = 256;
  bool drop_last = true;  // drop the epoch's tail, or pad it to equal batches (padding marked)
};

/// Where a run stands: `position` samples of epoch `epoch`'s global order have been consumed by
/// all ranks together. It does not depend on the world size, so it resumes on any other.
struct SamplerState {
  uint64_t epoch = 0;
  uint64_t position = 0;
  bool operator==(const SamplerState&) const = default;
};

/// One sample of a batch. A padding sample repeats a real one so every rank gets full, equal
/// batches; consumers must not count it (it is delivered to someone else too).
struct SampleRef {
  uint64_t index = 0;
  bool padding = false;
  bool operator==(const SampleRef&) const = default;
};

/// What one rank reads in one epoch from a start position: `num_batches()` batches, the same
/// count on every rank. Global batch s is the slice [start + s*W*B, start + (s+1)*W*B) of the
/// epoch order; rank r takes its r-th run of B positions. Cheap to copy; thread-safe.
class SLUICE_EXPORT RankPlan {
 public:
  /// Batches of this plan (0 for a default-constructed, empty plan).
  uint64_t num_batches() const;
  /// Samples in batch `step` (batch_size, except possibly the padded last batch).
  uint64_t batch_samples(uint64_t step) const;
  /// Fills `out` with batch `step` in delivery order; O(batch size), no allocation if `out` has
  /// capacity.
  void batch(uint64_t step, std::vector<SampleRef>& out) const;
  /// The state after this rank's consumer has taken `steps` batches (all ranks in lockstep).
  SamplerState state_after(uint64_t steps) const;
  /// Batches that loader thread `worker` of `workers` builds: steps worker, worker + workers, ...
  static uint64_t worker_batches(uint64_t num_batches, uint32_t worker, uint32_t workers);

 private:
  friend class Sampler;
  struct Data;
  std::shared_ptr<const Data> d_;
};

/// Deterministic, sharded sample order: the same options, N, shard sizes, epoch and world size
/// give the same order on every machine. Thread-safe after construction.
class SLUICE_EXPORT Sampler {
 public:
  /// `shard_sizes` (sample counts per shard, summing to num_samples) is needed by kShard mode
  /// only. Throws Error(kInvalidArgument) on bad options.
  Sampler(const SamplerOptions& options, uint64_t num_samples,
          std::vector<uint64_t> shard_sizes = {});

  uint64_t num_samples() const { return num_samples_; }
  const SamplerOptions& options() const { return options_; }

  /// Sample at `position` of epoch `epoch`'s global order (a bijection on [0, N)). Builds the
  /// epoch's O(shards) tables each call: use plan() for bulk access.
  uint64_t at(uint64_t epoch, uint64_t position) const;

  /// Rank `rank` of `world_size`, epoch `state.epoch`, from `state.position` on.
  RankPlan plan(const SamplerState& state, uint32_t rank, uint32_t world_size) const;

  /// Batches per rank for an epoch started at `position`.
  uint64_t num_batches(uint32_t world_size, uint64_t position = 0) const;

 private:
  SamplerOptions options_;
  uint64_t num_samples_;
  std::vector<uint64_t> shard_sizes_;
};

}  // namespace sluice
