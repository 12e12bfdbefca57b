#include "io/service.h"
#include "common/thread.h"

#include "io/read_queue.h"

#include <cerrno>
#include <exception>
#include <future>

namespace sluice::io {

struct Service::Waiter {
  std::vector<ReadOp> ops;  // the job's own copy: a caller may leave before the IO thread does
  ReadJob job;
  bool done = false;  // under Service::mu_
};

Service::Service(const EngineOptions& options, std::span<const int> files,
                 const std::function<void(const std::string&)>& on_choice) {
  std::promise<void> made;
  auto ready = made.get_future();
  thread_ = std::thread([&, files = std::vector<int>(files.begin(), files.end())] {
    detail::background_thread("sluice-io");
    try {
      engine_ = make_engine(options, files, on_choice);
    } catch (...) {
      made.set_exception(std::current_exception());
      return;
    }
    made.set_value();
    run();
  });
  try {
    ready.get();
  } catch (...) {
    thread_.join();
    throw;
  }
}

Service::~Service() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  thread_.join();
}

ReadFailure Service::read_all(std::span<const ReadOp> ops,
                              std::chrono::steady_clock::time_point deadline,
                              const std::atomic<bool>* cancel) {
  auto w = std::make_shared<Waiter>();
  w->ops.assign(ops.begin(), ops.end());
  w->job.ops = w->ops;
  w->job.deadline = deadline;
  w->job.cancel = cancel;
  std::unique_lock lock(mu_);
  incoming_.push_back(w);
  work_cv_.notify_one();
  // The queue enforces the deadline (and drains); this backstop only guards against an IO
  // thread that is stuck in the kernel. The Waiter is shared so an abandoned job stays valid
  // for the thread, whose reads may then still land: in_flight.
  if (!done_cv_.wait_until(lock, deadline + kDrainGrace + std::chrono::seconds(5),
                           [&] { return w->done; }))
    return {ops.size(), -ETIMEDOUT, true};
  return w->job.failure;
}

void Service::run() {
  ReadQueue queue(*engine_, &stats_);
  std::vector<std::shared_ptr<Waiter>> active;  // keeps queued jobs alive
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (queue.empty()) work_cv_.wait(lock, [&] { return stop_ || !incoming_.empty(); });
      if (stop_ && incoming_.empty() && queue.empty()) break;
      for (auto& w : incoming_) {
        queue.add(&w->job);
        active.push_back(std::move(w));
      }
      incoming_.clear();
    }
    // With room in the queue a new job should not wait for a completion: poll for one often.
    if (queue.run_once(std::chrono::milliseconds(queue.has_room() ? 1 : 100)) == 0) continue;
    {
      std::lock_guard lock(mu_);
      for (auto& w : active) w->done = w->job.complete;
    }
    done_cv_.notify_all();
    std::erase_if(active, [](const std::shared_ptr<Waiter>& w) { return w->job.complete; });
  }
  // Reads given up on (in_flight) may still be in the engine: it goes before the queue and the
  // jobs it could still touch.
  engine_.reset();
}

}  // namespace sluice::io
