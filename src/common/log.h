#pragma once

// sluice's one way to tell the user something that is not an error: a line on stderr.

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

namespace sluice::detail {

/// Writes "sluice: LINE" to stderr.
void log_line(const std::string& line);

/// A log line that may repeat without bound (a port scan, a flood of garbage): at most one line
/// per `interval`; the lines dropped meanwhile are counted in the next one. Thread-safe.
class RateLimitedLog {
 public:
  explicit RateLimitedLog(std::chrono::milliseconds interval = std::chrono::seconds(1))
      : interval_(interval) {}
  void log(const std::string& line);

 private:
  std::chrono::milliseconds interval_;
  std::mutex mu_;
  std::chrono::steady_clock::time_point last_{};
  uint64_t dropped_ = 0;
};

}  // namespace sluice::detail
