#pragma once

// Service: one IO thread that owns one engine and serves reads for many threads. Each caller's
// reads queue behind the others' (io::ReadQueue), so the device sees one submitter with a
// steady queue instead of several queues that drain at the end of every batch.

#include "io/engine.h"
#include "io/queue_stats.h"

#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace sluice::io {

class Service {
 public:
  /// Starts the IO thread and makes its engine there (an io_uring ring with SINGLE_ISSUER
  /// belongs to the thread that submits). Throws what make_engine throws.
  Service(const EngineOptions& options, std::span<const int> files,
          const std::function<void(const std::string&)>& on_choice);
  /// Lets queued reads finish, then joins the IO thread.
  ~Service();
  Service(const Service&) = delete;
  Service& operator=(const Service&) = delete;

  /// Thread-safe. Reads every op completely, queued behind other callers' reads; the same
  /// contract as io::read_all (the ops are copied: the caller's list may go at once).
  ReadFailure read_all(std::span<const ReadOp> ops, std::chrono::steady_clock::time_point deadline,
                       const std::atomic<bool>* cancel = nullptr);
  /// The IO thread's queue: reads in flight over time (any thread may read it).
  const QueueStats& stats() const { return stats_; }

 private:
  struct Waiter;
  void run();

  std::mutex mu_;
  std::condition_variable work_cv_;  // the IO thread: new jobs, or stop
  std::condition_variable done_cv_;  // callers: a job completed
  std::vector<std::shared_ptr<Waiter>> incoming_;
  bool stop_ = false;
  std::unique_ptr<Engine> engine_;
  QueueStats stats_;
  std::thread thread_;
};

}  // namespace sluice::io
