#include "cache/sample_cache.h"

#include "common/errors.h"
#include "common/log.h"
#include "common/thread.h"
#include "format/layout.h"
#include "index/internals.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace sluice::cache {

namespace fs = std::filesystem;
using detail::fail;

namespace {
constexpr size_t kMaxFetchSamples = 1024;      // samples per fetch round
constexpr uint64_t kMaxFetchBytes = 64 << 20;  // bytes per fetch round
constexpr uint64_t kMaxRange = 8 << 20;        // one ranged read at most
constexpr uint64_t kMinWindow = 256;           // samples the fetch walk may run ahead, at least
constexpr size_t kCheckThreads = 4;            // threads that check a restarted cache's samples
// A process that does not lead looks this often whether it can (the leader ended).
constexpr auto kSlice = std::chrono::milliseconds(100);
// A batch still waiting asks the leader again this often (a new leader knows no demand).
constexpr auto kAskAgain = std::chrono::seconds(1);
// The leader looks this often which processes ended (their futures no longer count).
constexpr auto kAliveEvery = std::chrono::seconds(1);
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
      packed_(dataset_->packed()),
      future_(mirror_.dir, dataset_->num_samples()) {
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
  last_used_.assign(n, 0);

  // When no other process holds a slot, nobody maps the shared state (a process that only
  // opened the mirror, as `sluice inspect` does, does not): it is taken over as the first would.
  bool alone = true;
  slot_lock_ = NodeFuture::claim_slot(mirror_.dir, slot_, alone);
  shared_ =
      std::make_unique<SharedState>(mirror_.dir, n, mirror_.identity, mirror_.first_user || alone);
  if (shared_->restored())
    detail::log_line(fmt::format(
        "cache: {} samples found in {} from an earlier run (each checked before its first use)",
        shared_->restored(), mirror_.dir.string()));
  leader_lock_ = detail::open_file(mirror_.dir / "leader.lock", O_RDWR | O_CREAT);
  // The mirror's open lock: released now that the state is mapped; taken shared to evict, so
  // that nothing is punched out while another process opens the mirror (mirror.cc).
  open_lock_ = std::move(mirror_.open_lock);
  if (open_lock_)
    flock(open_lock_.get(), LOCK_UN);
  else
    open_lock_ = detail::open_file(mirror_.dir / "open.lock", O_RDWR | O_CREAT);
  {
    std::unique_lock lock(*shared_);
    shared_->header().processes[slot_] = {static_cast<int32_t>(getpid()), 0, 0};
  }
  base_bytes_ = source_->bytes_read();  // the metadata that open_mirror fetched is not counted
  base_requests_ = source_->requests();
  thread_ = std::thread([this] { fetch_loop(); });
}

SampleCache::~SampleCache() {
  {
    std::unique_lock lock(*shared_);
    stop_ = true;
    shared_->notify();
  }
  thread_.join();  // a leader finishes its fetch round, then hands over
  {
    std::unique_lock lock(*shared_);
    shared_->header().processes[slot_] = {};
    shared_->notify();
  }
  shared_.reset();
  leader_lock_.reset();
  slot_lock_.reset();
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
  const uint32_t next = future_.next_use(sample);
  return next == NodeFuture::kNever ? UINT64_MAX : next;
}

void SampleCache::push(uint64_t sample) {
  heap_.emplace_back(priority(sample), sample);
  std::push_heap(heap_.begin(), heap_.end());
}

void SampleCache::fail_all(const std::exception_ptr& error) {
  auto& h = shared_->header();
  if (h.error_code) return;
  std::string what;
  uint32_t code = static_cast<uint32_t>(ErrorCode::kIo);
  try {
    std::rethrow_exception(error);
  } catch (const Error& e) {
    code = static_cast<uint32_t>(e.code());
    what = e.what();
  } catch (const std::exception& e) {
    what = e.what();
  }
  what.resize(std::min(what.size(), sizeof(h.error) - 1));
  std::memcpy(h.error, what.c_str(), what.size() + 1);
  h.error_code = code;
  shared_->notify();
}

void SampleCache::rethrow() const {
  const auto& h = shared_->header();
  if (h.error_code) throw Error(static_cast<ErrorCode>(h.error_code), std::string(h.error));
}

bool SampleCache::disk_given_up() const {
  return __atomic_load_n(&shared_->header().bypass, __ATOMIC_ACQUIRE) != 0;
}

void SampleCache::set_future(const RankPlan& current, const RankPlan& next) {
  std::vector<uint64_t> steps, order;
  std::vector<SampleRef> refs;
  for (const RankPlan* plan : {&current, &next}) {
    for (uint64_t s = 0; s < plan->num_batches(); ++s) {
      steps.push_back(order.size());
      plan->batch(s, refs);
      for (const auto& r : refs) order.push_back(r.index);
    }
  }
  steps.push_back(order.size());
  if (order.size() >= NodeFuture::kNever)
    fail(ErrorCode::kUnsupported, "{}: the cache plans at most {} samples per node and two epochs",
         source_->url(), NodeFuture::kNever - 1);
  std::string why;
  {
    std::unique_lock lock(*shared_);
    released_.assign(current.num_batches(), 0);
    first_unbuilt_ = 0;
    ProcessRecord& me = shared_->header().processes[slot_];
    me.first_unbuilt = 0;
    try {
      if (!disk_given_up()) {
        NodeFuture::write(mirror_.dir, slot_, me.gen + 1, steps, order);
        me.gen += 1;
      }
    } catch (const Error& e) {
      why = e.what();
    }
    shared_->notify();
  }
  if (!why.empty()) give_up_disk("cannot write this process's future order: " + why);
}

// The node's future was built again: its positions start over.
void SampleCache::replan() {
  cursor_ = 0;
  heap_.clear();
  for (uint64_t s = 0; s < shared_->samples(); ++s)
    if ((*shared_)[s].state == kPresent || (*shared_)[s].state == kUnchecked) push(s);
  // Prefetching far ahead costs fetches even with the future known: a sample brought in long
  // before its use displaces one needed a little later, where fetching at its use would have
  // displaced one used in between (no longer needed this epoch). So the walk runs at most an
  // eighth of the capacity ahead of the oldest batch being built: enough requests in flight to
  // hide an object store's latency, close to Belady's count of fetches. At least kMinWindow
  // per process: a step of the union holds a batch of each.
  const uint64_t n = std::max<uint64_t>(dataset_->num_samples(), 1);
  const uint64_t each = std::max<uint64_t>(dataset_->total_bytes() / n, 1);
  window_ = std::max<uint64_t>(capacity_ / 8 / each,
                               kMinWindow * std::max<uint64_t>(future_.processes(), 1));
}

// Taking the lead: what an earlier leader left in flight (it was killed) is absent again.
void SampleCache::lead() {
  used_ = in_flight_ = 0;
  for (uint64_t s = 0; s < shared_->samples(); ++s) {
    SampleRecord& r = (*shared_)[s];
    if (r.state == kFetching) r.state = kAbsent;
    if (r.state == kPresent || r.state == kUnchecked) used_ += dataset_->extent(s).size;
  }
  shared_->header().cached_bytes = used_;
  demand_.clear();
  checked_alive_ = {};
}

bool SampleCache::refresh() {
  auto& h = shared_->header();
  const auto now = std::chrono::steady_clock::now();
  const bool check = now - checked_alive_ > kAliveEvery;
  if (check) checked_alive_ = now;
  const uint64_t was = future_.now();
  const bool rebuilt = future_.refresh(h.processes, slot_, check);
  if (rebuilt) replan();
  future_.advance(h.processes, [&](uint64_t s) {
    last_used_[s] = ++tick_;
    const uint8_t state = (*shared_)[s].state;
    if (state == kPresent || state == kUnchecked) push(s);
  });
  cursor_ = std::max(cursor_, future_.now());
  for (uint32_t k = 0; k < h.demand_count; ++k) demand_.push_back(h.demand[k]);
  h.demand_count = 0;
  return rebuilt || future_.now() != was;
}

bool SampleCache::make_room(uint64_t bytes, uint64_t key, bool force) {
  if (used_ + in_flight_ + bytes <= capacity_) return true;
  // Nothing is punched out while another process opens the mirror (it scans its metadata).
  if (flock(open_lock_.get(), LOCK_SH | LOCK_NB) != 0) return force;
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
    const SampleRecord& r = (*shared_)[s];
    if ((r.state != kPresent && r.state != kUnchecked) || priority(s) != p) continue;
    if (r.pins) {
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
  flock(open_lock_.get(), LOCK_UN);
  for (auto& h : held) {
    heap_.push_back(h);
    std::push_heap(heap_.begin(), heap_.end());
  }
  return ok;
}

void SampleCache::evict(uint64_t sample) {
  SampleExtent x = dataset_->extent(sample);
  // The hole reads as zeros, which no checksum matches: a stale state file cannot pass it off.
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
  (*shared_)[sample].state = kAbsent;
  stats_.evictions += 1;
}

void SampleCache::plan_fetch(std::vector<uint64_t>& out, std::vector<uint64_t>& recheck) {
  uint64_t bytes = 0;
  std::vector<std::pair<uint32_t, uint64_t>> blocks;  // this round's, to visit each once
  const bool blocked = fetch_size_ > 0 && dataset_->format() != DatasetFormat::kFiles;
  auto take = [&](uint64_t s, const SampleExtent& x) {
    (*shared_)[s].state = kFetching;
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
  // Cached by an earlier run: read back and checked (outside the lock) before it is present.
  auto check = [&](uint64_t s) {
    (*shared_)[s].state = kFetching;
    bytes += dataset_->extent(s).size;
    recheck.push_back(s);
  };
  for (uint64_t s : demand_) {
    if (s >= shared_->samples()) continue;
    const uint8_t state = (*shared_)[s].state;
    if (state == kUnchecked) check(s);
    if (state != kAbsent) continue;
    SampleExtent x = dataset_->extent(s);
    make_room(x.size, 0, true);
    take(s, x);
  }
  demand_.clear();
  const std::vector<uint64_t>& order = future_.order();
  const uint64_t limit = std::min<uint64_t>(order.size(), future_.now() + window_);
  while (cursor_ < limit && out.size() + recheck.size() < kMaxFetchSamples &&
         bytes < kMaxFetchBytes) {
    uint64_t s = order[cursor_];
    const uint8_t state = (*shared_)[s].state;
    if (state == kUnchecked) check(s);
    if (state != kAbsent) {
      ++cursor_;
      continue;
    }
    SampleExtent x = dataset_->extent(s);
    if (!make_room(x.size, future_.next_use(s), false))
      break;  // all that is cached is needed sooner
    take(s, x);
    ++cursor_;
  }
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
  const SampleExtent own = dataset_->extent(sample);
  uint64_t span_begin = own.offset, span_end = own.offset + own.size;
  for (uint64_t s = first; s < hi; ++s) {
    SampleExtent x = dataset_->extent(s);
    if (x.offset + x.size > end) break;
    if ((*shared_)[s].state != kAbsent || future_.next_use(s) == NodeFuture::kNever) continue;
    // lru knows no future to weigh them by: they take only free room.
    if (policy_ == CachePolicy::kLru ? used_ + in_flight_ + x.size > capacity_
                                     : !make_room(x.size, future_.next_use(s), false))
      continue;
    (*shared_)[s].state = kFetching;
    in_flight_ += x.size;
    out.push_back(s);
    span_begin = std::min(span_begin, x.offset);
    span_end = std::max(span_end, x.offset + x.size);
  }
  // What lies between them is read anyway: kept too where there is free room, though no known
  // future needs it (another rank's future not yet told, an epoch beyond the next). It is the
  // first to go when room is needed.
  for (uint64_t s = first; s < hi; ++s) {
    SampleExtent x = dataset_->extent(s);
    if (x.offset + x.size > span_end) break;
    if (x.offset < span_begin || (*shared_)[s].state != kAbsent) continue;
    if (used_ + in_flight_ + x.size > capacity_) break;
    (*shared_)[s].state = kFetching;
    in_flight_ += x.size;
    out.push_back(s);
  }
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
  // A packed record's padding runs to the next aligned offset; a wider gap holds other records
  // (another round's, another rank's), which are not read twice.
  const uint64_t align = packed_ ? std::max<uint64_t>(dataset_->alignment(), 1) : 1;
  const bool blocked = fetch_size_ > 0 && dataset_->format() != DatasetFormat::kFiles;
  std::vector<Block> merged;
  std::vector<size_t> block_of_item;
  for (const Item& it : items) {
    uint64_t begin = it.x.offset, end = it.x.offset + it.x.size;
    if (!merged.empty()) {
      Block& b = merged.back();
      const bool near = begin <= (b.end + align - 1) / align * align ||
                        (blocked && begin / fetch_size_ == (b.end - 1) / fetch_size_);
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
      if (!disk_given_up()) {
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
  std::unique_lock lock(*shared_);
  const bool bypass = disk_given_up();
  for (const Item& it : items) {
    in_flight_ -= it.x.size;
    SampleRecord& r = (*shared_)[it.sample];
    if (error || bypass) {
      r.state = kAbsent;
      continue;
    }
    r.state = kPresent;
    if (!packed_) r.checksum = it.sum;
    used_ += it.x.size;
    last_used_[it.sample] = ++tick_;
    push(it.sample);
  }
  shared_->header().cached_bytes = used_;
  if (error && !bypass) fail_all(error);
  shared_->notify();
}

void SampleCache::give_up_disk(const std::string& why) {
  if (!told_bypass_.exchange(true))
    detail::log_line(fmt::format("cache: {}: {}; reading {} directly from now on, caching nothing",
                                 mirror_.dir.string(), why, source_->url()));
  std::unique_lock lock(*shared_);
  __atomic_store_n(&shared_->header().bypass, 1u, __ATOMIC_RELEASE);
  demand_.clear();
  shared_->notify();
}

bool SampleCache::check_cached(uint64_t sample, uint32_t checksum) {
  SampleExtent x = dataset_->extent(sample);
  std::vector<std::byte> bytes(x.size);
  try {
    if (detail::pread_full(fd_of(sample), bytes, x.offset, "cache file") != x.size) return false;
  } catch (const Error&) {
    return false;
  }
  uint32_t sum = format::record_checksum(bytes.data(), bytes.size(), sample);
  return sum == (packed_ ? x.checksum : checksum);
}

void SampleCache::wake() {
  std::unique_lock lock(*shared_);
  shared_->notify();
}

void SampleCache::acquire(std::span<const SampleRef> refs, const std::atomic<bool>* cancel) {
  std::unique_lock lock(*shared_);
  rethrow();
  auto& h = shared_->header();
  for (const auto& r : refs) {
    SampleRecord& rec = (*shared_)[r.index];
    if (rec.pins < UINT16_MAX) rec.pins += 1;
  }
  if (disk_given_up()) {  // the batch reads the source (layer())
    if (!told_bypass_.exchange(true))
      detail::log_line(fmt::format("cache: {} was given up by another process; reading {} directly",
                                   mirror_.dir.string(), source_->url()));
    stats_.misses += refs.size();
    return;
  }
  // The missing samples go to the leader (this process's fetch thread, or another's).
  auto ask = [&] {
    bool asked = false;
    for (const auto& r : refs) {
      const uint8_t state = (*shared_)[r.index].state;
      if (state != kAbsent && state != kUnchecked) continue;
      if (h.demand_count < SharedState::kDemand) h.demand[h.demand_count++] = r.index;
      asked = true;
    }
    if (asked) shared_->notify();
  };
  for (const auto& r : refs) {
    if ((*shared_)[r.index].state == kPresent)
      stats_.hits += 1;
    else
      stats_.misses += 1;
  }
  ask();
  const auto start = std::chrono::steady_clock::now();
  auto asked_at = start;
  bool done = false;
  while (true) {
    done = true;
    for (const auto& r : refs) done = done && (*shared_)[r.index].state == kPresent;
    if (done || h.error_code || disk_given_up() || (cancel && *cancel)) break;
    const auto now = std::chrono::steady_clock::now();
    if (now - start >= timeout_) break;
    if (now - asked_at >= kAskAgain) {
      ask();
      asked_at = now;
    }
    shared_->wait(lock, std::min<std::chrono::milliseconds>(
                            kSlice, std::chrono::duration_cast<std::chrono::milliseconds>(
                                        timeout_ - (now - start))));
  }
  if (done || (disk_given_up() && !h.error_code)) return;
  for (const auto& r : refs) {
    SampleRecord& rec = (*shared_)[r.index];
    if (rec.pins) rec.pins -= 1;
  }
  rethrow();
  if (cancel && *cancel) fail(ErrorCode::kIo, "{}: cancelled", source_->url());
  uint64_t missing = 0;
  for (const auto& r : refs)
    if ((*shared_)[r.index].state != kPresent) missing = r.index;
  fail(ErrorCode::kIo, "{}: sample {} not fetched within {} ms", source_->url(), missing,
       timeout_.count());
}

void SampleCache::release(uint64_t step, std::span<const SampleRef> refs) {
  std::unique_lock lock(*shared_);
  for (const auto& r : refs) {
    SampleRecord& rec = (*shared_)[r.index];
    if (rec.pins) rec.pins -= 1;
  }
  if (step < released_.size() && !released_[step]) {
    released_[step] = 1;
    while (first_unbuilt_ < released_.size() && released_[first_unbuilt_]) ++first_unbuilt_;
    shared_->header().processes[slot_].first_unbuilt = first_unbuilt_;
  }
  shared_->notify();
}

CacheStats SampleCache::stats() const {
  std::unique_lock lock(*shared_);
  CacheStats s = stats_;
  s.source_bytes = source_->bytes_read() - base_bytes_;
  s.source_requests = source_->requests() - base_requests_;
  s.cached_bytes = shared_->header().cached_bytes;
  return s;
}

void SampleCache::fetch_loop() {
  detail::background_thread("sluice-fetch");
  std::unique_lock lock(*shared_);
  auto& h = shared_->header();
  bool blocked = false;  // the last walk stopped: the cache is full of sooner needs
  auto walk_end = [&] {
    return std::min<uint64_t>(future_.order().size(), future_.now() + window_);
  };
  while (!stop_) {
    if (!leader_) {
      if (flock(leader_lock_.get(), LOCK_EX | LOCK_NB) != 0) {
        shared_->wait(lock, kSlice);
        continue;
      }
      leader_ = true;
      lead();
    }
    try {
      if (refresh()) blocked = false;  // the future moved: look again
    } catch (...) {
      fail_all(std::current_exception());
    }
    const bool bypass = disk_given_up();
    auto has_work = [&] {
      if (bypass || h.error_code) return false;
      if (!demand_.empty()) return true;
      return !blocked && cursor_ < walk_end();
    };
    if (!has_work()) {
      demand_.clear();
      shared_->wait(lock, kSlice);
      continue;
    }
    std::vector<uint64_t> picked, recheck;
    try {  // a bad index entry (an extent outside its shard) stops the cache, not the process
      plan_fetch(picked, recheck);
    } catch (...) {
      fail_all(std::current_exception());
      continue;
    }
    blocked = (picked.empty() && recheck.empty()) || cursor_ < walk_end();
    if (picked.empty() && recheck.empty()) continue;
    std::vector<uint32_t> sums;
    for (uint64_t s : recheck) sums.push_back((*shared_)[s].checksum);
    lock.unlock();
    // Read back and hashed on several cores: a restarted job's first epoch waits on these.
    std::vector<uint8_t> ok(recheck.size());
    {
      const size_t n = std::min<size_t>(
          {kCheckThreads, std::thread::hardware_concurrency(), (recheck.size() + 15) / 16});
      std::vector<std::jthread> pool;
      for (size_t t = 0; t < n; ++t)
        pool.emplace_back([&, t] {
          for (size_t i = t; i < recheck.size(); i += n) ok[i] = check_cached(recheck[i], sums[i]);
        });
    }
    try {
      fetch(picked);
    } catch (...) {
      std::unique_lock relock(*shared_);
      fail_all(std::current_exception());
    }
    lock.lock();
    for (size_t i = 0; i < recheck.size(); ++i) {
      const uint64_t s = recheck[i];
      if (ok[i]) {
        (*shared_)[s].state = kPresent;
        push(s);
      } else {  // not what it was when cached: fetched again
        (*shared_)[s].state = kAbsent;
        used_ -= dataset_->extent(s).size;
        demand_.push_back(s);
      }
    }
    h.cached_bytes = used_;
    shared_->notify();
  }
  if (leader_) flock(leader_lock_.get(), LOCK_UN);
}

}  // namespace sluice::cache
