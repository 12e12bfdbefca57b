#include "embed/row_cache.h"

#include <algorithm>
#include <cstring>

namespace sluice::embed {

RowCache::RowCache(uint64_t capacity_rows, size_t row_bytes, CachePolicy policy)
    : capacity_(capacity_rows), row_bytes_(row_bytes), policy_(policy) {
  rows_.resize(capacity_ * row_bytes_);
  free_slots_.reserve(capacity_);
  for (uint64_t s = capacity_; s > 0; --s) free_slots_.push_back(s - 1);
}

uint64_t RowCache::next_use(int64_t id) const {
  auto it = uses_.find(id);
  return it == uses_.end() ? kNever : it->second.first;
}

void RowCache::set_next(int64_t id, Entry& e, uint64_t next) {
  if (e.next == next) return;
  e.next = next;
  push_next(next, id);
}

void RowCache::push_next(uint64_t next, int64_t id) {
  if (by_next_.size() > 2 * slot_of_.size() + 1024) {  // mostly stale: rebuilt from the live
    by_next_.clear();
    for (const auto& [cached, e] : slot_of_) by_next_.emplace_back(e.next, cached);
    std::make_heap(by_next_.begin(), by_next_.end());
  }
  by_next_.emplace_back(next, id);
  std::push_heap(by_next_.begin(), by_next_.end());
}

const std::pair<uint64_t, int64_t>& RowCache::farthest() {
  while (true) {
    const auto& [next, id] = by_next_.front();
    auto it = slot_of_.find(id);
    if (it != slot_of_.end() && it->second.next == next) return by_next_.front();
    std::pop_heap(by_next_.begin(), by_next_.end());
    by_next_.pop_back();
  }
}

const std::byte* RowCache::find(int64_t id) {
  auto it = slot_of_.find(id);
  if (it == slot_of_.end()) return nullptr;
  if (policy_ == CachePolicy::kLru) recency_.splice(recency_.begin(), recency_, it->second.lru);
  return rows_.data() + it->second.slot * row_bytes_;
}

void RowCache::overwrite(int64_t id, const std::byte* row) {
  auto it = slot_of_.find(id);
  if (it != slot_of_.end())
    std::memcpy(rows_.data() + it->second.slot * row_bytes_, row, row_bytes_);
}

void RowCache::evict(int64_t id) {
  auto it = slot_of_.find(id);
  free_slots_.push_back(it->second.slot);
  if (policy_ == CachePolicy::kLru) recency_.erase(it->second.lru);
  slot_of_.erase(it);  // clairvoyant: its heap entries are stale now
}

void RowCache::offer(int64_t id, const std::byte* row) {
  if (capacity_ == 0) return;
  if (slot_of_.count(id)) {
    overwrite(id, row);
    return;
  }
  const uint64_t next = policy_ == CachePolicy::kClairvoyant ? next_use(id) : kNever;
  if (free_slots_.empty()) {
    if (policy_ == CachePolicy::kLru) {
      evict(recency_.back());
    } else {
      const auto [far_next, far_id] = farthest();
      if (next >= far_next) return;  // used later than every cached row: bypass
      evict(far_id);
    }
  }
  Entry e{free_slots_.back(), kNever, {}};
  free_slots_.pop_back();
  std::memcpy(rows_.data() + e.slot * row_bytes_, row, row_bytes_);
  if (policy_ == CachePolicy::kLru) {
    recency_.push_front(id);
    e.lru = recency_.begin();
  } else {
    e.next = next;
  }
  slot_of_.emplace(id, e);
  if (policy_ == CachePolicy::kClairvoyant) push_next(next, id);
}

void RowCache::feed(std::span<const int64_t> ids) {
  if (capacity_ == 0 || policy_ != CachePolicy::kClairvoyant) return;
  const uint64_t at = consumed_ + future_.size();
  future_.push_back(
      {std::vector<int64_t>(ids.begin(), ids.end()), std::vector<uint64_t>(ids.size(), kNever)});
  for (size_t k = 0; k < ids.size(); ++k) {
    auto [u, added] = uses_.try_emplace(ids[k], Uses{at, at, k});
    if (added) {  // its next use was never: now it is `at`
      auto it = slot_of_.find(ids[k]);
      if (it != slot_of_.end()) set_next(ids[k], it->second, at);
      continue;
    }
    future_[u->second.last - consumed_].next[u->second.last_index] = at;
    u->second.last = at;
    u->second.last_index = k;
  }
}

bool RowCache::consume(std::span<const int64_t> ids) {
  // The oldest fed batch, or a later one: batches fed and never gathered (a loop left early)
  // are dropped with it, so the future does not stall behind them.
  size_t match = 0;
  const size_t look = std::min<size_t>(future_.size(), kConsumeWindow);
  while (match < look &&
         !std::equal(ids.begin(), ids.end(), future_[match].ids.begin(), future_[match].ids.end()))
    ++match;
  if (match == look) return false;
  for (size_t k = 0; k <= match; ++k) {
    const Fed& front = future_.front();
    for (size_t i = 0; i < front.ids.size(); ++i) {
      const int64_t id = front.ids[i];
      const uint64_t next = front.next[i];
      if (next == kNever)
        uses_.erase(id);
      else
        uses_.find(id)->second.first = next;
      auto it = slot_of_.find(id);
      if (it != slot_of_.end()) set_next(id, it->second, next);
    }
    future_.pop_front();
    ++consumed_;
  }
  return true;
}

}  // namespace sluice::embed
