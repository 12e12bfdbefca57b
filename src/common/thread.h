#pragma once

// The threads sluice starts for itself (loader threads, IO threads, cache fetchers) run beside
// the trainer's threads, which must never wait for them.

#include <string>

namespace sluice::detail {

/// Marks the calling thread as one of sluice's background threads: named `name` (at most 15
/// characters; top, perf and gdb show it) and scheduled SCHED_BATCH. A SCHED_BATCH thread that
/// is woken (a batch taken, a read completed) never preempts the thread running on that core,
/// which is the trainer's. Without it, on a host whose cores were busy, the loader thread woken
/// by next() took the consumer's core for its whole batch: 2-3 ms of every other next() on two
/// cores while the batch itself was ready. Best effort: a refusal is logged once and ignored.
void background_thread(const std::string& name);

}  // namespace sluice::detail
