#pragma once

// Reads first: a Loader marks the time its batches' reads are waiting, and checkpoint writes in
// the same process look at the mark to leave the queue to them (checkpoint/README.md). Plain
// process-wide counters: the loader and the checkpoint writer share a disk, not an object.

#include <atomic>
#include <cstdint>

namespace sluice::io {

/// Held while a batch's reads are in flight (RAII): reads_waiting() counts the holders.
class ReadsWaiting {
 public:
  ReadsWaiting();
  ~ReadsWaiting();
  ReadsWaiting(const ReadsWaiting&) = delete;
  ReadsWaiting& operator=(const ReadsWaiting&) = delete;
};

uint32_t reads_waiting();

/// What checkpoint writes in this process have done, for Loader::stats().
struct WriteCounters {
  std::atomic<uint64_t> bytes{0};    // written by checkpoints
  std::atomic<uint64_t> held_ns{0};  // time their writes were held back for reads
};
WriteCounters& write_counters();

}  // namespace sluice::io
