#include "pipeline/batch_builder.h"

#include "common/errors.h"
#include "index/internals.h"
#include "io/service.h"

#include <algorithm>
#include <cstring>

namespace sluice::pipeline {

using detail::fail;

BatchBuilder::BatchBuilder(std::shared_ptr<const Dataset> dataset, const BuildOptions& options,
                           PeerSet& peers, io::Service* service, const std::atomic<bool>* cancel,
                           WorkerStats& stats)
    : dataset_(std::move(dataset)),
      options_(options),
      peers_(peers),
      service_(service),
      cancel_(cancel),
      stats_(stats),
      plan_(*dataset_, options.direct) {}

void BatchBuilder::build(std::span<const SampleRef> refs, io::Engine* engine, BatchStorage& out) {
  // What is not reading or waiting for peers is assembling (checks, copies, transforms).
  const auto start = std::chrono::steady_clock::now();
  waited_ = {};
  struct Account {
    BatchBuilder& b;
    std::chrono::steady_clock::time_point start;
    ~Account() {
      b.stats_.add(WorkerStats::kAssemble, std::chrono::steady_clock::now() - start - b.waited_);
    }
  } account{*this, start};
  reads_in_flight_ = false;
  const size_t n = refs.size();
  extents_.resize(n);
  order_.clear();
  remote_.assign(n, 0);
  bool any_remote = false;
  for (size_t i = 0; i < n; ++i) {
    uint64_t index = refs[i].index;
    if (peers_.remote(index)) {
      remote_[i] = 1;
      any_remote = true;
      continue;
    }
    extents_[i] = dataset_->extent(index);
    order_.push_back(static_cast<uint32_t>(i));
  }
  if (options_.direct_to_batch) return read_into_batch(refs, engine, out);
  // Remote requests go out first and their replies are collected after the local reads, so
  // peers read and send while this thread reads its own shards.
  struct AbandonOnError {  // a batch that fails midway drops connections with replies due
    PeerReads* reads;
    ~AbandonOnError() {
      if (reads) reads->abandon();
    }
  } abandon{nullptr};
  if (any_remote) {
    if (!peer_reads_) peer_reads_ = std::make_unique<PeerReads>(peers_);
    abandon.reads = peer_reads_.get();
    std::byte* slots = nullptr;
    if (options_.one_field_bytes > 0) {
      out.data.reserve(n * options_.one_field_bytes);  // the layout below: field 0 at offset 0
      slots = out.data.data();
    }
    remote_samples_.clear();
    for (size_t i = 0; i < n; ++i)
      if (remote_[i]) remote_samples_.push_back({i, refs[i].index});
    peer_reads_->start(remote_samples_, n, slots, options_.one_field_bytes);
  }
  std::sort(order_.begin(), order_.end(), [&](uint32_t a, uint32_t b) {
    const auto &x = extents_[a], &y = extents_[b];
    return x.shard != y.shard ? x.shard < y.shard : x.offset < y.offset;
  });
  // Coalesce the aligned covers of neighbouring samples into single reads.
  plan_.clear();
  record_at_.assign(n, 0);
  for (uint32_t i : order_) record_at_[i] = plan_.add(refs[i].index, extents_[i], true);
  // A new staging buffer is registered with the engine (fixed-buffer reads) when it can be.
  if (staging_.reserve(plan_.bytes()) && engine)
    engine->register_buffer({staging_.data(), staging_.capacity()});
  plan_.bind(staging_.data());

  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.timeout_ms);
  if (!plan_.empty()) read_local(engine, deadline);
  plan_.close_files();
  if (any_remote) {
    const auto t = std::chrono::steady_clock::now();
    peer_reads_->finish();  // failed peers' samples go to their replicas
    const auto d = std::chrono::steady_clock::now() - t;
    stats_.add(WorkerStats::kRemote, d);
    waited_ += d;
  }

  // Check and split every record, then lay the batch out field by field.
  const size_t nf = dataset_->fields().size();
  field_spans_.resize(n * nf);
  for (size_t i = 0; i < n; ++i) {
    uint64_t index = refs[i].index;
    std::span<const std::byte> record;
    if (remote_[i]) {
      record = peer_reads_->record(i);  // checked against its checksum by the client
    } else {
      const SampleExtent& x = extents_[i];
      record = {staging_.data() + record_at_[i], x.size};
      if (options_.verify) read::check_record(*dataset_, index, x, record);
    }
    if (auto split = index::split_record(*dataset_, index, record, parts_); !split)
      fail(ErrorCode::kCorruption, "{}: sample {}: {}",
           dataset_->shards()[index::shard_of(*dataset_, index)].path.string(), index,
           split.error());
    std::copy(parts_.begin(), parts_.end(), field_spans_.begin() + static_cast<ptrdiff_t>(i * nf));
  }
  out.field_offset.resize(nf);
  out.field_bytes.resize(nf);
  out.offsets.resize(nf);
  size_t total = 0;
  for (size_t f = 0; f < nf; ++f) {
    size_t bytes = 0;
    if (const auto* t = transform_of(f))
      bytes = n * t->output_bytes();
    else
      for (size_t i = 0; i < n; ++i) bytes += field_spans_[i * nf + f].size();
    total = (total + 63) / 64 * 64;
    out.field_offset[f] = total;
    out.field_bytes[f] = bytes;
    total += bytes;
  }
  out.data.reserve(total);
  for (size_t f = 0; f < nf; ++f) {
    std::byte* dst = out.data.data() + out.field_offset[f];
    if (transform_of(f)) {
      out.offsets[f].clear();
      transform_field(f, refs, out, dst);
      continue;
    }
    bool variable = !dataset_->fields()[f].fixed_size();
    auto& offsets = out.offsets[f];
    offsets.clear();
    if (variable) offsets.push_back(0);
    for (size_t i = 0; i < n; ++i) {
      auto src = field_spans_[i * nf + f];
      // A remote record that landed in its slot (see PeerReads::start) is already there.
      if (!src.empty() && src.data() != dst) std::memcpy(dst, src.data(), src.size());
      dst += src.size();
      if (variable) offsets.push_back(offsets.back() + src.size());
    }
  }
}

// Runs field f's transform on each sample into its slot at `dst`. A sample that fails names its
// shard (or file) and index, or under transform_errors: skip becomes zeros marked as padding.
void BatchBuilder::transform_field(size_t f, std::span<const SampleRef> refs, BatchStorage& out,
                                   std::byte* dst) {
  const transform::ImageTransform& t = *transform_of(f);
  const size_t nf = dataset_->fields().size();
  const size_t each = t.output_bytes();
  for (size_t i = 0; i < refs.size(); ++i, dst += each) {
    const uint64_t index = refs[i].index;
    try {
      t.apply(field_spans_[i * nf + f], transform::sample_key(options_.seed, out.epoch, index),
              {dst, each});
    } catch (const Error& e) {
      if (!options_.skip_transform_errors) {
        std::string_view file = index::sample_file(*dataset_, index);
        const std::string where =
            file.empty() ? dataset_->shards()[index::shard_of(*dataset_, index)].path.string()
                         : (dataset_->path() / file).string();
        fail(e.code(), "{}: sample {}: field {}: {}", where, index, dataset_->fields()[f].name,
             e.what());
      }
      std::memset(dst, 0, each);
      out.padding[i] = 1;
      if (options_.transform_skipped) options_.transform_skipped->fetch_add(1);
    }
  }
}

// The zero-copy path, for datasets whose record is one fixed-size field of whole aligned
// blocks (the common "tensor per sample" case): each record is read straight into its slot
// of the batch buffer, so there is no staging buffer and no copy. Reads of samples that are
// neighbours both on disk and in the batch are merged.
void BatchBuilder::read_into_batch(std::span<const SampleRef> refs, io::Engine* engine,
                                   BatchStorage& out) {
  const size_t n = refs.size();
  const uint64_t each = options_.one_field_bytes;
  out.field_offset.assign(1, 0);
  out.field_bytes.assign(1, n * each);
  out.offsets.assign(1, {});
  out.data.reserve(n * each);
  plan_.clear();
  for (size_t i = 0; i < n; ++i)
    plan_.add_to(refs[i].index, extents_[i], out.data.data() + i * each);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.timeout_ms);
  read_local(engine, deadline);
  if (!options_.verify) return;
  for (size_t i = 0; i < n; ++i)
    read::check_record(*dataset_, refs[i].index, extents_[i], {out.data.data() + i * each, each});
}

// Reads the plan's ops with this thread's engine, or through the loader's IO service when it has
// one.
void BatchBuilder::read_local(io::Engine* engine, std::chrono::steady_clock::time_point deadline) {
  auto& ops = plan_.ops();
  const auto t = std::chrono::steady_clock::now();
  io::ReadFailure failure = service_ ? service_->read_all(ops, deadline, cancel_)
                                     : io::read_all(*engine, ops, deadline, cancel_, &stats_.queue);
  const auto d = std::chrono::steady_clock::now() - t;
  stats_.add(WorkerStats::kRead, d);
  waited_ += d;
  reads_in_flight_ = failure.in_flight;
  if (failure.error != 0) plan_.fail(failure, options_.timeout_ms);
}

}  // namespace sluice::pipeline
