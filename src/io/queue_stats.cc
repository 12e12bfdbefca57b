#include "io/queue_stats.h"

#include <bit>
#include <numeric>

namespace sluice::io {

size_t QueueStats::level_of(size_t in_flight) {
  return in_flight == 0 ? 0 : std::min<size_t>(std::bit_width(in_flight), kLevels - 1);
}

void QueueStats::note(std::chrono::steady_clock::time_point now, size_t in_flight) {
  if (last_ != std::chrono::steady_clock::time_point{} && now > last_) {
    const auto ns = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_).count());
    ns_[level_of(in_flight)].fetch_add(ns, std::memory_order_relaxed);
    read_ns_.fetch_add(ns * in_flight, std::memory_order_relaxed);
  }
  if (now > last_) last_ = now;
}

QueueStats::Snapshot QueueStats::snapshot() const {
  Snapshot s;
  for (size_t i = 0; i < kLevels; ++i)
    s.seconds[i] = static_cast<double>(ns_[i].load(std::memory_order_relaxed)) / 1e9;
  s.read_seconds = static_cast<double>(read_ns_.load(std::memory_order_relaxed)) / 1e9;
  s.completions = completions_.load(std::memory_order_relaxed);
  return s;
}

double QueueStats::Snapshot::total_seconds() const {
  return std::accumulate(seconds.begin(), seconds.end(), 0.0);
}

QueueStats::Snapshot& QueueStats::Snapshot::operator+=(const Snapshot& other) {
  for (size_t i = 0; i < kLevels; ++i) seconds[i] += other.seconds[i];
  read_seconds += other.read_seconds;
  completions += other.completions;
  return *this;
}

}  // namespace sluice::io
