#include "common/log.h"

#include <fmt/format.h>

#include <cstdio>

namespace sluice::detail {

void log_line(const std::string& line) { std::fprintf(stderr, "sluice: %s\n", line.c_str()); }

void RateLimitedLog::log(const std::string& line) {
  uint64_t dropped = 0;
  {
    std::lock_guard lock(mu_);
    auto now = std::chrono::steady_clock::now();
    if (last_ != std::chrono::steady_clock::time_point{} && now - last_ < interval_) {
      ++dropped_;
      return;
    }
    last_ = now;
    dropped = dropped_;
    dropped_ = 0;
  }
  log_line(dropped == 0 ? line : fmt::format("{} ({} more like it not shown)", line, dropped));
}

}  // namespace sluice::detail
