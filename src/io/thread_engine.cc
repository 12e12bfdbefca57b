// The fallback engine: a small pool of threads doing pread, for machines where io_uring is
// blocked (Docker's default seccomp profile, kernel.io_uring_disabled) or short of memlock.

#include "common/thread.h"
#include "io/engine.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace sluice::io {

namespace {

class ThreadEngine final : public Engine {
 public:
  ThreadEngine(uint32_t depth, std::span<const int> files)
      : depth_(depth), files_(files.begin(), files.end()) {
    unsigned threads = std::clamp<unsigned>(depth, 1, 16);
    for (unsigned i = 0; i < threads; ++i) threads_.emplace_back([this] { work(); });
  }

  ~ThreadEngine() override {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  std::string describe() const override {
    return fmt::format("pread thread pool, {} threads, queue depth {}", threads_.size(), depth_);
  }
  uint32_t queue_depth() const override { return depth_; }

  int submit(const Request& r) override {
    staged_.push_back(r);
    return 0;
  }

  int flush() override {
    if (staged_.empty()) return 0;
    {
      std::lock_guard lock(mu_);
      for (const auto& r : staged_) queue_.push_back(r);
    }
    staged_.clear();
    work_cv_.notify_all();
    return 0;
  }

  int reap(std::span<Completion> out, std::chrono::milliseconds timeout) override {
    std::unique_lock lock(mu_);
    done_cv_.wait_for(lock, timeout, [&] { return !done_.empty(); });
    size_t n = std::min(out.size(), done_.size());
    for (size_t i = 0; i < n; ++i) {
      out[i] = done_.front();
      done_.pop_front();
    }
    return static_cast<int>(n);
  }

 private:
  void work() {
    detail::background_thread("sluice-io-pool");
    std::unique_lock lock(mu_);
    while (true) {
      work_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      Request r = queue_.front();
      queue_.pop_front();
      lock.unlock();
      const int fd = r.fd >= 0 ? r.fd : files_[r.file];
      ssize_t n = r.write ? ::pwrite(fd, r.dest, r.length, static_cast<off_t>(r.offset))
                          : ::pread(fd, r.dest, r.length, static_cast<off_t>(r.offset));
      int32_t result = n < 0 ? -errno : static_cast<int32_t>(n);
      lock.lock();
      done_.push_back({r.tag, result});
      done_cv_.notify_one();
    }
  }

  uint32_t depth_;
  std::vector<int> files_;
  std::vector<Request> staged_;
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::deque<Request> queue_;
  std::deque<Completion> done_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace

std::unique_ptr<Engine> make_thread_engine(uint32_t queue_depth, std::span<const int> files) {
  return std::make_unique<ThreadEngine>(queue_depth, files);
}

}  // namespace sluice::io
