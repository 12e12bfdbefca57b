#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace sluice::cli {

/// A one-line progress bar on stderr, drawn only when stderr is a terminal and at most ~10
/// times a second; otherwise every call is a no-op.
class Progress {
 public:
  Progress(std::string label, uint64_t total, std::string unit, bool enabled = true);
  ~Progress();
  void update(uint64_t done);
  void finish();

 private:
  void draw(uint64_t done);
  std::string label_, unit_;
  uint64_t total_;
  bool enabled_;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_, last_;
};

}  // namespace sluice::cli
