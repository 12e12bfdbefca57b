#pragma once

// Reads first, per device: a Loader marks the time its batches' reads are waiting on the
// device it reads, and checkpoint writes to that device look at the mark to leave the queue to
// them (checkpoint/README.md). The loader and the checkpoint writer share a disk, not an
// object, so each finds the disk's DeviceTraffic by the file it uses (`for_path`, `for_fd`) and
// keeps it; the write loop and the loader take it as an argument. Writes to another device do
// not wait for these reads, and are not counted in this loader's stats.

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <memory>

namespace sluice::io {

class DeviceTraffic {
 public:
  /// The traffic object of the device holding `path` (or descriptor `fd`): one per device
  /// while anyone holds it. A path that cannot be stat-ed gets an object of its own.
  static std::shared_ptr<DeviceTraffic> for_path(const std::filesystem::path& path);
  static std::shared_ptr<DeviceTraffic> for_fd(int fd);
  static std::shared_ptr<DeviceTraffic> for_device(dev_t device);

  /// Held while a batch's reads are in flight (RAII): reads_waiting() counts the holders.
  class ReadsWaiting {
   public:
    explicit ReadsWaiting(DeviceTraffic& traffic) : traffic_(traffic) {
      traffic_.waiting_.fetch_add(1, std::memory_order_relaxed);
    }
    ~ReadsWaiting() { traffic_.waiting_.fetch_sub(1, std::memory_order_relaxed); }
    ReadsWaiting(const ReadsWaiting&) = delete;
    ReadsWaiting& operator=(const ReadsWaiting&) = delete;

   private:
    DeviceTraffic& traffic_;
  };
  uint32_t reads_waiting() const { return waiting_.load(std::memory_order_relaxed); }

  /// What checkpoint writes to this device have done, for Loader::stats().
  std::atomic<uint64_t> written_bytes{0};
  std::atomic<uint64_t> held_ns{0};  // time those writes were held back for reads

 private:
  std::atomic<uint32_t> waiting_{0};
};

}  // namespace sluice::io
