#pragma once

// WorkerStats: one loader thread's accounts, and how stats() adds them up with the IO service's
// queue: reads in flight over time (io::QueueStats) and seconds per stage of a batch.

#include <sluice/loader.h>

#include "io/queue_stats.h"

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <span>

namespace sluice::pipeline {

/// Written by its loader thread, read by any: the reads in flight on the thread's own engine
/// (through the page cache; under O_DIRECT the IO service keeps its own queue's), and the time
/// the thread spent in each stage.
struct WorkerStats {
  // In LoaderStats::Stages's order (its each() lists the names).
  enum Stage {
    kWindow,    // waiting for the consumer: the step was past the prefetch window
    kBuffer,    // waiting for a free batch buffer (or its last device copy)
    kPlan,      // the sampler's order, extents and the read plan
    kCache,     // waiting for the node cache's fetches (s3://, cache.dir)
    kRead,      // local reads
    kRemote,    // waiting for peers' replies
    kAssemble,  // checksums, splitting records, copies into the batch, transforms
    kDevice,    // queueing the copy to the GPU
    kStages
  };
  io::QueueStats queue;
  std::array<std::atomic<uint64_t>, kStages> ns{};
  void add(Stage stage, std::chrono::steady_clock::duration d) {
    ns[stage].fetch_add(
        static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count()),
        std::memory_order_relaxed);
  }
};

/// Fills `out`'s reads in flight (io_inflight_*, io_idle_fraction, io_completions) from the IO
/// service's queue (`service`, null without one) and the workers' own, and its stage_seconds
/// from the workers'.
void add_up(const io::QueueStats* service, std::span<const WorkerStats> workers, LoaderStats& out);

}  // namespace sluice::pipeline
