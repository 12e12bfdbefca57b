#include "cache/sample_cache.h"

#include "common/errors.h"
#include "common/log.h"
#include "format/layout.h"
#include "index/internals.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <fstream>
#include <optional>
#include <sstream>

namespace sluice::cache {

namespace fs = std::filesystem;
using detail::fail;

namespace {
constexpr size_t kMaxFetchSamples = 1024;      // samples per fetch round
constexpr uint64_t kMaxFetchBytes = 64 << 20;  // bytes per fetch round
constexpr uint64_t kMaxRange = 8 << 20;        // one ranged read at most
constexpr uint64_t kMinWindow = 256;           // samples the fetch walk may run ahead, at least
constexpr auto kJournalEvery = std::chrono::seconds(10);
}  // namespace

SampleCache::SampleCache(std::shared_ptr<const Dataset> dataset,
                         std::unique_ptr<source::Source> source, Mirror mirror, CachePolicy policy,
                         uint64_t capacity, uint64_t fetch_size, uint32_t timeout_ms)
    : dataset_(std::move(dataset)),
      source_(std::move(source)),
      mirror_(std::move(mirror)),
      policy_(policy),
      capacity_(capacity),
      fetch_size_(fetch_size),
      timeout_(timeout_ms),
      packed_(dataset_->packed()) {
  const auto& objects = source_->objects();
  const fs::path data = mirror_.dir / "data";
  auto key_of = [&](const fs::path& p) -> uint32_t {
    if (objects.size() == 1 && objects[0].key.empty()) return 0;
    std::string key = p.lexically_relative(data).generic_string();
    auto found = source_->find(key);
    if (!found) fail(ErrorCode::kNotFound, "{}: no object {}", source_->url(), key);
    return *found;
  };
  for (uint32_t i = 0; i < objects.size(); ++i) {
    fs::path p =
        objects.size() == 1 && objects[0].key.empty() ? mirror_.path : data / objects[i].key;
    owned_fds_.push_back(detail::open_file(p, O_RDWR));
    object_fds_.push_back(owned_fds_.back().get());
  }
  if (dataset_->format() == DatasetFormat::kFiles) {
    for (uint64_t i = 0; i < dataset_->num_samples(); ++i)
      shard_object_.push_back(key_of(dataset_->path() / index::sample_file(*dataset_, i)));
  } else {
    for (const auto& s : dataset_->shards()) shard_object_.push_back(key_of(s.path));
  }
  const uint64_t n = dataset_->num_samples();
  state_.assign(n, kAbsent);
  checksum_.assign(packed_ ? 0 : n, 0);
  next_.assign(n, kNever);
  last_used_.assign(n, 0);
  if (mirror_.reused) load_journal();
  base_bytes_ = source_->bytes_read();  // the metadata that open_mirror fetched is not counted
  base_requests_ = source_->requests();
  saved_at_ = std::chrono::steady_clock::now();
  thread_ = std::thread([this] { fetch_loop(); });
}

SampleCache::~SampleCache() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  thread_.join();
  try {
    if (!mirror_.temporary) save_journal();
  } catch (const std::exception& e) {
    detail::log_line(std::string("cache: ") + e.what());
  }
  owned_fds_.clear();
  remove_mirror(mirror_);
}

uint32_t SampleCache::object_of(uint64_t sample) const {
  if (dataset_->format() == DatasetFormat::kFiles) return shard_object_[sample];
  return shard_object_[index::shard_of(*dataset_, sample)];
}

int SampleCache::fd_of(uint64_t sample) const { return object_fds_[object_of(sample)]; }

std::string SampleCache::name(uint64_t sample, uint64_t offset, uint64_t length) const {
  return fmt::format("{} [{}+{}] (sample {})", source_->name(object_of(sample)), offset, length,
                     sample);
}

uint64_t SampleCache::priority(uint64_t sample) const {
  if (policy_ == CachePolicy::kLru) return UINT64_MAX - 1 - last_used_[sample];
  return next_[sample] == kNever ? UINT64_MAX : next_[sample];
}

void SampleCache::push(uint64_t sample) {
  heap_.emplace_back(priority(sample), sample);
  std::push_heap(heap_.begin(), heap_.end());
}

void SampleCache::set_future(const RankPlan& current, const RankPlan& next) {
  std::lock_guard lock(mu_);
  order_.clear();
  step_start_.clear();
  std::vector<SampleRef> refs;
  for (uint64_t s = 0; s < current.num_batches(); ++s) {
    step_start_.push_back(order_.size());
    current.batch(s, refs);
    for (const auto& r : refs) order_.push_back(r.index);
  }
  step_start_.push_back(order_.size());
  for (uint64_t s = 0; s < next.num_batches(); ++s) {
    next.batch(s, refs);
    for (const auto& r : refs) order_.push_back(r.index);
  }
  if (order_.size() >= kNever)
    fail(ErrorCode::kUnsupported, "{}: the cache plans at most {} samples per rank and two epochs",
         source_->url(), kNever - 1);
  std::fill(next_.begin(), next_.end(), kNever);
  succ_.assign(order_.size(), kNever);
  for (size_t t = order_.size(); t-- > 0;) {
    succ_[t] = next_[order_[t]];
    next_[order_[t]] = static_cast<uint32_t>(t);
  }
  released_.assign(current.num_batches(), 0);
  now_ = cursor_ = first_unbuilt_ = 0;
  demand_.clear();
  heap_.clear();
  for (uint64_t s = 0; s < state_.size(); ++s)
    if (state_[s] == kPresent || state_[s] == kUnchecked) push(s);
  // Prefetching far ahead costs fetches even with the future known: a sample brought in long
  // before its use displaces one needed a little later, where fetching at its use would have
  // displaced one used in between (no longer needed this epoch). So the walk runs at most an
  // eighth of the capacity ahead of the oldest batch being built: enough requests in flight to
  // hide an object store's latency, close to Belady's count of fetches.
  const uint64_t n = std::max<uint64_t>(dataset_->num_samples(), 1);
  const uint64_t each = std::max<uint64_t>(dataset_->total_bytes() / n, 1);
  window_ = std::max<uint64_t>(capacity_ / 8 / each, kMinWindow);
  work_cv_.notify_all();
}

bool SampleCache::make_room(uint64_t bytes, uint64_t key, bool force) {
  std::vector<std::pair<uint64_t, uint64_t>> held;  // pinned: back in the heap afterwards
  bool ok = true;
  while (used_ + in_flight_ + bytes > capacity_) {
    if (heap_.empty()) {
      ok = force;
      break;
    }
    std::pop_heap(heap_.begin(), heap_.end());
    auto [p, s] = heap_.back();
    heap_.pop_back();
    if ((state_[s] != kPresent && state_[s] != kUnchecked) || priority(s) != p) continue;
    if (pinned_.count(s)) {
      held.emplace_back(p, s);
      continue;
    }
    if (!force && policy_ == CachePolicy::kClairvoyant && p <= key) {
      held.emplace_back(p, s);
      ok = false;
      break;
    }
    evict(s);
  }
  for (auto& h : held) {
    heap_.push_back(h);
    std::push_heap(heap_.begin(), heap_.end());
  }
  return ok;
}

void SampleCache::evict(uint64_t sample) {
  SampleExtent x = dataset_->extent(sample);
  // The hole reads as zeros, which no checksum matches: a stale journal cannot pass it off.
  if (fallocate(fd_of(sample), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                static_cast<off_t>(x.offset), static_cast<off_t>(x.size)) != 0 &&
      !degraded_) {
    degraded_ = true;
    detail::log_line(
        fmt::format("cache: {}: cannot punch out evicted samples ({}); the cache "
                    "directory may hold more than cache.capacity",
                    mirror_.dir.string(), detail::errno_text(errno)));
  }
  used_ -= x.size;
  state_[sample] = kAbsent;
  stats_.evictions += 1;
}

void SampleCache::take_neighbours(uint64_t sample, uint64_t begin, uint64_t end,
                                  std::vector<uint64_t>& out) {
  // The samples of this shard whose records lie wholly inside [begin, end).
  const ShardInfo& shard = dataset_->shards()[index::shard_of(*dataset_, sample)];
  uint64_t lo = shard.first_sample, hi = shard.first_sample + shard.num_samples;
  uint64_t first = lo, count = hi - lo;  // first sample with offset >= begin
  while (count > 0) {
    uint64_t half = count / 2;
    if (dataset_->extent(first + half).offset < begin) {
      first += half + 1;
      count -= half + 1;
    } else {
      count = half;
    }
  }
  for (uint64_t s = first; s < hi; ++s) {
    SampleExtent x = dataset_->extent(s);
    if (x.offset + x.size > end) break;
    if (state_[s] != kAbsent || next_[s] == kNever) continue;
    // lru knows no future to weigh them by: they take only free room.
    if (policy_ == CachePolicy::kLru ? used_ + in_flight_ + x.size > capacity_
                                     : !make_room(x.size, next_[s], false))
      continue;
    state_[s] = kFetching;
    in_flight_ += x.size;
    out.push_back(s);
  }
}

std::vector<uint64_t> SampleCache::plan_fetch() {
  std::vector<uint64_t> out;
  uint64_t bytes = 0;
  std::vector<std::pair<uint32_t, uint64_t>> blocks;  // this round's, to visit each once
  const bool blocked = fetch_size_ > 0 && dataset_->format() != DatasetFormat::kFiles;
  auto take = [&](uint64_t s, const SampleExtent& x) {
    state_[s] = kFetching;
    in_flight_ += x.size;
    bytes += x.size;
    out.push_back(s);
    if (!blocked) return;
    // The block around it: its other samples that the policy would keep come along in the
    // same ranged read; the read spans only from the first of them to the last.
    uint64_t begin = x.offset / fetch_size_ * fetch_size_;
    std::pair<uint32_t, uint64_t> id{object_of(s), begin};
    if (std::find(blocks.begin(), blocks.end(), id) != blocks.end()) return;
    blocks.push_back(id);
    const size_t before = out.size();
    take_neighbours(s, begin, begin + fetch_size_, out);
    for (size_t i = before; i < out.size(); ++i) bytes += dataset_->extent(out[i]).size;
  };
  for (uint64_t s : demand_) {
    if (state_[s] != kAbsent) continue;
    SampleExtent x = dataset_->extent(s);
    make_room(x.size, 0, true);
    take(s, x);
  }
  demand_.clear();
  const uint64_t limit = std::min<uint64_t>(order_.size(), now_ + window_);
  while (cursor_ < limit && out.size() < kMaxFetchSamples && bytes < kMaxFetchBytes) {
    uint64_t s = order_[cursor_];
    if (state_[s] != kAbsent) {
      ++cursor_;
      continue;
    }
    SampleExtent x = dataset_->extent(s);
    if (!make_room(x.size, next_[s], false)) break;  // all that is cached is needed sooner
    take(s, x);
    ++cursor_;
  }
  return out;
}

void SampleCache::fetch(const std::vector<uint64_t>& picked) {
  struct Item {
    uint64_t sample;
    uint32_t object;
    SampleExtent x;
    const std::byte* bytes = nullptr;
    uint32_t sum = 0;
  };
  std::vector<Item> items;
  for (uint64_t s : picked) items.push_back({s, object_of(s), dataset_->extent(s)});
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.object != b.object ? a.object < b.object : a.x.offset < b.x.offset;
  });
  // One ranged read per run of records: neighbours share it when only a packed record's
  // padding lies between them, or when they lie in the same fetch_size block (the gap is read
  // and dropped: one request costs an object store more than a block's bytes).
  struct Block {
    uint32_t object;
    uint64_t begin, end;
    uint64_t at = 0;  // where its bytes land in `buffer`
  };
  const uint64_t max_gap = packed_ ? dataset_->alignment() - 1 : 0;
  const bool blocked = fetch_size_ > 0 && dataset_->format() != DatasetFormat::kFiles;
  std::vector<Block> merged;
  std::vector<size_t> block_of_item;
  for (const Item& it : items) {
    uint64_t begin = it.x.offset, end = it.x.offset + it.x.size;
    if (!merged.empty()) {
      Block& b = merged.back();
      const bool near =
          begin <= b.end + max_gap || (blocked && begin / fetch_size_ == (b.end - 1) / fetch_size_);
      if (b.object == it.object && near && end - b.begin <= kMaxRange) {
        b.end = std::max(b.end, end);
        block_of_item.push_back(merged.size() - 1);
        continue;
      }
    }
    merged.push_back({it.object, begin, end});
    block_of_item.push_back(merged.size() - 1);
  }
  uint64_t total = 0;
  for (auto& b : merged) {
    b.at = total;
    total += b.end - b.begin;
  }
  std::vector<std::byte> buffer(total);
  std::vector<source::Range> ranges;
  for (const auto& b : merged)
    ranges.push_back({b.object, b.begin, b.end - b.begin, buffer.data() + b.at});
  for (size_t i = 0; i < items.size(); ++i) {
    const Block& b = merged[block_of_item[i]];
    items[i].bytes = buffer.data() + b.at + (items[i].x.offset - b.begin);
  }

  std::exception_ptr error;
  try {
    source_->read(ranges);
    for (Item& it : items) {
      std::span<const std::byte> record(it.bytes, it.x.size);
      it.sum = format::record_checksum(record.data(), record.size(), it.sample);
      if (packed_ && it.sum != it.x.checksum)
        fail(ErrorCode::kCorruption,
             "{}: checksum mismatch (stored {:08x}, fetched {:08x}): the object changed at the "
             "source since the dataset was opened, or the source returned wrong bytes",
             name(it.sample, it.x.offset, it.x.size), it.x.checksum, it.sum);
      if (!bypass_) {
        try {
          detail::write_full(object_fds_[it.object], record, "cache file",
                             static_cast<int64_t>(it.x.offset));
        } catch (const Error& e) {
          give_up_disk(
              fmt::format("cannot keep {}: {}", name(it.sample, it.x.offset, it.x.size), e.what()));
        }
      }
    }
  } catch (...) {
    error = std::current_exception();
  }
  std::lock_guard lock(mu_);
  for (const Item& it : items) {
    in_flight_ -= it.x.size;
    if (error || bypass_) {
      state_[it.sample] = kAbsent;
      continue;
    }
    state_[it.sample] = kPresent;
    if (!packed_) checksum_[it.sample] = it.sum;
    used_ += it.x.size;
    last_used_[it.sample] = ++tick_;
    push(it.sample);
  }
  if (error && !error_ && !bypass_) error_ = error;
  cv_.notify_all();
}

void SampleCache::give_up_disk(const std::string& why) {
  if (!bypass_.exchange(true))
    detail::log_line(fmt::format("cache: {}: {}; reading {} directly from now on, caching nothing",
                                 mirror_.dir.string(), why, source_->url()));
  std::lock_guard lock(mu_);
  demand_.clear();
  cv_.notify_all();
  work_cv_.notify_all();
}

void SampleCache::read_source(std::span<SourceRead> reads) {
  const auto& objects = source_->objects();
  const fs::path data = mirror_.dir / "data";
  std::vector<source::Range> ranges;
  std::vector<size_t> which;
  for (size_t i = 0; i < reads.size(); ++i) {
    SourceRead& r = reads[i];
    // The descriptor's path names the object: the mirror holds each at its key.
    std::error_code ec;
    fs::path p = fs::read_symlink(fmt::format("/proc/self/fd/{}", r.fd), ec);
    std::optional<uint32_t> object;
    if (!ec && objects.size() == 1 && objects[0].key.empty() && p == mirror_.path)
      object = 0;
    else if (!ec)
      object = source_->find(p.lexically_relative(data).generic_string());
    if (!object) {
      detail::log_line(
          fmt::format("cache: [internal] {}:{}: descriptor {} ({}) is not a mirror "
                      "file of {}",
                      __FILE__, __LINE__, r.fd, p.string(), source_->url()));
      r.result = -EIO;
      continue;
    }
    const uint64_t size = objects[*object].size;
    const uint64_t length = r.offset >= size ? 0 : std::min<uint64_t>(r.length, size - r.offset);
    r.result = static_cast<int32_t>(length);
    if (length == 0) continue;
    ranges.push_back({*object, r.offset, length, r.dest});
    which.push_back(i);
  }
  try {
    source_->read(ranges);
  } catch (const Error& e) {
    detail::log_line(fmt::format("cache: {}", e.what()));
    for (size_t i : which) reads[i].result = -(e.sys_errno() ? e.sys_errno() : EIO);
  }
}

namespace {
// See SampleCache::layer. Reads given up on the disk are answered at the next flush or reap,
// all of one batch in one Source::read (many ranged reads in flight).
class FallbackEngine final : public io::Engine {
 public:
  FallbackEngine(std::unique_ptr<io::Engine> inner, SampleCache& cache, std::vector<int> files)
      : inner_(std::move(inner)), cache_(cache), files_(std::move(files)) {}

  std::string describe() const override { return inner_->describe(); }
  uint32_t queue_depth() const override { return inner_->queue_depth(); }
  bool register_buffer(std::span<std::byte> b) override { return inner_->register_buffer(b); }

  int submit(const io::Request& r) override {
    if (cache_.disk_given_up()) {
      pending_.push_back(r);
      return 0;
    }
    int rc = inner_->submit(r);
    if (rc == 0) sent_.emplace(r.tag, r);
    return rc;
  }
  int flush() override {
    serve();
    return inner_->flush();
  }
  int reap(std::span<io::Completion> out, std::chrono::milliseconds timeout) override {
    serve();
    size_t n = 0;
    if (!sent_.empty()) {
      int got = inner_->reap(out, ready_.empty() ? timeout : std::chrono::milliseconds(0));
      if (got < 0) return got;
      for (int i = 0; i < got; ++i) {
        auto it = sent_.find(out[i].tag);
        if (it == sent_.end()) {  // not ours to judge
          out[n++] = out[i];
          continue;
        }
        io::Request r = it->second;
        sent_.erase(it);
        const int32_t rc = out[i].result;
        if (rc < 0 && rc != -EAGAIN && rc != -EINTR && rc != -ECANCELED) {
          cache_.give_up_disk(
              fmt::format("a read of the cache failed: {}", detail::errno_text(-rc)));
          pending_.push_back(r);
          continue;
        }
        out[n++] = out[i];
      }
      serve();
    }
    while (n < out.size() && !ready_.empty()) {
      out[n++] = ready_.front();
      ready_.pop_front();
    }
    return static_cast<int>(n);
  }

 private:
  void serve() {
    if (pending_.empty()) return;
    std::vector<SampleCache::SourceRead> reads;
    for (const io::Request& r : pending_)
      reads.push_back({r.fd >= 0 ? r.fd : files_.at(r.file), r.offset, r.length, r.dest});
    cache_.read_source(reads);
    for (size_t i = 0; i < reads.size(); ++i) ready_.push_back({pending_[i].tag, reads[i].result});
    pending_.clear();
  }

  std::unique_ptr<io::Engine> inner_;
  SampleCache& cache_;
  std::vector<int> files_;
  std::unordered_map<uint64_t, io::Request> sent_;  // to the disk, not yet completed
  std::vector<io::Request> pending_;                // for the source
  std::deque<io::Completion> ready_;
};
}  // namespace

std::unique_ptr<io::Engine> SampleCache::layer(std::unique_ptr<io::Engine> engine,
                                               std::vector<int> files) {
  return std::make_unique<FallbackEngine>(std::move(engine), *this, std::move(files));
}

bool SampleCache::check_cached(uint64_t sample) {
  SampleExtent x = dataset_->extent(sample);
  std::vector<std::byte> bytes(x.size);
  try {
    if (detail::pread_full(fd_of(sample), bytes, x.offset, "cache file") != x.size) return false;
  } catch (const Error&) {
    return false;
  }
  uint32_t sum = format::record_checksum(bytes.data(), bytes.size(), sample);
  std::lock_guard lock(mu_);
  return sum == (packed_ ? x.checksum : checksum_[sample]);
}

void SampleCache::wake() {
  std::lock_guard lock(mu_);
  cv_.notify_all();
}

void SampleCache::acquire(std::span<const SampleRef> refs, const std::atomic<bool>* cancel) {
  std::unique_lock lock(mu_);
  if (error_) std::rethrow_exception(error_);
  if (bypass_) {  // the batch reads the source (layer())
    for (const auto& r : refs) pinned_[r.index] += 1;
    stats_.misses += refs.size();
    return;
  }
  std::vector<uint64_t> unchecked;
  bool asked = false;
  for (const auto& r : refs) {
    uint64_t s = r.index;
    pinned_[s] += 1;
    switch (state_[s]) {
      case kPresent:
        stats_.hits += 1;
        break;
      case kUnchecked:
        state_[s] = kFetching;  // nobody else takes it while it is read back
        unchecked.push_back(s);
        break;
      case kAbsent:
        demand_.push_back(s);
        asked = true;
        [[fallthrough]];
      case kFetching:
        stats_.misses += 1;
        break;
    }
  }
  if (!unchecked.empty()) {
    lock.unlock();
    std::vector<uint8_t> ok;
    for (uint64_t s : unchecked) ok.push_back(check_cached(s));
    lock.lock();
    for (size_t i = 0; i < unchecked.size(); ++i) {
      uint64_t s = unchecked[i];
      if (ok[i]) {
        state_[s] = kPresent;
        stats_.hits += 1;
      } else {  // not what the journal said: fetch it again
        state_[s] = kAbsent;
        used_ -= dataset_->extent(s).size;
        demand_.push_back(s);
        stats_.misses += 1;
        asked = true;
      }
    }
  }
  if (asked) work_cv_.notify_all();
  auto all_present = [&] {
    if (error_ || bypass_ || (cancel && *cancel)) return true;
    for (const auto& r : refs)
      if (state_[r.index] != kPresent) return false;
    return true;
  };
  bool done = cv_.wait_for(lock, timeout_, all_present);
  if (bypass_ && !error_) return;
  const bool cancelled = cancel && *cancel;
  if (!done || error_ || cancelled) {
    for (const auto& r : refs)
      if (--pinned_[r.index] == 0) pinned_.erase(r.index);
    if (error_) std::rethrow_exception(error_);
    if (cancelled) fail(ErrorCode::kIo, "{}: cancelled", source_->url());
    uint64_t missing = 0;
    for (const auto& r : refs)
      if (state_[r.index] != kPresent) missing = r.index;
    fail(ErrorCode::kIo, "{}: sample {} not fetched within {} ms", source_->url(), missing,
         timeout_.count());
  }
}

void SampleCache::release(uint64_t step, std::span<const SampleRef> refs) {
  std::lock_guard lock(mu_);
  for (const auto& r : refs) {
    auto it = pinned_.find(r.index);
    if (it != pinned_.end() && --it->second == 0) pinned_.erase(it);
    last_used_[r.index] = ++tick_;
  }
  if (step < released_.size() && !released_[step]) {
    released_[step] = 1;
    for (uint64_t t = step_start_[step]; t < step_start_[step + 1]; ++t) {
      uint64_t s = order_[t];
      if (next_[s] == t) next_[s] = succ_[t];
    }
    while (first_unbuilt_ < released_.size() && released_[first_unbuilt_]) ++first_unbuilt_;
    now_ = step_start_[first_unbuilt_];
  }
  for (const auto& r : refs)
    if (state_[r.index] == kPresent) push(r.index);
  work_cv_.notify_all();
}

CacheStats SampleCache::stats() const {
  std::lock_guard lock(mu_);
  CacheStats s = stats_;
  s.source_bytes = source_->bytes_read() - base_bytes_;
  s.source_requests = source_->requests() - base_requests_;
  s.cached_bytes = used_;
  return s;
}

void SampleCache::fetch_loop() {
  std::unique_lock lock(mu_);
  bool blocked = false;  // the last walk stopped: the cache is full of sooner needs
  uint64_t seen_now = 0;
  while (!stop_) {
    auto has_work = [&] {
      if (stop_) return true;
      if (bypass_) return false;
      if (!demand_.empty()) return true;
      if (error_ || order_.empty()) return false;
      if (blocked && now_ == seen_now) return false;
      return cursor_ < std::min<uint64_t>(order_.size(), now_ + window_);
    };
    work_cv_.wait_for(lock, std::chrono::seconds(1), has_work);
    if (stop_) break;
    if (!has_work()) continue;
    seen_now = now_;
    std::vector<uint64_t> samples;
    try {  // a bad index entry (an extent outside its shard) stops the cache, not the process
      samples = plan_fetch();
    } catch (...) {
      if (!error_) error_ = std::current_exception();
      cv_.notify_all();
      continue;
    }
    blocked = samples.empty() || cursor_ < std::min<uint64_t>(order_.size(), now_ + window_);
    if (samples.empty()) continue;
    lock.unlock();
    try {
      fetch(samples);
    } catch (...) {
      std::lock_guard relock(mu_);
      if (!error_) error_ = std::current_exception();
      cv_.notify_all();
    }
    if (!mirror_.temporary && std::chrono::steady_clock::now() - saved_at_ > kJournalEvery) {
      try {
        save_journal();
      } catch (const std::exception& e) {
        detail::log_line(std::string("cache: ") + e.what());
      }
      saved_at_ = std::chrono::steady_clock::now();
    }
    lock.lock();
  }
}

// The journal: which samples the mirror holds (and, for formats without stored checksums, what
// they hash to), so that a restarted process reuses them. Written whole and renamed into
// place; each entry is checked again before its first use, so a stale one costs a fetch.
void SampleCache::save_journal() {
  std::ostringstream out;
  {
    std::lock_guard lock(mu_);
    out << "sluice-cache 1 " << state_.size() << "\n";
    for (uint64_t s = 0; s < state_.size(); ++s)
      if (state_[s] == kPresent || state_[s] == kUnchecked)
        out << s << ' ' << (packed_ ? 0 : checksum_[s]) << '\n';
  }
  fs::path tmp = mirror_.dir / "journal.tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << out.str();
    if (!f.flush()) fail(ErrorCode::kIo, "cache: cannot write {}", tmp.string());
  }
  fs::rename(tmp, mirror_.dir / "journal");
}

void SampleCache::load_journal() {
  std::ifstream in(mirror_.dir / "journal");
  std::string magic;
  uint64_t version = 0, n = 0;
  if (!(in >> magic >> version >> n) || magic != "sluice-cache" || version != 1 ||
      n != state_.size())
    return;  // another dataset's or an older layout: start empty
  uint64_t s = 0;
  uint32_t sum = 0;
  uint64_t count = 0;
  while (in >> s >> sum) {
    if (s >= n || state_[s] != kAbsent) continue;
    uint64_t size = dataset_->extent(s).size;
    if (used_ + size > capacity_) break;
    state_[s] = kUnchecked;
    if (!packed_) checksum_[s] = sum;
    used_ += size;
    ++count;
  }
  detail::log_line(fmt::format("cache: {} samples ({} MB) found in {} from an earlier run", count,
                               used_ >> 20, mirror_.dir.string()));
}

}  // namespace sluice::cache
