#include "common/errors.h"
#include "sampler/epoch_order.h"

#include <algorithm>
#include <numeric>

namespace sluice {

using detail::fail;
using sampler::derive_key;
using sampler::Permutation;

namespace {
uint64_t ceil_div(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }
}  // namespace

EpochOrder::EpochOrder(const SamplerOptions& o, uint64_t num_samples,
                       const std::vector<uint64_t>& shard_sizes, uint64_t epoch)
    : mode_(o.shuffle.mode),
      n_(num_samples),
      key_(derive_key(derive_key(o.seed, epoch), static_cast<uint64_t>(o.shuffle.mode))) {
  switch (mode_) {
    case ShuffleMode::kGlobal:
      global_ = Permutation(n_, key_);
      break;
    case ShuffleMode::kBlock: {
      block_ = o.shuffle.block_size;
      num_blocks_ = ceil_div(n_, block_);
      tail_ = n_ % block_;
      global_ = Permutation(num_blocks_, key_);  // over blocks
      // Block ids are 0..num_blocks-1 and only the last one is partial.
      tail_slot_ = tail_ ? global_.inverse(num_blocks_ - 1) : num_blocks_;
      break;
    }
    case ShuffleMode::kShard: {
      window_ = o.shuffle.buffer_size;
      std::vector<uint64_t> sizes = shard_sizes;
      if (sizes.empty() && n_ > 0) sizes.push_back(n_);  // no shard table: one group
      Permutation shard_perm(sizes.size(), key_);
      shard_firsts_.resize(sizes.size());
      std::exclusive_scan(sizes.begin(), sizes.end(), shard_firsts_.begin(), uint64_t{0});
      uint64_t pos = 0;
      for (uint64_t k = 0; k < sizes.size(); ++k) {
        uint64_t s = shard_perm(k);
        if (sizes[s] == 0) continue;
        stream_starts_.push_back(pos);
        stream_shards_.push_back(s);
        pos += sizes[s];
      }
      break;
    }
    case ShuffleMode::kNone:
      break;
  }
}

EpochOrder::Slot EpochOrder::block_slot(uint64_t p) const {
  // Slots before the partial block hold full blocks; the partial block occupies tail_ positions.
  uint64_t tail_start = tail_slot_ * block_;
  if (p < tail_start) return {p / block_, p % block_, block_};
  if (p < tail_start + tail_) return {tail_slot_, p - tail_start, tail_};
  uint64_t q = p - tail_start - tail_;
  return {tail_slot_ + 1 + q / block_, q % block_, block_};
}

EpochOrder::Slot EpochOrder::shard_window(uint64_t p) const {
  uint64_t window = p / window_;
  uint64_t start = window * window_;
  return {window, p - start, std::min(window_, n_ - start)};
}

uint64_t EpochOrder::shard_sample(uint64_t q) const {
  auto k = static_cast<size_t>(std::upper_bound(stream_starts_.begin(), stream_starts_.end(), q) -
                               stream_starts_.begin() - 1);
  return shard_firsts_[stream_shards_[k]] + (q - stream_starts_[k]);
}

uint64_t EpochOrder::operator()(uint64_t p) const {
  uint64_t out;
  map_range(p, 1, &out);
  return out;
}

void EpochOrder::map_range(uint64_t first, size_t count, uint64_t* out) const {
  switch (mode_) {
    case ShuffleMode::kGlobal:
      global_.map_range(first, count, out);
      return;
    case ShuffleMode::kNone:
      for (size_t j = 0; j < count; ++j) out[j] = first + j;
      return;
    case ShuffleMode::kBlock:
    case ShuffleMode::kShard:
      break;
  }
  // Consecutive positions share a block (window) until its end, so each run is one batched
  // lookup in that block's inner permutation.
  const bool block = mode_ == ShuffleMode::kBlock;
  for (size_t j = 0; j < count;) {
    Slot s = block ? block_slot(first + j) : shard_window(first + j);
    size_t run = static_cast<size_t>(std::min<uint64_t>(count - j, s.size - s.offset));
    uint64_t base = block ? global_(s.slot) * block_ : s.slot * window_;
    uint64_t id = block ? base / block_ : s.slot;
    Permutation(s.size, derive_key(key_, id + 1)).map_range(s.offset, run, out + j);
    for (size_t k = j; k < j + run; ++k)
      out[k] = block ? base + out[k] : shard_sample(base + out[k]);
    j += run;
  }
}

Sampler::Sampler(const SamplerOptions& options, uint64_t num_samples,
                 std::vector<uint64_t> shard_sizes)
    : options_(options), num_samples_(num_samples), shard_sizes_(std::move(shard_sizes)) {
  if (options_.batch_size == 0) fail(ErrorCode::kInvalidArgument, "batch_size must be at least 1");
  if (options_.shuffle.block_size == 0)
    fail(ErrorCode::kInvalidArgument, "shuffle.block_size must be at least 1");
  if (options_.shuffle.buffer_size == 0)
    fail(ErrorCode::kInvalidArgument, "shuffle.buffer_size must be at least 1");
  if (num_samples_ > (uint64_t{1} << 62))
    fail(ErrorCode::kInvalidArgument, "{} samples is more than the sampler handles (2^62)",
         num_samples_);
  if (!shard_sizes_.empty() &&
      std::accumulate(shard_sizes_.begin(), shard_sizes_.end(), uint64_t{0}) != num_samples_)
    fail(ErrorCode::kInvalidArgument, "shard sizes do not add up to {} samples", num_samples_);
}

uint64_t Sampler::at(uint64_t epoch, uint64_t position) const {
  if (position >= num_samples_)
    fail(ErrorCode::kInvalidArgument, "position {} out of range (epoch has {} samples)", position,
         num_samples_);
  return EpochOrder(options_, num_samples_, shard_sizes_, epoch)(position);
}

// A plan's figures, shared by its copies (a plan is cheap to copy and immutable).
struct RankPlan::Data {
  std::shared_ptr<const EpochOrder> order;
  uint64_t epoch = 0, start = 0, remaining = 0;
  uint64_t batch = 0, world = 0, rank = 0;
  uint64_t full_batches = 0;  // global batches of W*B real samples
  uint64_t tail = 0;          // real samples in the padded last global batch (0: none)
  uint64_t tail_per_rank = 0;
  uint64_t num_batches = 0;
};

RankPlan Sampler::plan(const SamplerState& state, uint32_t rank, uint32_t world_size) const {
  if (world_size == 0) fail(ErrorCode::kInvalidArgument, "world_size must be at least 1");
  if (rank >= world_size)
    fail(ErrorCode::kInvalidArgument, "rank {} out of range for world_size {}", rank, world_size);
  if (state.position > num_samples_)
    fail(ErrorCode::kInvalidArgument, "resume position {} is past the epoch's {} samples",
         state.position, num_samples_);
  auto p = std::make_shared<RankPlan::Data>();
  p->order = std::make_shared<EpochOrder>(options_, num_samples_, shard_sizes_, state.epoch);
  p->epoch = state.epoch;
  p->start = state.position;
  p->remaining = num_samples_ - state.position;
  p->batch = options_.batch_size;
  p->world = world_size;
  p->rank = rank;
  uint64_t global = p->batch * p->world;
  p->full_batches = p->remaining / global;
  uint64_t rest = p->remaining % global;
  if (!options_.drop_last && rest > 0) {
    p->tail = rest;
    p->tail_per_rank = ceil_div(rest, p->world);
  }
  p->num_batches = p->full_batches + (p->tail > 0);
  RankPlan plan;
  plan.d_ = std::move(p);
  return plan;
}

uint64_t Sampler::num_batches(uint32_t world_size, uint64_t position) const {
  return plan({0, position}, 0, world_size).num_batches();
}

uint64_t RankPlan::num_batches() const { return d_ ? d_->num_batches : 0; }

uint64_t RankPlan::batch_samples(uint64_t step) const {
  if (!d_) return 0;
  const Data& d = *d_;
  if (step < d.full_batches) return d.batch;
  return step == d.full_batches && d.tail > 0 ? d.tail_per_rank : 0;
}

void RankPlan::batch(uint64_t step, std::vector<SampleRef>& out) const {
  out.clear();
  if (!d_) fail(ErrorCode::kInvalidArgument, "batch {} out of range (an empty plan)", step);
  const Data& d = *d_;
  const EpochOrder& order = *d.order;
  if (step < d.full_batches) {
    uint64_t base = d.start + step * d.batch * d.world + d.rank * d.batch;
    // Map in chunks into a small stack buffer, then widen into SampleRefs.
    uint64_t chunk[64];
    out.resize(d.batch);
    for (uint64_t j = 0; j < d.batch; j += 64) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(64, d.batch - j));
      order.map_range(base + j, n, chunk);
      for (size_t k = 0; k < n; ++k) out[j + k] = {chunk[k], false};
    }
    return;
  }
  if (step != d.full_batches || d.tail == 0)
    fail(ErrorCode::kInvalidArgument, "batch {} out of range (epoch {} has {} batches per rank)",
         step, d.epoch, d.num_batches);
  // The last global batch holds `tail` real samples split into equal runs of tail_per_rank;
  // runs past the end repeat real samples of that batch and are marked as padding.
  uint64_t base = d.start + d.full_batches * d.batch * d.world;
  for (uint64_t j = 0; j < d.tail_per_rank; ++j) {
    uint64_t q = d.rank * d.tail_per_rank + j;
    if (q < d.tail)
      out.push_back({order(base + q), false});
    else
      out.push_back({order(base + q % d.tail), true});
  }
}

SamplerState RankPlan::state_after(uint64_t steps) const {
  if (!d_) return {};
  const Data& d = *d_;
  uint64_t consumed = std::min(steps, d.full_batches) * d.batch * d.world;
  if (steps > d.full_batches && d.tail > 0) consumed += d.tail;
  return {d.epoch, d.start + consumed};
}

uint64_t RankPlan::worker_batches(uint64_t num_batches, uint32_t worker, uint32_t workers) {
  if (workers == 0 || worker >= workers) return 0;
  return num_batches / workers + (worker < num_batches % workers);
}

}  // namespace sluice
