#pragma once

// Page-locked host memory, device memory, streams and events, behind plain pointers so that no
// other subsystem sees a CUDA header. Built from cuda.cc with the CUDA runtime, or from
// cuda_none.cc (every call reports that the build has no CUDA) without it.
// Errors: Error(kUnsupported) when there is no CUDA or no such device; Error(kIo) naming the
// CUDA call and its error string otherwise.

#include <cstddef>
#include "common/result.h"

#include <string>

namespace sluice::memory {

/// How many CUDA devices this process can use (at least one), or why none (no CUDA in this
/// build, no driver, no GPU).
Result<int> cuda_devices();

/// Page-locks [p, p + n) for fast, asynchronous copies (cudaHostRegister), or says why it
/// cannot (no CUDA, no device, memlock).
Status pin(void* p, size_t n);
/// Undoes pin(p, n).
void unpin(void* p, size_t n);

/// Bytes this process holds page-locked through pin() and allocated as DeviceBuffers, all
/// devices together: gauges for leak checks and stats, not limits.
size_t pinned_bytes();
size_t device_bytes();

/// Copies device memory back to the host and waits for it (for checks and tests).
void copy_to_host(void* dst, const void* src, size_t bytes, int device);
/// Bytes of device memory in use on `device`, all processes together (cudaMemGetInfo).
size_t device_memory_used(int device);

/// Device memory on device `device` (cudaMalloc); freed by the destructor.
class DeviceBuffer {
 public:
  DeviceBuffer(int device, size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* data() const { return ptr_; }
  size_t size() const { return size_; }
  int device() const { return device_; }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
  int device_ = 0;
};

/// A non-blocking stream on `device` (it does not wait for the legacy default stream).
class Stream {
 public:
  explicit Stream(int device);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  void* handle() const { return handle_; }
  /// Queues an asynchronous host-to-device copy (`src` should be page-locked).
  void copy_to_device(void* dst, const void* src, size_t bytes);
  /// Queues an asynchronous device-to-host copy (`dst` should be page-locked).
  void copy_to_host(void* dst, const void* src, size_t bytes);
  /// Blocks the calling thread until the work queued so far has run.
  void synchronize();

 private:
  void* handle_ = nullptr;
  int device_ = 0;
};

/// An event without timing (cheapest kind).
class Event {
 public:
  explicit Event(int device);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  /// Marks the current end of `stream` (a cudaStream_t; nullptr: the legacy default stream).
  void record(void* stream);
  /// Makes `stream` wait for the event without blocking the host.
  void wait_on(void* stream) const;
  /// Blocks the calling thread until the event has happened.
  void synchronize() const;

 private:
  void* handle_ = nullptr;
  int device_ = 0;
};

}  // namespace sluice::memory
