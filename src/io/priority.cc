#include "io/priority.h"

namespace sluice::io {

namespace {
std::atomic<uint32_t> waiting{0};
}  // namespace

ReadsWaiting::ReadsWaiting() { waiting.fetch_add(1, std::memory_order_relaxed); }
ReadsWaiting::~ReadsWaiting() { waiting.fetch_sub(1, std::memory_order_relaxed); }

uint32_t reads_waiting() { return waiting.load(std::memory_order_relaxed); }

WriteCounters& write_counters() {
  static WriteCounters counters;
  return counters;
}

}  // namespace sluice::io
