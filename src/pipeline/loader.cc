// The Loader: sampler order -> IO engine reads -> batches in pooled buffers.
//
// Loader threads (io.threads) each build every T-th batch of the epoch: plan the batch's
// samples, coalesce their aligned extents into reads, read them all, check checksums, and copy
// fields into a pooled BatchStorage. Under direct I/O every thread's reads queue on one IO
// thread (io::Service), which keeps the device queue steady across batch boundaries; through
// the page cache each thread reads with its own engine, so the copies spread over the cores.
// The consumer takes batches in step order; a thread may start step s only while
// s < delivered + max(prefetch, threads), which bounds memory and read-ahead and still lets
// every thread build a batch (prefetch 4 left 12 of 16 decoding threads idle, issue 34).
// What a loader is made of (dataset, files, cache, server) is set up in loader_setup.cc.

#include <sluice/loader.h>
#include <sluice/server.h>

#include "cache/mirror.h"
#include "cache/sample_cache.h"
#include "common/cpu_time.h"
#include "common/errors.h"
#include "common/file.h"
#include "common/keep.h"
#include "common/log.h"
#include "common/thread.h"
#include "format/layout.h"
#include "index/internals.h"
#include "io/engine.h"
#include "io/priority.h"
#include "io/service.h"
#include "memory/cuda.h"
#include "pipeline/batch_builder.h"
#include "pipeline/buffer_pool.h"
#include "pipeline/loader_setup.h"
#include "pipeline/open.h"
#include "pipeline/peers.h"
#include "read/dataset_files.h"
#include "read/record_reader.h"
#include "source/source.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <thread>
#include <unordered_map>

namespace sluice {

std::span<const std::byte> FieldView::sample(size_t i) const {
  if (offsets.empty()) {
    size_t n = shape.empty() || shape[0] <= 0 ? 0 : static_cast<size_t>(shape[0]);
    size_t each = n ? data.size() / n : 0;
    return data.subspan(i * each, each);
  }
  return data.subspan(offsets[i], offsets[i + 1] - offsets[i]);
}

namespace pipeline {

using detail::fail;
using detail::log_line;
namespace fs = std::filesystem;

namespace {

class BatchImpl final : public Batch {
 public:
  BatchImpl(std::shared_ptr<BufferPool> pool, std::unique_ptr<BatchStorage> storage,
            std::shared_ptr<const std::vector<FieldSpec>> fields)
      : pool_(std::move(pool)), s_(std::move(storage)), fields_(std::move(fields)) {}
  ~BatchImpl() override {
    if (s_->device && release_stream_) {
      try {  // the device buffer is reused only after the consumer's queued work on it
        s_->device->released->record(*release_stream_);
        s_->device->release_pending = true;
      } catch (const std::exception& e) {
        log_line(std::string("dropping a CUDA batch: ") + e.what());
      }
    }
    pool_->note_returned_from_consumer();
    pool_->release(std::move(s_));
  }

  size_t size() const override { return s_->indices.size(); }
  uint64_t epoch() const override { return s_->epoch; }
  uint64_t step() const override { return s_->step; }
  std::span<const uint64_t> indices() const override { return s_->indices; }
  std::span<const uint8_t> padding() const override { return s_->padding; }
  size_t num_fields() const override { return fields_->size(); }

  FieldView field(size_t i) const override {
    const FieldSpec& f = (*fields_)[i];
    FieldView v;
    v.name = f.name;
    v.dtype = f.dtype;
    const std::byte* base = s_->data.data();
    if (s_->device) {
      base = static_cast<const std::byte*>(s_->device->buffer->data());
      v.device = DeviceKind::kCuda;
      v.device_index = s_->device->buffer->device();
    }
    v.data = {base + s_->field_offset[i], s_->field_bytes[i]};
    if (f.fixed_size()) {
      v.shape.push_back(static_cast<int64_t>(size()));
      v.shape.insert(v.shape.end(), f.shape.begin(), f.shape.end());
    } else {
      v.shape = {-1};
      v.offsets = s_->offsets[i];
    }
    return v;
  }

  FieldView field(std::string_view name) const override {
    for (size_t i = 0; i < fields_->size(); ++i)
      if ((*fields_)[i].name == name) return field(i);
    fail(ErrorCode::kInvalidArgument, "batch has no field \"{}\"", name);
  }

  void use_on_stream(void* stream) const override {
    if (!s_->device) return;
    s_->device->copied->wait_on(stream);
    std::lock_guard lock(mu_);
    release_stream_ = stream;
  }

 private:
  std::shared_ptr<BufferPool> pool_;
  std::unique_ptr<BatchStorage> s_;
  std::shared_ptr<const std::vector<FieldSpec>> fields_;
  mutable std::mutex mu_;
  mutable std::optional<void*> release_stream_;  // the consumer's stream, once it said which
};

// A finished step: its storage, or the error that stopped it.
struct StepResult {
  std::unique_ptr<BatchStorage> storage;
  std::exception_ptr error;
};

// A bare std::bad_alloc says nothing a user can act on: name the batch and what it needs.
std::exception_ptr out_of_memory_named(std::exception_ptr error, const Dataset& dataset,
                                       const LoaderOptions& options, uint64_t step) {
  try {
    std::rethrow_exception(error);
  } catch (const std::bad_alloc&) {
    const uint64_t n = std::max<uint64_t>(dataset.num_samples(), 1);
    const uint64_t per_batch = dataset.total_bytes() / n * options.batch_size;
    return std::make_exception_ptr(
        Error(ErrorCode::kIo,
              fmt::format("{}: out of memory building batch {} (batch_size {}, about {} MB each, "
                          "{} in flight): lower batch_size, prefetch or io.threads",
                          dataset.path().string(), step, options.batch_size, per_batch >> 20,
                          options.prefetch + options.io.threads),
              ENOMEM));
  } catch (...) {
    return error;
  }
}

// Queues the batch's copy to the device on this thread's stream; the consumer's stream waits
// for `copied` (Batch::use_on_stream), the host never does.
void copy_to_device(BatchStorage& s, memory::Stream& stream, int index) {
  if (!s.device) {
    s.device = std::make_unique<DeviceCopy>();
    s.device->copied = std::make_unique<memory::Event>(index);
    s.device->released = std::make_unique<memory::Event>(index);
  }
  DeviceCopy& d = *s.device;
  if (d.release_pending) {  // the consumer's last work on the device buffer
    d.released->synchronize();
    d.release_pending = false;
  }
  const size_t bytes = s.used_bytes();
  if (!d.buffer || d.buffer->size() < bytes)
    d.buffer = std::make_unique<memory::DeviceBuffer>(index, std::max<size_t>(bytes, 1));
  stream.copy_to_device(d.buffer->data(), s.data.data(), bytes);
  d.copied->record(stream.handle());
  d.copy_pending = true;
}

class LoaderImpl final : public Loader {
 public:
  LoaderImpl(LoaderParts parts, std::shared_ptr<const io::Faults> faults)
      : options_(std::move(parts.options)),
        faults_(std::move(faults)),
        dataset_(std::move(parts.dataset)),
        files_(std::move(parts.files)),
        fields_(std::move(parts.fields)),
        build_options_(std::move(parts.build)),
        pin_(parts.pin),
        token_(std::move(parts.token)),
        cache_(std::move(parts.cache)),
        server_(std::move(parts.server)),
        sampler_(options_.sampler_options(), dataset_->num_samples(), dataset_->shard_sizes()),
        rank_(options_.resolved_rank()),
        world_(options_.resolved_world_size()),
        traffic_(io::DeviceTraffic::for_path(dataset_->path())),
        checkpoint_bytes_at_open_(traffic_->written_bytes.load()),
        checkpoint_held_at_open_(traffic_->held_ns.load()) {
    build_options_.transform_skipped = &transform_skipped_;
    pool_ = std::make_shared<BufferPool>(options_.prefetch + options_.io.threads,
                                         options_.max_batches_held, pin_);
    peers_ = std::make_unique<PeerSet>(dataset_, options_.distributed, token_, options_.io.verify,
                                       &cancel_);
    builders_.resize(options_.io.threads);
    workers_ = std::make_unique<WorkerStats[]>(options_.io.threads);
    plan_ = sampler_.plan({0, 0}, rank_, world_);
    if (sampler_.num_batches(world_) == 0 && dataset_->num_samples() > 0)
      log_line(fmt::format(
          "drop_last: true and {} samples, fewer than one global batch of {} ({} rank{} x "
          "batch_size {}): every epoch is empty (drop_last: false delivers them)",
          dataset_->num_samples(), uint64_t{world_} * options_.batch_size, world_,
          world_ == 1 ? "" : "s", options_.batch_size));
    set_future();
  }

  ~LoaderImpl() override {
    stop_threads();
    pool_->detach();
  }

  std::shared_ptr<const Batch> next() override {
    if (!prepare(true)) return nullptr;
    // Past its limit the consumer gets no more batches, and waiting cannot help (only the
    // consumer can drop batches): say so now, not after the IO timeout. Holding exactly the
    // limit while asking for the next one is fine ("keep the last N").
    if (const size_t held = pool_->held(); held > options_.max_batches_held)
      fail(ErrorCode::kIo,
           "{}: the consumer holds {} batches (max_batches_held: {}) and asks for another: drop "
           "references to old batches (list(loader) keeps every batch; keep copies of what you "
           "need), or raise max_batches_held",
           dataset_->path().string(), held, options_.max_batches_held);
    const uint64_t step = delivered_;
    auto t0 = std::chrono::steady_clock::now();
    StepResult result;
    {
      std::unique_lock lock(mu_);
      while (!ready_.count(step)) {
        if (cv_.wait_until(lock, deadline()) == std::cv_status::timeout && !ready_.count(step))
          fail(ErrorCode::kIo, "{}", stalled_message(step));
      }
      result = std::move(ready_[step]);
      ready_.erase(step);
      // A failed batch is not delivered: state() must not count it, or a resume from it would
      // skip its samples (found by EioAtRandomPointsThenResumeLosesNoSample).
      if (!result.error) ++delivered_;
    }
    cv_.notify_all();
    auto t1 = std::chrono::steady_clock::now();
    stats_.wait_seconds += std::chrono::duration<double>(t1 - std::min(t0, *wait_since_)).count();
    wait_since_.reset();
    if (result.error) {
      failed_ = result.error;
      stop_threads();
      std::rethrow_exception(result.error);
    }
    pool_->note_delivered();
    stats_.batches += 1;
    stats_.samples += result.storage->indices.size();
    for (size_t f = 0; f < fields_->size(); ++f) stats_.bytes += result.storage->field_bytes[f];
    return std::make_shared<BatchImpl>(pool_, std::move(result.storage), fields_);
  }

  bool wait(std::chrono::milliseconds max_wait) override {
    if (!prepare(false)) return true;
    const uint64_t step = delivered_;
    auto until = std::min(deadline(), std::chrono::steady_clock::now() + max_wait);
    std::unique_lock lock(mu_);
    cv_.wait_until(lock, until, [&] { return ready_.count(step) > 0; });
    return ready_.count(step) > 0 || std::chrono::steady_clock::now() >= deadline();
  }

  void set_epoch(uint64_t epoch) override { restart({epoch, 0}); }
  uint64_t epoch() const override { return plan_.state_after(0).epoch; }
  uint64_t num_batches() const override { return plan_.num_batches(); }
  uint64_t batches_per_epoch() const override { return sampler_.num_batches(world_); }
  uint64_t batches_left() const override {
    return delivered_ >= plan_.num_batches() ? 0 : plan_.num_batches() - delivered_;
  }

  SamplerState state() const override {
    if (delivered_ >= plan_.num_batches()) return {epoch() + 1, 0};
    return plan_.state_after(delivered_);
  }

  void load_state(const SamplerState& state) override { restart(state); }
  const Dataset& dataset() const override { return *dataset_; }
  const LoaderOptions& options() const override { return options_; }

  LoaderStats stats() const override {
    LoaderStats s = stats_;
    std::lock_guard lock(mu_);
    s.engine = engine_;
    s.direct_io = files_->direct();
    s.pinned = pin_;
    s.batches_held = pool_->held();
    s.pinned_bytes = memory::pinned_bytes();
    s.device_bytes = memory::device_bytes();
    s.cpu_seconds = detail::process_cpu_seconds() - cpu_at_open_;
    add_up(service_ ? &service_->stats() : nullptr, {workers_.get(), options_.io.threads}, s);
    s.transform_skipped = transform_skipped_.load();
    s.checkpoint_bytes = traffic_->written_bytes.load() - checkpoint_bytes_at_open_;
    s.checkpoint_held_seconds =
        static_cast<double>(traffic_->held_ns.load() - checkpoint_held_at_open_) / 1e9;
    if (cache_) {
      cache::CacheStats c = cache_->stats();
      s.source_bytes = c.source_bytes;
      s.source_requests = c.source_requests;
      s.cache_hits = c.hits;
      s.cache_misses = c.misses;
    }
    return s;
  }

 private:
  // Starts the next epoch after the end of one was reported, and the loader threads. False
  // when the epoch is over (next() returns nullptr; `report_end`: it is doing so now). Rethrows
  // the error that stopped the loader.
  bool prepare(bool report_end) {
    if (failed_) std::rethrow_exception(failed_);
    if (epoch_done_) {
      epoch_done_ = false;
      restart({plan_.state_after(0).epoch + 1, 0});
    }
    if (delivered_ >= plan_.num_batches()) {
      epoch_done_ = report_end;
      return false;
    }
    if (!running_) start_threads();
    if (!wait_since_) wait_since_ = std::chrono::steady_clock::now();
    return true;
  }

  // The batch's own reads time out after io.timeout_ms and report which read; this is the
  // backstop for a loader thread that cannot even start, or a consumer that holds every buffer
  // (one second later), counted from the consumer's first wait for this batch.
  std::chrono::steady_clock::time_point deadline() const {
    return *wait_since_ + std::chrono::milliseconds(options_.io.timeout_ms) + io::kDrainGrace +
           std::chrono::seconds(1);
  }

  std::string stalled_message(uint64_t step) const {
    std::string where =
        fmt::format("{}: no batch after {} ms (epoch {}, batch {})", dataset_->path().string(),
                    options_.io.timeout_ms, plan_.state_after(0).epoch, step);
    if (pool_->exhausted_by_consumer())
      return fmt::format(
          "{}: the consumer holds {} batches (max_batches_held: {}); drop some so their buffers "
          "can be reused, or raise max_batches_held",
          where, pool_->held(), options_.max_batches_held);
    return where + ": reads are not completing";
  }

  // The cache's view of what comes: this plan, then the next epoch from its start.
  void set_future() {
    if (!cache_) return;
    cache_->set_future(plan_, sampler_.plan({plan_.state_after(0).epoch + 1, 0}, rank_, world_));
  }

  void start_threads() {
    // Started with the first batch (a loader that reads nothing warms nothing), and joined by
    // the destructor; one pass per loader.
    files_->start_warming();
    if (files_->direct() && !service_)
      service_ = std::make_unique<io::Service>(engine_options(), files_->fds(),
                                               [&](const std::string& line) { note_engine(line); });
    stop_ = false;
    cancel_ = false;
    for (uint32_t w = 0; w < options_.io.threads; ++w)
      threads_.emplace_back([this, w] { work(w); });
    running_ = true;
  }

  void stop_threads() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cancel_ = true;
    cv_.notify_all();
    if (cache_) cache_->wake();
    for (auto& t : threads_) t.join();
    threads_.clear();
    running_ = false;
    std::lock_guard lock(mu_);
    for (auto& [step, r] : ready_)
      if (r.storage) pool_->release(std::move(r.storage));
    ready_.clear();
  }

  void restart(const SamplerState& state) {
    RankPlan plan = sampler_.plan(state, rank_, world_);  // validates before anything stops
    stop_threads();
    plan_ = plan;
    set_future();
    delivered_ = 0;
    wait_since_.reset();
    epoch_done_ = false;
    failed_ = nullptr;
  }

  void publish(uint64_t step, StepResult result) {
    {
      std::lock_guard lock(mu_);
      ready_[step] = std::move(result);
    }
    cv_.notify_all();
  }

  void note_engine(const std::string& line) {
    std::lock_guard lock(mu_);
    if (engine_.empty()) {
      engine_ = line.substr(line.find(": ") + 2);
      if (!engine_logged_.exchange(true)) log_line(line);
    }
  }

  io::EngineOptions engine_options() const {
    io::EngineOptions o = read::engine_options(options_.io);
    o.faults = faults_;
    if (cache_)  // a failing cache disk: reads go to the source
      o.layer = [cache = cache_.get(), files = files_->fds()](std::unique_ptr<io::Engine> e) {
        return cache->layer(std::move(e), files);
      };
    return o;
  }

  void work(uint32_t worker) {
    detail::background_thread(fmt::format("sluice-load{}", worker));
    std::unique_ptr<io::Engine> engine;
    const uint32_t threads = options_.io.threads;
    const uint64_t window = std::max(options_.prefetch, threads);  // steps in flight
    try {
      if (!service_)
        engine = io::make_engine(engine_options(), files_->fds(),
                                 [&](const std::string& line) { note_engine(line); });
    } catch (...) {
      publish(worker, {nullptr, std::current_exception()});
      return;
    }
    WorkerStats& stats = workers_[worker];
    auto& builder = builders_[worker];
    if (!builder)
      builder = std::make_unique<BatchBuilder>(dataset_, build_options_, *peers_, service_.get(),
                                               &cancel_, stats);
    std::vector<SampleRef> refs;
    std::unique_ptr<memory::Stream> stream;  // device: cuda:N, this thread's copies
    auto t = std::chrono::steady_clock::now();
    // The time since the last lap goes to `stage`.
    auto lap = [&](WorkerStats::Stage stage) {
      const auto now = std::chrono::steady_clock::now();
      stats.add(stage, now - t);
      t = now;
    };
    for (uint64_t step = worker; step < plan_.num_batches(); step += threads) {
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return stop_ || step < delivered_ + window; });
        if (stop_) return;
      }
      lap(WorkerStats::kWindow);
      auto storage = pool_->acquire(stop_, mu_, cv_);
      if (!storage) return;
      try {
        if (storage->device && storage->device->copy_pending) {
          storage->device->copied->synchronize();  // the last copy out of these host bytes
          storage->device->copy_pending = false;
        }
        lap(WorkerStats::kBuffer);
        plan_.batch(step, refs);
        finish_metadata(step, refs, *storage);
        lap(WorkerStats::kPlan);
        if (cache_) {
          cache_->acquire(refs, &cancel_);
          lap(WorkerStats::kCache);
          struct Release {
            cache::SampleCache* cache;
            uint64_t step;
            std::span<const SampleRef> refs;
            ~Release() { cache->release(step, refs); }
          } release{cache_.get(), step, refs};
          io::DeviceTraffic::ReadsWaiting reading(*traffic_);  // checkpoint writes give way
          builder->build(refs, engine.get(), *storage);
        } else {
          io::DeviceTraffic::ReadsWaiting reading(*traffic_);
          builder->build(refs, engine.get(), *storage);
        }
        t = std::chrono::steady_clock::now();  // the builder accounted for its own time
        if (options_.device.kind == DeviceKind::kCuda) {
          if (!stream) stream = std::make_unique<memory::Stream>(options_.device.index);
          copy_to_device(*storage, *stream, options_.device.index);
          lap(WorkerStats::kDevice);
        }
        publish(step, {std::move(storage), nullptr});
        t = std::chrono::steady_clock::now();
      } catch (...) {
        if (builder->reads_in_flight()) {
          detail::keep_forever(storage.release());
          builder->leak_staging();
          detail::keep_forever(engine.release());
        } else {
          pool_->release(std::move(storage));
        }
        if (cancel_) return;
        publish(step, {nullptr,
                       out_of_memory_named(std::current_exception(), *dataset_, options_, step)});
        return;
      }
    }
  }

  void finish_metadata(uint64_t step, std::span<const SampleRef> refs, BatchStorage& out) {
    const size_t n = refs.size();
    out.indices.resize(n);
    out.padding.resize(n);
    for (size_t i = 0; i < n; ++i) {
      out.indices[i] = refs[i].index;
      out.padding[i] = refs[i].padding;
    }
    out.epoch = plan_.state_after(0).epoch;
    out.step = step;
  }

  // Set up once (loader_setup.h), in this order.
  LoaderOptions options_;
  std::shared_ptr<const io::Faults> faults_;  // tests only
  std::shared_ptr<Dataset> dataset_;
  std::unique_ptr<read::DatasetFiles> files_;  // what the threads read through
  std::shared_ptr<const std::vector<FieldSpec>> fields_;
  BuildOptions build_options_;  // what every thread's BatchBuilder is given
  bool pin_ = false;            // batch buffers page-locked (device: pinned / cuda:N)
  std::string token_;           // the cluster's shared token
  std::unique_ptr<cache::SampleCache> cache_;  // s3:// or cache.dir: the node cache
  std::unique_ptr<ShardServer> server_;        // distributed.listen: this node's shards for others
  Sampler sampler_;
  uint32_t rank_, world_;

  std::atomic<uint64_t> transform_skipped_{0};  // samples transform_errors: skip replaced
  std::shared_ptr<BufferPool> pool_;
  std::unique_ptr<PeerSet> peers_;  // distributed.peers: who serves the shards not on this node
  // Per loader thread number: its batch building (staging buffer, peer connections), kept
  // across epochs (threads are restarted for each; one thread of a number runs at a time).
  std::vector<std::unique_ptr<BatchBuilder>> builders_;
  std::unique_ptr<WorkerStats[]> workers_;              // per loader thread number, for stats()
  double cpu_at_open_ = detail::process_cpu_seconds();  // stats() reports the CPU used since
  // The device the dataset's files are on: checkpoint writes to it give way to this loader's
  // reads (io/priority.h); its write counters when this loader opened (stats() reports since).
  std::shared_ptr<io::DeviceTraffic> traffic_;
  uint64_t checkpoint_bytes_at_open_ = 0;
  uint64_t checkpoint_held_at_open_ = 0;

  // Consumer-side state (the consumer thread only).
  RankPlan plan_;
  uint64_t delivered_ = 0;
  bool epoch_done_ = false;
  // When the consumer began waiting for batch delivered_ (consumer thread only).
  std::optional<std::chrono::steady_clock::time_point> wait_since_;
  bool running_ = false;
  std::exception_ptr failed_;
  LoaderStats stats_;

  // Shared with loader threads, under mu_.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::map<uint64_t, StepResult> ready_;
  std::string engine_;
  std::atomic<bool> cancel_{false};
  std::atomic<bool> engine_logged_{false};
  std::vector<std::thread> threads_;
  // Direct I/O: one IO thread with one engine serves every loader thread (see io/service.h).
  std::unique_ptr<io::Service> service_;
};

}  // namespace
}  // namespace pipeline

std::unique_ptr<Loader> pipeline::open_loader(const LoaderOptions& options,
                                              std::shared_ptr<const io::Faults> faults) {
  return std::make_unique<pipeline::LoaderImpl>(set_up_loader(options), std::move(faults));
}

std::unique_ptr<Loader> Loader::open(const LoaderOptions& options) {
  return pipeline::open_loader(options, nullptr);
}

}  // namespace sluice
