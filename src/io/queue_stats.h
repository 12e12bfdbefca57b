#pragma once

// QueueStats: how many reads one queue kept in flight, over time. The thread that drives the
// queue (io::ReadQueue) notes each change of level with the time; the time at each level and
// its integral say whether the device was kept busy: a mean well under the queue depth, or
// much time at level 0 (nothing in flight: the device idle between one job's last completion
// and the next job's first submission), points at the pipeline, not the device. Readable from
// any thread while it is written (relaxed atomics: a snapshot may miss the last few notes).

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>

namespace sluice::io {

class QueueStats {
 public:
  /// Levels of reads in flight: 0, 1, 2-3, 4-7, 8-15, ..., 128-255, 256 and more.
  static constexpr size_t kLevels = 10;
  /// The level that `in_flight` reads fall in.
  static size_t level_of(size_t in_flight);

  struct Snapshot {
    std::array<double, kLevels> seconds{};  // time spent at each level
    double read_seconds = 0;                // integral of reads in flight over time
    uint64_t completions = 0;
    double total_seconds() const;
    Snapshot& operator+=(const Snapshot& other);
  };

  /// The driving thread: the queue had `in_flight` reads from the previous note until `now`.
  /// The first note only starts the clock.
  void note(std::chrono::steady_clock::time_point now, size_t in_flight);
  void add_completions(size_t n) { completions_.fetch_add(n, std::memory_order_relaxed); }
  Snapshot snapshot() const;

 private:
  std::array<std::atomic<uint64_t>, kLevels> ns_{};
  std::atomic<uint64_t> read_ns_{0};
  std::atomic<uint64_t> completions_{0};
  std::chrono::steady_clock::time_point last_{};  // the driving thread's alone
};

}  // namespace sluice::io
