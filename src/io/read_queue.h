#pragma once

// ReadQueue: keeps one engine's queue full from a FIFO of jobs (each job is one caller's list of
// reads), oldest job first, so the device sees a steady queue across job boundaries. It owns the
// policy every read shares, and the checkpoint's writes (ReadOp::write) with it: short ones
// continued, EAGAIN/EINTR retried, the first failure of a job kept and its other ops drained,
// deadlines enforced. One thread drives it.

#include "io/engine.h"
#include "io/queue_stats.h"

#include <vector>

namespace sluice::io {

/// One caller's reads. The queue fills in the progress fields; `complete` is set last.
struct ReadJob {
  std::span<const ReadOp> ops;
  std::chrono::steady_clock::time_point deadline;
  const std::atomic<bool>* cancel = nullptr;

  std::vector<uint32_t> done;    // bytes read so far, per op
  std::vector<uint8_t> retries;  // EAGAIN/EINTR per op
  size_t next = 0;               // first op not yet submitted
  size_t in_flight = 0;
  size_t finished = 0;
  ReadFailure failure;
  bool complete = false;
};

class ReadQueue {
 public:
  /// `stats`, when given, is noted with the reads in flight as they change (see QueueStats).
  explicit ReadQueue(Engine& engine, QueueStats* stats = nullptr);

  /// Queues `job` behind the others; it must stay alive until it is complete.
  void add(ReadJob* job);
  /// Submits what fits, waits up to `wait` for completions and settles them. Jobs that became
  /// complete (done, failed and drained, or past their deadline and drained or kDrainGrace
  /// later) get `complete` set and are forgotten; returns how many. A job completed with
  /// failure.in_flight may still be read into: its memory must never be reused.
  size_t run_once(std::chrono::milliseconds wait);
  /// Whether no job is waiting for reads (reads of expired jobs may still be in flight).
  bool empty() const { return active_.empty(); }
  /// Whether the engine's queue has room for another read.
  bool has_room() const { return in_flight_ < engine_.queue_depth(); }

 private:
  int submit(uint32_t slot, size_t op);
  void settle(const Completion& c);
  void finish(uint32_t slot);
  void note();

  Engine& engine_;
  QueueStats* stats_;
  size_t noted_in_flight_ = 0;  // the level since the last note
  std::vector<Completion> completions_;
  std::vector<ReadJob*> slots_;           // a completion's tag names its slot; null: expired
  std::vector<uint32_t> slot_in_flight_;  // reads in flight per slot, including expired ones
  std::vector<uint32_t> active_;          // slots of jobs not yet complete, oldest first
  size_t in_flight_ = 0;
};

}  // namespace sluice::io
