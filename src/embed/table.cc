// EmbeddingTable: gathers through the IO service (O_DIRECT, pages sorted and merged), updates
// through the journal into a map of rows not yet in place, flushes that write them in place
// with whole-unit writes, and the row cache (README.md).

#include <sluice/embedding.h>
#include <sluice/error.h>

#include "common/errors.h"
#include "common/file.h"
#include "common/keep.h"
#include "embed/journal.h"
#include "embed/layout.h"
#include "embed/row_cache.h"
#include "io/service.h"
#include "memory/aligned_buffer.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

namespace sluice {

namespace fs = std::filesystem;
using detail::fail;

namespace {

constexpr uint64_t kMaxRead = 256 << 10;  // adjacent units merged into reads up to this
constexpr uint64_t kFlushUnits = 4096;    // units read, patched and written per round
constexpr size_t kLookupChunk = 512;      // a gather's lookups per hold of the state lock

// Gathers' disk reads share it; a flush's writes take it alone, and a flush that waits keeps new
// reads out (std::shared_mutex, glibc's rwlock, lets a stream of readers starve it).
class DiskGate {
 public:
  void lock_shared() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return !writing_ && writers_waiting_ == 0; });
    ++readers_;
  }
  void unlock_shared() {
    std::lock_guard lock(mu_);
    if (--readers_ == 0) cv_.notify_all();
  }
  void lock() {
    std::unique_lock lock(mu_);
    ++writers_waiting_;
    cv_.wait(lock, [&] { return !writing_ && readers_ == 0; });
    --writers_waiting_;
    writing_ = true;
  }
  void unlock() {
    std::lock_guard lock(mu_);
    writing_ = false;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t readers_ = 0, writers_waiting_ = 0;
  bool writing_ = false;
};

// `ids` sorted, without repeats (ids the look-ahead hands over are already: no sort then).
std::vector<int64_t> sorted_unique(std::span<const int64_t> ids) {
  std::vector<int64_t> out(ids.begin(), ids.end());
  if (!std::is_sorted(out.begin(), out.end())) std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// One read or write of whole units: `units` units of shard `shard` from unit `first`.
struct Run {
  uint32_t shard;
  uint64_t first, units;
  uint64_t at;  // where in the staging buffer
};

class Table final : public EmbeddingTable {
 public:
  Table(const fs::path& path, const EmbeddingOptions& options)
      : path_(path), options_(options), layout_(embed::read_manifest(path)) {
    open_lock();
    open_shards();
    io::EngineOptions eo;
    eo.queue_depth = std::max<uint32_t>(1, options_.queue_depth);
    service_.emplace(eo, fds_, [](const std::string&) {});
    if (options_.cache_bytes >= layout_.row_bytes)
      cache_.emplace(options_.cache_bytes / layout_.row_bytes, layout_.row_bytes, options_.policy);
    // What a crash left in the journal: complete records are updates; in place now when this
    // process may write, else held in memory (a read-only view of the same rows).
    const fs::path journal = path_ / embed::kJournal;
    std::error_code ec;
    if (fs::exists(journal, ec))
      embed::Journal::replay(journal, layout_.row_bytes,
                             [&](auto ids, auto rows) { hold_dirty(ids, rows, false); });
    if (!options_.readonly) {
      journal_.emplace(journal);
      std::lock_guard lock(write_mu_);
      apply_and_clear();
    }
  }

  uint64_t rows() const override { return layout_.rows; }
  uint32_t dim() const override { return layout_.dim; }
  EmbeddingDtype dtype() const override { return layout_.dtype; }
  size_t row_bytes() const override { return layout_.row_bytes; }
  const fs::path& path() const override { return path_; }

  void gather(std::span<const int64_t> ids, std::span<std::byte> out) override {
    const size_t rb = layout_.row_bytes;
    check_size(ids, out, "gather");
    check_ids(ids, "gather");
    const std::vector<int64_t> unique = sorted_unique(ids);
    // Ids already sorted and unique (the look-ahead's): the rows go straight into `out`.
    const bool in_place = std::equal(ids.begin(), ids.end(), unique.begin(), unique.end());
    std::vector<std::byte> scratch(in_place ? 0 : unique.size() * rb);
    gather_unique(unique, in_place ? out : std::span<std::byte>(scratch), nullptr);
    for (size_t i = 0; !in_place && i < ids.size(); ++i) {
      const size_t u = static_cast<size_t>(std::lower_bound(unique.begin(), unique.end(), ids[i]) -
                                           unique.begin());
      std::memcpy(out.data() + i * rb, scratch.data() + u * rb, rb);
    }
    std::lock_guard lock(state_mu_);
    stats_.ids += ids.size();
  }

  uint64_t gather_held(std::span<const int64_t> ids, std::span<std::byte> rows) override {
    check_size(ids, rows, "gather_held");
    check_ids(ids, "gather_held");
    for (size_t i = 1; i < ids.size(); ++i)
      if (ids[i] <= ids[i - 1])
        fail(ErrorCode::kInvalidArgument,
             "embedding table {}: gather_held: ids must be sorted without repeats; id {} at "
             "position {} follows {}",
             path_.string(), ids[i], i, ids[i - 1]);
    uint64_t hold = 0;
    gather_unique(ids, rows, &hold);
    std::lock_guard lock(state_mu_);
    stats_.ids += ids.size();
    return hold;
  }

  void update(std::span<const int64_t> ids, std::span<const std::byte> values) override {
    if (options_.readonly)
      fail(ErrorCode::kInvalidArgument, "embedding table {}: opened read-only; update refused",
           path_.string());
    if (values.size() != ids.size() * layout_.row_bytes)
      fail(ErrorCode::kInvalidArgument,
           "embedding table {}: update of {} ids with {} bytes (expected {} x {})", path_.string(),
           ids.size(), values.size(), ids.size(), layout_.row_bytes);
    check_ids(ids, "update");
    if (ids.empty()) return;
    std::lock_guard lock(write_mu_);
    journal_->append(ids, values);
    hold_dirty(ids, values, true);
    if (dirty_rows_.size() > options_.max_dirty_bytes) apply_and_clear();
  }

  void flush() override {
    if (options_.readonly) return;
    std::lock_guard lock(write_mu_);
    apply_and_clear();
  }

  void feed_future(std::span<const int64_t> ids) override {
    check_ids(ids, "feed_future");
    const std::vector<int64_t> unique = sorted_unique(ids);
    std::lock_guard lock(state_mu_);
    if (cache_) cache_->feed(unique);
  }

  void release(uint64_t hold) override {
    std::lock_guard lock(holds_mu_);  // not state_mu_: a delivery never waits for a gather
    holds_.erase(hold);
  }

  EmbeddingStats stats() const override {
    std::lock_guard lock(state_mu_);
    EmbeddingStats s = stats_;
    s.cached_rows = cache_ ? cache_->size() : 0;
    s.future_batches = cache_ ? cache_->future_batches() : 0;
    return s;
  }

 private:
  void open_lock() {
    lock_ = detail::open_file(path_ / embed::kLock, O_RDONLY | O_CREAT, 0644);
    if (::flock(lock_.get(), (options_.readonly ? LOCK_SH : LOCK_EX) | LOCK_NB) != 0) {
      if (errno == EWOULDBLOCK)
        fail(ErrorCode::kInvalidArgument,
             "embedding table {}: {} by another process (one process may open it read-write, "
             "or any number read-only)",
             path_.string(), options_.readonly ? "open read-write" : "open");
      if (errno != ENOLCK && errno != EOPNOTSUPP)
        detail::fail_errno(errno, "lock " + (path_ / embed::kLock).string());
    }
  }

  void open_shards() {
    const int mode = options_.readonly ? O_RDONLY : O_RDWR;
    for (uint64_t s = 0; s < layout_.shards(); ++s) {
      const fs::path file = path_ / layout_.shard_files[s];
      int fd = ::open(file.c_str(), mode | O_DIRECT | O_CLOEXEC);
      if (fd < 0 && errno == EINVAL) fd = ::open(file.c_str(), mode | O_CLOEXEC);  // no O_DIRECT
      if (fd < 0) detail::fail_errno(errno, "open " + file.string());
      shards_.emplace_back(fd);
      fds_.push_back(fd);
      const uint64_t size = detail::file_size(fd, file.string());
      if (size != layout_.shard_bytes(s))
        fail(ErrorCode::kCorruption, "{}: {} bytes, the manifest says {} (truncated?)",
             file.string(), size, layout_.shard_bytes(s));
    }
  }

  void check_size(std::span<const int64_t> ids, std::span<const std::byte> rows,
                  const char* what) const {
    if (rows.size() != ids.size() * layout_.row_bytes)
      fail(ErrorCode::kInvalidArgument,
           "embedding table {}: {} of {} ids into {} bytes (expected {} x {})", path_.string(),
           what, ids.size(), rows.size(), ids.size(), layout_.row_bytes);
  }

  // Rows `unique` (sorted, no repeats) into `rows`, each from the dirty map, the cache or disk.
  // `hold`: also register them as a hold (gather_held), under the same lock as the lookups, so
  // every update after the lookups patches them; rows read from disk then go in only where no
  // update patched them meanwhile.
  void gather_unique(std::span<const int64_t> unique, std::span<std::byte> rows, uint64_t* hold) {
    const size_t rb = layout_.row_bytes;
    std::vector<uint32_t> misses;  // indices into unique, ascending (so by shard and unit)
    uint64_t flushes_seen, hits = 0, dirty = 0;
    Hold* h = nullptr;  // std::map nodes stay put; only this gather touches it until it returns
    {
      std::lock_guard lock(state_mu_);
      if (cache_) cache_->consume(unique);
      flushes_seen = flushes_;
      if (hold) {
        std::lock_guard held(holds_mu_);
        *hold = ++last_hold_;
        h = &holds_
                 .emplace(*hold, Hold{std::vector<int64_t>(unique.begin(), unique.end()), rows,
                                      std::vector<bool>(unique.size(), false)})
                 .first->second;
      }
    }
    // The lookups a chunk at a time, so that updates (and their patches) wait for one chunk,
    // not for the whole gather. A row patched since the hold began is already current.
    for (size_t begin = 0; begin < unique.size(); begin += kLookupChunk) {
      std::lock_guard lock(state_mu_);
      const size_t end = std::min(unique.size(), begin + kLookupChunk);
      for (auto u = static_cast<uint32_t>(begin); u < end; ++u) {
        if (h && h->patched[u]) continue;
        const std::byte* from = nullptr;
        if (auto d = dirty_.find(unique[u]); d != dirty_.end()) {
          from = dirty_rows_.data() + d->second;
          ++dirty;
        } else if (cache_ && (from = cache_->find(unique[u]))) {
          ++hits;
        }
        if (from)
          std::memcpy(rows.data() + u * rb, from, rb);
        else
          misses.push_back(u);
      }
    }
    uint64_t ios = 0, bytes = 0;
    if (!misses.empty()) {
      std::vector<std::byte> fresh(hold ? misses.size() * rb : 0);  // the k-th miss at k * rb
      read_rows(unique, misses, hold ? std::span<std::byte>(fresh) : rows, hold != nullptr, &ios,
                &bytes);
      std::lock_guard lock(state_mu_);
      if (h) {
        for (size_t k = 0; k < misses.size(); ++k)
          if (!h->patched[misses[k]])
            std::memcpy(rows.data() + misses[k] * rb, fresh.data() + k * rb, rb);
      }
      // A flush since the lookup may have put newer rows in place than were read; a row
      // updated since is newer in the dirty map: neither goes into the cache.
      if (cache_ && flushes_ == flushes_seen)
        for (uint32_t u : misses)
          if (!dirty_.count(unique[u])) cache_->offer(unique[u], rows.data() + u * rb);
    }
    std::lock_guard lock(state_mu_);
    stats_.gathers++;
    stats_.unique_ids += unique.size();
    stats_.rows_from_disk += misses.size();
    stats_.read_ios += ios;
    stats_.bytes_read += bytes;
    stats_.cache_hits += hits;
    stats_.dirty_hits += dirty;
  }

  void check_ids(std::span<const int64_t> ids, const char* what) const {
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || static_cast<uint64_t>(ids[i]) >= layout_.rows)
        fail(ErrorCode::kInvalidArgument,
             "embedding table {}: {}: id {} at position {} is out of range (the table has {} "
             "rows)",
             path_.string(), what, ids[i], i, layout_.rows);
  }

  // Rows not yet in place: the newest value of each, seen by gathers and in the cache.
  // `counted`: an update of this process (stats' rows_updated), not a replayed journal record.
  void hold_dirty(std::span<const int64_t> ids, std::span<const std::byte> rows, bool counted) {
    const size_t rb = layout_.row_bytes;
    std::lock_guard lock(state_mu_);
    for (size_t i = 0; i < ids.size(); ++i) {
      auto [it, added] = dirty_.try_emplace(ids[i], dirty_rows_.size());
      if (added) dirty_rows_.resize(dirty_rows_.size() + rb);
      std::memcpy(dirty_rows_.data() + it->second, rows.data() + i * rb, rb);
      if (cache_) cache_->offer(ids[i], rows.data() + i * rb);  // kept past the flush
    }
    if (counted) stats_.rows_updated += ids.size();
    std::lock_guard held(holds_mu_);
    if (!holds_.empty()) patch_holds(ids, rows);
  }

  // Under state_mu_ and holds_mu_: rows just updated written into the holds that have them. Both
  // sides in id order, merged: a hold of U rows costs U + ids.size() steps, whatever the overlap.
  void patch_holds(std::span<const int64_t> ids, std::span<const std::byte> rows) {
    const size_t rb = layout_.row_bytes;
    // Positions in id order, a repeated id's in update order: its last copy is the one that stays.
    std::vector<uint32_t> order(ids.size());
    for (uint32_t i = 0; i < order.size(); ++i) order[i] = i;
    if (!std::is_sorted(ids.begin(), ids.end()))
      std::stable_sort(order.begin(), order.end(),
                       [&](uint32_t a, uint32_t b) { return ids[a] < ids[b]; });
    for (auto& [number, h] : holds_) {
      size_t at = 0;
      for (uint32_t i : order) {
        while (at < h.ids.size() && h.ids[at] < ids[i]) ++at;
        if (at == h.ids.size()) break;
        if (h.ids[at] != ids[i]) continue;
        std::memcpy(h.rows.data() + at * rb, rows.data() + i * rb, rb);
        h.patched[at] = true;
      }
    }
  }

  // The units that hold `wanted` (indices into `ids`, ascending), merged into runs.
  std::vector<Run> runs_of(std::span<const int64_t> ids, std::span<const uint32_t> wanted,
                           uint64_t* staging_bytes) const {
    std::vector<Run> runs;
    uint64_t at = 0;
    const uint64_t max_units = std::max<uint64_t>(1, kMaxRead / layout_.unit_bytes);
    for (uint32_t w : wanted) {
      const uint64_t row = static_cast<uint64_t>(ids[w]);
      const auto shard = static_cast<uint32_t>(layout_.shard_of(row));
      const uint64_t unit = layout_.unit_of(row);
      if (!runs.empty()) {
        Run& last = runs.back();
        if (last.shard == shard && unit < last.first + last.units) continue;  // same unit
        if (last.shard == shard && unit == last.first + last.units && last.units < max_units) {
          ++last.units;
          at += layout_.unit_bytes;
          continue;
        }
      }
      runs.push_back({shard, unit, 1, at});
      at += layout_.unit_bytes;
    }
    *staging_bytes = at;
    return runs;
  }

  std::vector<io::ReadOp> ops_of(std::span<const Run> runs, std::byte* staging, bool write) const {
    std::vector<io::ReadOp> ops;
    ops.reserve(runs.size());
    for (const Run& r : runs) {
      io::ReadOp op;
      op.file = r.shard;
      op.offset = r.first * layout_.unit_bytes;
      op.length = static_cast<uint32_t>(r.units * layout_.unit_bytes);
      op.dest = staging + r.at;
      op.write = write;
      ops.push_back(op);
    }
    return ops;
  }

  // Runs `ops` through the IO service; a failure names the shard file and range.
  void run_ops(std::span<const io::ReadOp> ops, memory::AlignedBuffer& staging, const char* what) {
    const auto deadline =
        std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.timeout_ms);
    io::ReadFailure f = service_->read_all(ops, deadline);
    if (f.error == 0) return;
    if (f.in_flight) staging.leak();  // reads may still land in it
    const io::ReadOp& op = ops[std::min(f.op, ops.size() - 1)];
    const std::string where = fmt::format(
        "{} [{}+{}]", (path_ / layout_.shard_files[op.file]).string(), op.offset, op.length);
    if (f.error == -ETIMEDOUT)
      fail(ErrorCode::kIo, "{} {}: not done in {} ms (device hung?)", what, where,
           options_.timeout_ms);
    if (f.error == -ENODATA)
      fail(ErrorCode::kCorruption, "{} {}: the file ends early (truncated?)", what, where);
    detail::fail_errno(-f.error, fmt::format("{} {}", what, where));
  }

  // Rows unique[misses[k]] from disk into `rows`: at misses[k] * row_bytes, or at k * row_bytes
  // when `compact`.
  void read_rows(std::span<const int64_t> unique, std::span<const uint32_t> misses,
                 std::span<std::byte> rows, bool compact, uint64_t* ios, uint64_t* bytes) {
    uint64_t staging_bytes = 0;
    const std::vector<Run> runs = runs_of(unique, misses, &staging_bytes);
    memory::AlignedBuffer staging;
    staging.reserve(staging_bytes);
    const std::vector<io::ReadOp> ops = ops_of(runs, staging.data(), false);
    {
      std::shared_lock disk(disk_mu_);  // no flush writes these units meanwhile
      run_ops(ops, staging, "read");
    }
    size_t r = 0;
    for (size_t k = 0; k < misses.size(); ++k) {
      const uint32_t u = misses[k];
      const uint64_t row = static_cast<uint64_t>(unique[u]);
      const auto shard = static_cast<uint32_t>(layout_.shard_of(row));
      const uint64_t unit = layout_.unit_of(row);
      while (runs[r].shard != shard || unit >= runs[r].first + runs[r].units) ++r;
      const std::byte* from = staging.data() + runs[r].at +
                              (unit - runs[r].first) * layout_.unit_bytes +
                              layout_.offset_in_unit(row);
      std::memcpy(rows.data() + (compact ? k : u) * layout_.row_bytes, from, layout_.row_bytes);
    }
    *ios = ops.size();
    *bytes = staging_bytes;
  }

  // Under write_mu_: the journal made durable, then every dirty row written in place (whole
  // units: read, patched, written), the shards fsynced, and only then the journal emptied
  // and the rows dropped from the dirty map. A crash anywhere replays the journal on open.
  void apply_and_clear() {
    if (dirty_.empty()) {
      if (journal_ && journal_->bytes() > 0) journal_->clear();
      return;
    }
    if (journal_) journal_->sync();
    std::vector<int64_t> ids;
    ids.reserve(dirty_.size());
    for (const auto& [id, at] : dirty_) ids.push_back(id);  // dirty_ changes only under write_mu_
    std::sort(ids.begin(), ids.end());
    std::vector<bool> touched(layout_.shards(), false);
    {
      std::unique_lock disk(disk_mu_);
      for (size_t begin = 0; begin < ids.size();) {
        // The next kFlushUnits units' worth of rows.
        size_t end = begin;
        std::vector<uint32_t> wanted;
        uint64_t units = 0, last_key = UINT64_MAX;
        while (end < ids.size()) {
          const uint64_t row = static_cast<uint64_t>(ids[end]);
          const uint64_t key = layout_.shard_of(row) << 40 | layout_.unit_of(row);
          if (key != last_key) {
            if (units == kFlushUnits) break;
            ++units;
            last_key = key;
          }
          wanted.push_back(static_cast<uint32_t>(end));
          ++end;
        }
        write_units(ids, wanted, touched);
        begin = end;
      }
    }
    for (uint64_t s = 0; s < layout_.shards(); ++s)
      if (touched[s]) detail::fsync_or_throw(fds_[s], (path_ / layout_.shard_files[s]).string());
    {
      std::lock_guard lock(state_mu_);
      dirty_.clear();
      dirty_rows_.clear();
      dirty_rows_.shrink_to_fit();
      ++flushes_;
      ++stats_.flushes;
    }
    if (journal_) journal_->clear();
  }

  void write_units(std::span<const int64_t> ids, std::span<const uint32_t> wanted,
                   std::vector<bool>& touched) {
    uint64_t staging_bytes = 0;
    // One unit per run: a unit whose every row is dirty is not read first.
    std::vector<Run> runs;
    for (uint32_t w : wanted) {
      const uint64_t row = static_cast<uint64_t>(ids[w]);
      const auto shard = static_cast<uint32_t>(layout_.shard_of(row));
      const uint64_t unit = layout_.unit_of(row);
      if (runs.empty() || runs.back().shard != shard || runs.back().first != unit) {
        runs.push_back({shard, unit, 1, staging_bytes});
        staging_bytes += layout_.unit_bytes;
      }
    }
    memory::AlignedBuffer staging;
    staging.reserve(staging_bytes);
    std::vector<Run> partial;
    std::vector<uint64_t> dirty_in(runs.size(), 0);
    {
      size_t r = 0;
      for (uint32_t w : wanted) {
        const uint64_t row = static_cast<uint64_t>(ids[w]);
        while (runs[r].shard != layout_.shard_of(row) || runs[r].first != layout_.unit_of(row)) ++r;
        ++dirty_in[r];
      }
    }
    for (size_t r = 0; r < runs.size(); ++r) {
      const uint64_t first_row =
          runs[r].shard * layout_.rows_per_shard + runs[r].first * layout_.rows_per_unit;
      const uint64_t in_unit = std::min(layout_.rows_per_unit, layout_.rows - first_row);
      if (dirty_in[r] < in_unit)
        partial.push_back(runs[r]);
      else
        std::memset(staging.data() + runs[r].at, 0, layout_.unit_bytes);
    }
    if (!partial.empty()) run_ops(ops_of(partial, staging.data(), false), staging, "read");
    size_t r = 0;
    for (uint32_t w : wanted) {
      const uint64_t row = static_cast<uint64_t>(ids[w]);
      while (runs[r].shard != layout_.shard_of(row) || runs[r].first != layout_.unit_of(row)) ++r;
      std::memcpy(staging.data() + runs[r].at + layout_.offset_in_unit(row),
                  dirty_rows_.data() + dirty_.at(ids[w]), layout_.row_bytes);
      touched[runs[r].shard] = true;
    }
    run_ops(ops_of(runs, staging.data(), true), staging, "write");
  }

  fs::path path_;
  EmbeddingOptions options_;
  embed::Layout layout_;
  detail::UniqueFd lock_;
  std::vector<detail::UniqueFd> shards_;
  std::vector<int> fds_;
  std::optional<io::Service> service_;
  std::optional<embed::Journal> journal_;

  std::mutex write_mu_;                          // updates and flushes, one at a time
  DiskGate disk_mu_;                             // gathers' reads (shared) against a flush's writes
  mutable std::mutex state_mu_;                  // what follows
  std::unordered_map<int64_t, uint64_t> dirty_;  // id -> offset in dirty_rows_
  std::vector<std::byte> dirty_rows_;
  std::optional<embed::RowCache> cache_;
  uint64_t flushes_ = 0;
  EmbeddingStats stats_;
  // Rows handed out later (gather_held), by number: updates write into them until released.
  struct Hold {
    std::vector<int64_t> ids;  // ascending
    std::span<std::byte> rows;
    std::vector<bool> patched;  // by an update since the hold began: already current
  };
  // The map under holds_mu_ (taken after state_mu_); a hold's rows and patched flags under
  // state_mu_ too (written by updates, which hold both).
  std::mutex holds_mu_;
  std::map<uint64_t, Hold> holds_;
  uint64_t last_hold_ = 0;
};

}  // namespace

std::unique_ptr<EmbeddingTable> EmbeddingTable::open(const fs::path& path,
                                                     const EmbeddingOptions& options) {
  return std::make_unique<Table>(path, options);
}

}  // namespace sluice
