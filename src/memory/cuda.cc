#include "memory/cuda.h"

#include "common/errors.h"

#include <cuda_runtime_api.h>

#include <atomic>

namespace sluice::memory {

namespace {

void check(cudaError_t e, const char* call) {
  if (e != cudaSuccess)
    detail::fail(ErrorCode::kIo, "CUDA: {}: {} ({})", call, cudaGetErrorString(e),
                 cudaGetErrorName(e));
}

// The runtime keeps one current device per thread; every call here names its device.
void use(int device) { check(cudaSetDevice(device), "cudaSetDevice"); }

std::atomic<size_t> pinned_total{0};
std::atomic<size_t> device_total{0};

}  // namespace

Result<int> cuda_devices() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear it, so it does not show up in a later call
    return failure(
        e == cudaErrorInsufficientDriver
            ? "no CUDA device (no NVIDIA driver, or one older than this build's CUDA runtime)"
        : e == cudaErrorNoDevice ? "no CUDA device"
                                 : std::string("no CUDA device: ") + cudaGetErrorString(e));
  }
  if (n == 0) return failure("no CUDA device");
  return n;
}

Status pin(void* p, size_t n) {
  if (auto devices = cuda_devices(); !devices) return failure(devices.error());
  cudaError_t e = cudaHostRegister(p, n, cudaHostRegisterDefault);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return failure(std::string("cudaHostRegister: ") + cudaGetErrorString(e));
  }
  pinned_total += n;
  return {};
}

void unpin(void* p, size_t n) {
  if (cudaHostUnregister(p) != cudaSuccess) cudaGetLastError();  // a runtime gone at exit
  pinned_total -= n;
}

size_t pinned_bytes() { return pinned_total.load(); }
size_t device_bytes() { return device_total.load(); }

void copy_to_host(void* dst, const void* src, size_t bytes, int device) {
  use(device);
  check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy");
}

size_t device_memory_used(int device) {
  use(device);
  size_t free = 0, total = 0;
  check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return total - free;
}

DeviceBuffer::DeviceBuffer(int device, size_t bytes) : size_(bytes), device_(device) {
  use(device);
  check(cudaMalloc(&ptr_, bytes), "cudaMalloc");
  device_total += bytes;
}

DeviceBuffer::~DeviceBuffer() {
  if (!ptr_) return;
  if (cudaSetDevice(device_) == cudaSuccess) cudaFree(ptr_);
  device_total -= size_;
}

Stream::Stream(int device) : device_(device) {
  use(device);
  cudaStream_t s = nullptr;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  handle_ = s;
}

Stream::~Stream() {
  if (handle_ && cudaSetDevice(device_) == cudaSuccess)
    cudaStreamDestroy(static_cast<cudaStream_t>(handle_));
}

void Stream::copy_to_device(void* dst, const void* src, size_t bytes) {
  use(device_);
  check(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(handle_)),
      "cudaMemcpyAsync");
}

void Stream::copy_to_host(void* dst, const void* src, size_t bytes) {
  use(device_);
  check(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, static_cast<cudaStream_t>(handle_)),
      "cudaMemcpyAsync");
}

void Stream::synchronize() {
  check(cudaStreamSynchronize(static_cast<cudaStream_t>(handle_)), "cudaStreamSynchronize");
}

Event::Event(int device) : device_(device) {
  use(device);
  cudaEvent_t e = nullptr;
  check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
  handle_ = e;
}

Event::~Event() {
  if (handle_) cudaEventDestroy(static_cast<cudaEvent_t>(handle_));
}

void Event::record(void* stream) {
  use(device_);
  check(cudaEventRecord(static_cast<cudaEvent_t>(handle_), static_cast<cudaStream_t>(stream)),
        "cudaEventRecord");
}

void Event::wait_on(void* stream) const {
  check(
      cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(handle_), 0),
      "cudaStreamWaitEvent");
}

void Event::synchronize() const {
  check(cudaEventSynchronize(static_cast<cudaEvent_t>(handle_)), "cudaEventSynchronize");
}

}  // namespace sluice::memory
