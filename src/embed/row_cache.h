#pragma once

// Host-memory rows of one table, by id. Clairvoyant: told the ids of future gathers in order
// (feed), it evicts the row whose next use is farthest and does not admit a row used later
// than every cached one (Belady's MIN with bypass); LRU: the least recently used goes. Not
// thread-safe: the table's state lock guards it.

#include <sluice/options.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <list>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sluice::embed {

class RowCache {
 public:
  RowCache(uint64_t capacity_rows, size_t row_bytes, CachePolicy policy);

  /// The cached row, or null; a hit counts as a use for LRU.
  const std::byte* find(int64_t id);
  /// Overwrites a cached row (an update); no-op when `id` is not cached.
  void overwrite(int64_t id, const std::byte* row);
  /// Offers a row read from disk; the policy decides whether it stays.
  void offer(int64_t id, const std::byte* row);

  /// One future gather's ids (sorted, unique), after those fed before.
  void feed(std::span<const int64_t> ids);
  /// A gather of `ids` (sorted, unique): when they are a fed batch's (the oldest, or one of the
  /// next kConsumeWindow - 1, the ones before it dropped as never to come), that batch is used
  /// now and every id's next use moves on. Returns whether it was.
  bool consume(std::span<const int64_t> ids);
  static constexpr size_t kConsumeWindow = 1024;

  uint64_t size() const { return slot_of_.size(); }
  uint64_t future_batches() const { return future_.size(); }

 private:
  static constexpr uint64_t kNever = UINT64_MAX;
  struct Entry {
    uint64_t slot;
    uint64_t next = kNever;            // clairvoyant: its next use
    std::list<int64_t>::iterator lru;  // LRU: its place in the recency list
  };
  uint64_t next_use(int64_t id) const;
  void set_next(int64_t id, Entry& e, uint64_t next);
  void push_next(uint64_t next, int64_t id);
  // The cached row used farthest ahead (clairvoyant), its stale entries dropped first.
  const std::pair<uint64_t, int64_t>& farthest();
  void evict(int64_t id);

  uint64_t capacity_;
  size_t row_bytes_;
  CachePolicy policy_;
  std::vector<std::byte> rows_;  // capacity_ x row_bytes_
  std::vector<uint64_t> free_slots_;
  std::unordered_map<int64_t, Entry> slot_of_;
  // Clairvoyant: (next use, id) of the cached rows as a max-heap (farthest on top). Lazy: a
  // row's entry goes stale when its next use moves (a new entry is pushed) or it leaves the
  // cache; stale entries are dropped when they reach the top, and all at once when they
  // outnumber the live ones. A std::set did the same with an allocation per move.
  std::vector<std::pair<uint64_t, int64_t>> by_next_;
  std::list<int64_t> recency_;  // LRU: most recent first
  // The future: fed batches not yet gathered, each id linked to its next fed use.
  struct Fed {
    std::vector<int64_t> ids;
    std::vector<uint64_t> next;  // per id: the position of its next fed use, or kNever
  };
  std::deque<Fed> future_;
  uint64_t consumed_ = 0;  // position of future_.front()
  // Per id in the fed future: its first use (its key) and its last (where a new use links).
  struct Uses {
    uint64_t first, last;
    size_t last_index;  // its place in future_[last]'s ids
  };
  std::unordered_map<int64_t, Uses> uses_;
};

}  // namespace sluice::embed
