#pragma once

// Fault injection at the engine seam: wraps a real engine and, per request, cuts it short,
// answers EAGAIN, fails it with an errno, never answers, or answers late: kLate writes
// kLateByte over the destination from another thread `late` after the submit (as a device
// would, whoever is or is not waiting) and only then completes the read.

#include "io/engine.h"

#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace sluice::testing {

enum class Fault { kNone, kShort, kAgain, kError, kHang, kLate };

inline constexpr std::byte kLateByte{0xAB};

class FaultEngine final : public io::Engine {
 public:
  /// `decide(request)` picks the fault for each submitted request; `error` is the -errno
  /// kError answers with; `late_written` is called when a kLate read's bytes have landed (a
  /// test waits on that, not on a sleep).
  FaultEngine(std::unique_ptr<io::Engine> inner, std::function<Fault(const io::Request&)> decide,
              int error = -EIO, std::chrono::milliseconds late = std::chrono::milliseconds(600),
              std::function<void()> late_written = {})
      : inner_(std::move(inner)),
        decide_(std::move(decide)),
        error_(error),
        late_(late),
        late_written_(std::move(late_written)) {}
  ~FaultEngine() override {
    for (auto& t : late_writers_) t.join();
  }

  std::string describe() const override { return "faulty " + inner_->describe(); }
  uint32_t queue_depth() const override { return inner_->queue_depth(); }
  bool register_buffer(std::span<std::byte> b) override { return inner_->register_buffer(b); }

  int submit(const io::Request& r) override {
    switch (decide_(r)) {
      case Fault::kNone:
        return inner_->submit(r);
      case Fault::kShort: {
        io::Request cut = r;
        // Half, rounded to 4 KiB where possible: O_DIRECT reads end short on block boundaries.
        // A single aligned block is left whole (a cut would be EINVAL under O_DIRECT).
        if (r.length >= 8192)
          cut.length = r.length / 2 / 4096 * 4096;
        else if (r.length % 4096 != 0 && r.length > 1)
          cut.length = r.length / 2;
        return inner_->submit(cut);
      }
      case Fault::kAgain:
        synthetic_.push_back({r.tag, -EAGAIN});
        return 0;
      case Fault::kError:
        synthetic_.push_back({r.tag, error_});
        return 0;
      case Fault::kHang:
        return 0;  // accepted, never completed
      case Fault::kLate:
        late_writers_.emplace_back([this, r] {
          std::this_thread::sleep_for(late_);
          std::memset(r.dest, static_cast<int>(kLateByte), r.length);
          {
            std::lock_guard lock(late_mu_);
            late_done_.push_back({r.tag, static_cast<int32_t>(r.length)});
          }
          if (late_written_) late_written_();
        });
        return 0;
    }
    return 0;
  }
  int flush() override { return inner_->flush(); }
  int reap(std::span<io::Completion> out, std::chrono::milliseconds timeout) override {
    {
      std::lock_guard lock(late_mu_);
      synthetic_.insert(synthetic_.end(), late_done_.begin(), late_done_.end());
      late_done_.clear();
    }
    if (synthetic_.empty() && !late_writers_.empty())  // a late one may come meanwhile
      timeout = std::min(timeout, std::chrono::milliseconds(10));
    if (!synthetic_.empty()) {
      size_t n = 0;
      while (n < out.size() && !synthetic_.empty()) {
        out[n++] = synthetic_.front();
        synthetic_.pop_front();
      }
      return static_cast<int>(n);
    }
    return inner_->reap(out, timeout);
  }

 private:
  std::unique_ptr<io::Engine> inner_;
  std::function<Fault(const io::Request&)> decide_;
  int error_;
  std::chrono::milliseconds late_;
  std::function<void()> late_written_;
  std::deque<io::Completion> synthetic_;
  std::vector<std::thread> late_writers_;
  std::mutex late_mu_;
  std::vector<io::Completion> late_done_;
};

}  // namespace sluice::testing
