#pragma once

// Memory that must never be freed or reused: the destination of reads given up on while still
// in flight (io::ReadFailure::in_flight), which may land at any later time.

#include <mutex>
#include <vector>

namespace sluice::detail {

/// Keeps `p` (and what it owns) forever, reachable from here so that leak checkers do not
/// report it. For rare failures only: each call costs its memory for the life of the process.
inline void keep_forever(const void* p) {
  static std::mutex mu;
  // Never destroyed: leak checkers look at exit, after static destructors have run.
  static auto* kept = new std::vector<const void*>;
  std::lock_guard lock(mu);
  kept->push_back(p);
}

}  // namespace sluice::detail
