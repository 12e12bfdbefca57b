#pragma once

#include <sluice/sampler.h>

#include "sampler/permutation.h"

#include <vector>

namespace sluice {

/// One epoch's global order: a bijection position -> sample index on [0, N). Memory is O(1)
/// for global, block and none, O(shards) for shard mode.
class EpochOrder {
 public:
  EpochOrder(const SamplerOptions& options, uint64_t num_samples,
             const std::vector<uint64_t>& shard_sizes, uint64_t epoch);
  uint64_t operator()(uint64_t position) const;
  /// out[j] = (*this)(first + j) for j < count; faster than one call per position.
  void map_range(uint64_t first, size_t count, uint64_t* out) const;
  uint64_t size() const { return n_; }

 private:
  // A position's block (kBlock) or window (kShard): its slot, offset inside, and size.
  struct Slot {
    uint64_t slot, offset, size;
  };
  Slot block_slot(uint64_t p) const;
  Slot shard_window(uint64_t p) const;
  uint64_t shard_sample(uint64_t stream_position) const;

  ShuffleMode mode_;
  uint64_t n_;
  uint64_t key_;
  sampler::Permutation global_;

  // kBlock: blocks of block_ samples; the last, partial block (tail_ samples, 0 if none) sits
  // at slot tail_slot_ of the shuffled block order.
  uint64_t block_ = 1, num_blocks_ = 0, tail_ = 0, tail_slot_ = 0;

  // kShard: shards in the order shard_perm_; stream_starts_[k] is the stream position of the
  // k-th shard in that order; shard_firsts_[s] is shard s's first global index.
  std::vector<uint64_t> stream_starts_, stream_shards_, shard_firsts_;
  uint64_t window_ = 1;
};

}  // namespace sluice
