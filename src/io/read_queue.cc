#include "io/read_queue.h"

#include <algorithm>
#include <cerrno>

namespace sluice::io {

namespace {
constexpr int kMaxRetries = 64;  // EAGAIN / EINTR on one op before it counts as an error
constexpr uint64_t tag_of(uint32_t slot, size_t op) { return uint64_t{slot} << 32 | op; }
}  // namespace

ReadQueue::ReadQueue(Engine& engine, QueueStats* stats)
    : engine_(engine), stats_(stats), completions_(engine.queue_depth()) {}

// The time since the last note goes to the level noted then; from now on the level is today's.
void ReadQueue::note() {
  if (!stats_) return;
  stats_->note(std::chrono::steady_clock::now(), noted_in_flight_);
  noted_in_flight_ = in_flight_;
}

void ReadQueue::add(ReadJob* job) {
  job->done.assign(job->ops.size(), 0);
  job->retries.assign(job->ops.size(), 0);
  job->next = job->in_flight = job->finished = 0;
  job->failure = {};
  job->complete = false;
  uint32_t slot = 0;
  while (slot < slots_.size() && (slots_[slot] || slot_in_flight_[slot])) ++slot;
  if (slot == slots_.size()) {
    slots_.push_back(nullptr);
    slot_in_flight_.push_back(0);
  }
  slots_[slot] = job;
  active_.push_back(slot);
}

int ReadQueue::submit(uint32_t slot, size_t i) {
  ReadJob& job = *slots_[slot];
  const ReadOp& op = job.ops[i];
  uint32_t done = job.done[i];
  int ret = engine_.submit({tag_of(slot, i), op.file, op.offset + done, op.length - done,
                            op.dest + done, op.fd, op.write});
  if (ret < 0) return ret;
  ++job.in_flight;
  ++slot_in_flight_[slot];
  ++in_flight_;
  return 0;
}

void ReadQueue::settle(const Completion& c) {
  auto slot = static_cast<uint32_t>(c.tag >> 32);
  auto i = static_cast<size_t>(c.tag & 0xffffffffu);
  --slot_in_flight_[slot];
  --in_flight_;
  ReadJob* job = slots_[slot];
  if (!job) return;  // its job expired; the read only had to drain
  --job->in_flight;
  ReadFailure& failure = job->failure;
  if (c.result == -EAGAIN || c.result == -EINTR) {
    if (++job->retries[i] <= kMaxRetries && failure.error == 0 && submit(slot, i) == 0) return;
    if (failure.error == 0) failure = {i, c.result};
  } else if (c.result < 0) {
    if (failure.error == 0) failure = {i, c.result};
  } else if (c.result == 0) {  // end of file: fine once the required bytes are in
    const ReadOp& op = job->ops[i];
    if (failure.error == 0 && op.write)  // a device that takes no bytes would be asked forever
      failure = {i, -EIO};
    else if (job->done[i] < (op.required ? op.required : op.length) && failure.error == 0)
      failure = {i, -ENODATA};
  } else {
    job->done[i] += static_cast<uint32_t>(c.result);
    if (job->done[i] < job->ops[i].length && failure.error == 0) {  // short read: the rest
      int ret = submit(slot, i);
      if (ret == 0) return;
      failure = {i, ret};
    }
  }
  ++job->finished;
}

void ReadQueue::finish(uint32_t slot) {
  slots_[slot]->complete = true;
  slots_[slot] = nullptr;
  active_.erase(std::find(active_.begin(), active_.end(), slot));
}

size_t ReadQueue::run_once(std::chrono::milliseconds wait) {
  // Fill the queue, oldest job first; a job with a failure (or cancelled) only drains.
  for (uint32_t slot : active_) {
    ReadJob& job = *slots_[slot];
    if (job.cancel && job.cancel->load(std::memory_order_relaxed) && job.failure.error == 0)
      job.failure = {job.next, -ECANCELED};
    while (job.failure.error == 0 && job.next < job.ops.size() && has_room()) {
      size_t i = job.next++;
      if (job.ops[i].length == 0) {
        ++job.finished;
        continue;
      }
      if (int ret = submit(slot, i); ret < 0) job.failure = {i, ret};
    }
    if (job.failure.error != 0) {  // the ops it will never submit count as finished
      job.finished += job.ops.size() - job.next;
      job.next = job.ops.size();
    }
  }
  int ret = engine_.flush();
  note();  // the time since the last call at its level, the wait below at today's
  if (ret == 0 && in_flight_ > 0) {
    int n = engine_.reap(completions_, wait);
    if (n < 0) ret = n;
    if (stats_ && n > 0) stats_->add_completions(static_cast<size_t>(n));
    for (int k = 0; k < n; ++k) settle(completions_[static_cast<size_t>(k)]);
  }
  note();
  auto now = std::chrono::steady_clock::now();
  size_t completed = 0;
  for (size_t a = 0; a < active_.size();) {
    uint32_t slot = active_[a];
    ReadJob& job = *slots_[slot];
    if (ret < 0) {  // the engine itself failed: every job fails with it
      job.failure = {job.ops.size(), ret};
    } else if (job.finished < job.ops.size() || job.in_flight > 0) {
      if (now < job.deadline) {
        ++a;
        continue;
      }
      if (job.failure.error != -ETIMEDOUT) {  // past the deadline: no new reads from here on
        job.failure = {job.failure.error ? job.failure.op : job.next, -ETIMEDOUT};
        job.finished += job.ops.size() - job.next;
        job.next = job.ops.size();
      }
      // The reads in flight would land in the caller's memory after it took it back: wait for
      // them a while longer, then say that they are still out.
      if (job.in_flight > 0 && now < job.deadline + kDrainGrace) {
        ++a;
        continue;
      }
      job.failure.in_flight = job.in_flight > 0;
    }
    finish(slot);
    ++completed;
  }
  return completed;
}

ReadFailure read_all(Engine& engine, std::span<const ReadOp> ops,
                     std::chrono::steady_clock::time_point deadline,
                     const std::atomic<bool>* cancel, QueueStats* stats) {
  ReadQueue queue(engine, stats);
  ReadJob job;
  job.ops = ops;
  job.deadline = deadline;
  job.cancel = cancel;
  queue.add(&job);
  while (!job.complete) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline + kDrainGrace - std::chrono::steady_clock::now());
    queue.run_once(std::clamp(left, std::chrono::milliseconds(0), std::chrono::milliseconds(100)) +
                   std::chrono::milliseconds(1));
  }
  return job.failure;
}

}  // namespace sluice::io
