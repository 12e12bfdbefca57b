#pragma once

// Pooled batch storage. A Batch handed to the consumer owns one BatchStorage; when the last
// reference to the Batch dies, the storage goes back to the pool (which the batch keeps alive,
// so this works after the Loader is gone). The loader's own share is bounded (`budget`: the
// prefetch window); storages the consumer chooses to hold are the consumer's memory, and the
// pool keeps at most `budget` idle ones, freeing the rest as they come back. In all, at most
// `budget + max_held` storages exist: a consumer that holds more than `max_held` batches stops
// the loader (back-pressure) instead of growing memory without bound.

#include "memory/aligned_buffer.h"
#include "memory/cuda.h"

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

namespace sluice::pipeline {

using memory::AlignedBuffer;

/// device: cuda:N: a batch's copy on the device and the events that order its reuse. The
/// loader thread that fills the storage waits for `copied` before it overwrites the host bytes
/// and for `released` (recorded on the consumer's stream when the batch was dropped) before it
/// overwrites the device bytes; the consumer never waits on the host.
struct DeviceCopy {
  // A storage freed while its copy is in flight (the pool shrinking) must not free the host
  // or device bytes under the DMA; `device` is BatchStorage's last member, so this runs first.
  ~DeviceCopy() {
    try {
      if (copy_pending) copied->synchronize();
      if (release_pending) released->synchronize();
    } catch (...) {  // a runtime shutting down at exit: nothing left to protect
    }
  }
  std::unique_ptr<memory::DeviceBuffer> buffer;
  std::unique_ptr<memory::Event> copied;
  std::unique_ptr<memory::Event> released;
  bool copy_pending = false;
  bool release_pending = false;
};

struct BatchStorage {
  AlignedBuffer data;
  std::vector<uint64_t> indices;
  std::vector<uint8_t> padding;
  std::vector<size_t> field_offset;  // where each field starts in data
  std::vector<size_t> field_bytes;
  std::vector<std::vector<uint64_t>> offsets;  // per field; empty for fixed-size fields
  uint64_t epoch = 0, step = 0;
  std::unique_ptr<DeviceCopy> device;  // device: cuda:N only

  /// Bytes of `data` in use: the end of the last field.
  size_t used_bytes() const;
};

class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  /// `pin`: page-lock the storages' buffers (best effort).
  BufferPool(size_t budget, size_t max_held, bool pin = false);
  /// A free storage, or a new one while fewer than `budget` are out of the consumer's hands;
  /// otherwise waits until one is returned. nullptr if `stop` became true first.
  std::unique_ptr<BatchStorage> acquire(const bool& stop, std::mutex& stop_mu,
                                        std::condition_variable& stop_cv);
  void release(std::unique_ptr<BatchStorage> storage);
  /// The loader is going away: stop notifying its condition variable.
  void detach();
  /// Counts storages held by batches the consumer has (delivered and not yet dropped).
  void note_delivered();
  void note_returned_from_consumer();
  /// Batches the consumer holds now.
  size_t held() const;
  /// True when no storage can be had until the consumer drops a batch.
  bool exhausted_by_consumer() const;

 private:
  size_t budget_;
  size_t max_held_;
  bool pin_;
  size_t total_ = 0;
  mutable std::mutex mu_;
  std::vector<std::unique_ptr<BatchStorage>> free_;
  size_t with_consumer_ = 0;
  // Waiters are the loader threads; they wait on the loader's condition variable so that a
  // stop request wakes them too.
  std::condition_variable* waiter_cv_ = nullptr;
};

}  // namespace sluice::pipeline
