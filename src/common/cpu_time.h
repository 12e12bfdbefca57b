#pragma once

// CPU time of the whole process, for the accounts that stats() and `sluice bench` report.

#include <sys/resource.h>

namespace sluice::detail {

/// User + system CPU seconds this process has used so far (all threads); 0 if unknown.
inline double process_cpu_seconds() {
  rusage u{};
  if (::getrusage(RUSAGE_SELF, &u) != 0) return 0;
  auto seconds = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
  };
  return seconds(u.ru_utime) + seconds(u.ru_stime);
}

}  // namespace sluice::detail
