#include "cli/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>

namespace sluice::cli {

Progress::Progress(std::string label, uint64_t total, std::string unit, bool enabled)
    : label_(std::move(label)),
      unit_(std::move(unit)),
      total_(total),
      enabled_(enabled && isatty(STDERR_FILENO)),
      start_(std::chrono::steady_clock::now()),
      last_(start_) {}

Progress::~Progress() {
  if (enabled_ && !finished_) std::fputs("\n", stderr);
}

void Progress::update(uint64_t done) {
  if (!enabled_) return;
  auto now = std::chrono::steady_clock::now();
  if (now - last_ < std::chrono::milliseconds(100)) return;
  last_ = now;
  draw(done);
}

void Progress::finish() {
  if (!enabled_ || finished_) return;
  draw(total_);
  std::fputs("\n", stderr);
  finished_ = true;
}

void Progress::draw(uint64_t done) {
  constexpr int kWidth = 30;
  double frac = total_ ? static_cast<double>(done) / static_cast<double>(total_) : 1.0;
  int filled = static_cast<int>(frac * kWidth);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  double rate = secs > 0 ? static_cast<double>(done) / secs : 0;
  fmt::print(stderr, "\r{} [{:=<{}}{: <{}}] {:3.0f}% {}/{} {} ({:.0f} {}/s)", label_, "", filled,
             "", kWidth - filled, frac * 100, done, total_, unit_, rate, unit_);
  std::fflush(stderr);
}

}  // namespace sluice::cli
