#pragma once

// Fault injection at the engine seam: wraps a real engine and, per request, cuts it short,
// answers EAGAIN, fails it with an errno, or never answers.

#include "io/engine.h"

#include <deque>
#include <functional>
#include <memory>

namespace sluice::testing {

enum class Fault { kNone, kShort, kAgain, kError, kHang };

class FaultEngine final : public io::Engine {
 public:
  /// `decide(request)` picks the fault for each submitted request; `error` is the -errno
  /// kError answers with.
  FaultEngine(std::unique_ptr<io::Engine> inner, std::function<Fault(const io::Request&)> decide,
              int error = -EIO)
      : inner_(std::move(inner)), decide_(std::move(decide)), error_(error) {}

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
    }
    return 0;
  }
  int flush() override { return inner_->flush(); }
  int reap(std::span<io::Completion> out, std::chrono::milliseconds timeout) override {
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
  std::deque<io::Completion> synthetic_;
};

}  // namespace sluice::testing
