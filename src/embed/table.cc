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
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <unordered_map>
#include <vector>

namespace sluice {

namespace fs = std::filesystem;
using detail::fail;

namespace {

constexpr uint64_t kMaxRead = 256 << 10;  // adjacent units merged into reads up to this
constexpr uint64_t kFlushUnits = 4096;    // units read, patched and written per round

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
                             [&](auto ids, auto rows) { hold_dirty(ids, rows); });
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
    if (out.size() != ids.size() * rb)
      fail(ErrorCode::kInvalidArgument,
           "embedding table {}: gather of {} ids into {} bytes (expected {} x {})", path_.string(),
           ids.size(), out.size(), ids.size(), rb);
    check_ids(ids, "gather");
    const std::vector<int64_t> unique = sorted_unique(ids);
    // Ids already sorted and unique (the look-ahead's): the rows go straight into `out`.
    const bool in_place = std::equal(ids.begin(), ids.end(), unique.begin(), unique.end());
    std::vector<std::byte> scratch(in_place ? 0 : unique.size() * rb);
    std::span<std::byte> rows = in_place ? out : std::span<std::byte>(scratch);
    std::vector<uint32_t> misses;  // indices into unique, ascending (so by shard and unit)
    uint64_t flushes_seen, hits = 0, dirty = 0;
    {
      std::lock_guard lock(state_mu_);
      if (cache_) cache_->consume(unique);
      flushes_seen = flushes_;
      for (uint32_t u = 0; u < unique.size(); ++u) {
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
      read_rows(unique, misses, rows, &ios, &bytes);
      std::lock_guard lock(state_mu_);
      // A flush since the lookup may have put newer rows in place than were read; a row
      // updated since is newer in the dirty map: neither goes into the cache.
      if (cache_ && flushes_ == flushes_seen)
        for (uint32_t u : misses)
          if (!dirty_.count(unique[u])) cache_->offer(unique[u], rows.data() + u * rb);
    }
    for (size_t i = 0; !in_place && i < ids.size(); ++i) {
      const size_t u = static_cast<size_t>(std::lower_bound(unique.begin(), unique.end(), ids[i]) -
                                           unique.begin());
      std::memcpy(out.data() + i * rb, rows.data() + u * rb, rb);
    }
    std::lock_guard lock(state_mu_);
    stats_.gathers++;
    stats_.ids += ids.size();
    stats_.unique_ids += unique.size();
    stats_.rows_from_disk += misses.size();
    stats_.read_ios += ios;
    stats_.bytes_read += bytes;
    stats_.cache_hits += hits;
    stats_.dirty_hits += dirty;
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
    hold_dirty(ids, values);
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

  uint64_t mark() override {
    std::lock_guard lock(state_mu_);
    marks_.insert(update_seq_);
    return update_seq_;
  }

  std::vector<uint64_t> stale(std::span<const int64_t> ids, uint64_t mark) const override {
    std::vector<uint64_t> out;
    std::lock_guard lock(state_mu_);
    if (updated_at_.empty() || update_seq_ == mark) return out;
    for (size_t i = 0; i < ids.size(); ++i)
      if (auto it = updated_at_.find(ids[i]); it != updated_at_.end() && it->second > mark)
        out.push_back(i);
    return out;
  }

  size_t refresh(std::span<const int64_t> ids, std::span<std::byte> rows, uint64_t mark) override {
    const size_t rb = layout_.row_bytes;
    if (rows.size() != ids.size() * rb)
      fail(ErrorCode::kInvalidArgument,
           "embedding table {}: refresh of {} ids in {} bytes (expected {} x {})", path_.string(),
           ids.size(), rows.size(), ids.size(), rb);
    const std::vector<uint64_t> positions = stale(ids, mark);
    if (positions.empty()) return 0;
    std::vector<int64_t> again(positions.size());
    for (size_t k = 0; k < positions.size(); ++k) again[k] = ids[positions[k]];
    std::vector<std::byte> fresh(again.size() * rb);
    gather(again, fresh);
    for (size_t k = 0; k < positions.size(); ++k)
      std::memcpy(rows.data() + positions[k] * rb, fresh.data() + k * rb, rb);
    return positions.size();
  }

  void release(uint64_t mark) override {
    std::lock_guard lock(state_mu_);
    if (auto it = marks_.find(mark); it != marks_.end()) marks_.erase(it);
    if (marks_.empty()) {
      updated_at_.clear();
    } else if (updated_at_.size() > 2 * pruned_size_ + 1024) {
      const uint64_t oldest = *marks_.begin();
      std::erase_if(updated_at_, [&](const auto& e) { return e.second <= oldest; });
      pruned_size_ = updated_at_.size();
    }
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

  void check_ids(std::span<const int64_t> ids, const char* what) const {
    for (size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || static_cast<uint64_t>(ids[i]) >= layout_.rows)
        fail(ErrorCode::kInvalidArgument,
             "embedding table {}: {}: id {} at position {} is out of range (the table has {} "
             "rows)",
             path_.string(), what, ids[i], i, layout_.rows);
  }

  // Rows not yet in place: the newest value of each, seen by gathers and in the cache.
  void hold_dirty(std::span<const int64_t> ids, std::span<const std::byte> rows) {
    const size_t rb = layout_.row_bytes;
    std::lock_guard lock(state_mu_);
    for (size_t i = 0; i < ids.size(); ++i) {
      auto [it, added] = dirty_.try_emplace(ids[i], dirty_rows_.size());
      if (added) dirty_rows_.resize(dirty_rows_.size() + rb);
      std::memcpy(dirty_rows_.data() + it->second, rows.data() + i * rb, rb);
      if (cache_) cache_->offer(ids[i], rows.data() + i * rb);  // kept past the flush
    }
    stats_.rows_updated += ids.size();
    ++update_seq_;
    if (!marks_.empty())
      for (int64_t id : ids) updated_at_[id] = update_seq_;
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

  void read_rows(std::span<const int64_t> unique, std::span<const uint32_t> misses,
                 std::span<std::byte> rows, uint64_t* ios, uint64_t* bytes) {
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
    for (uint32_t u : misses) {
      const uint64_t row = static_cast<uint64_t>(unique[u]);
      const auto shard = static_cast<uint32_t>(layout_.shard_of(row));
      const uint64_t unit = layout_.unit_of(row);
      while (runs[r].shard != shard || unit >= runs[r].first + runs[r].units) ++r;
      const std::byte* from = staging.data() + runs[r].at +
                              (unit - runs[r].first) * layout_.unit_bytes +
                              layout_.offset_in_unit(row);
      std::memcpy(rows.data() + u * layout_.row_bytes, from, layout_.row_bytes);
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
  // Marks out (mark()), and the ids updated since the oldest of them, by update number.
  uint64_t update_seq_ = 0;
  std::multiset<uint64_t> marks_;
  std::unordered_map<int64_t, uint64_t> updated_at_;
  size_t pruned_size_ = 0;
};

}  // namespace

std::unique_ptr<EmbeddingTable> EmbeddingTable::open(const fs::path& path,
                                                     const EmbeddingOptions& options) {
  return std::make_unique<Table>(path, options);
}

}  // namespace sluice
