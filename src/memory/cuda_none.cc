// The build without the CUDA toolkit: no device is ever available, and asking for one says why.

#include "memory/cuda.h"

#include "common/errors.h"

namespace sluice::memory {

namespace {
[[noreturn]] void no_cuda() {
  detail::fail(ErrorCode::kUnsupported,
               "this build of sluice has no CUDA (the toolkit was not found at build time)");
}
}  // namespace

Result<int> cuda_devices() { return failure("this build of sluice has no CUDA"); }
Status pin(void*, size_t) { return failure(cuda_devices().error()); }
void unpin(void*, size_t) {}
size_t pinned_bytes() { return 0; }
size_t device_bytes() { return 0; }
void copy_to_host(void*, const void*, size_t, int) { no_cuda(); }
size_t device_memory_used(int) { no_cuda(); }
DeviceBuffer::DeviceBuffer(int, size_t) { no_cuda(); }
DeviceBuffer::~DeviceBuffer() = default;
Stream::Stream(int) { no_cuda(); }
Stream::~Stream() = default;
void Stream::copy_to_device(void*, const void*, size_t) { no_cuda(); }
void Stream::copy_to_host(void*, const void*, size_t) { no_cuda(); }
void Stream::synchronize() { no_cuda(); }
Event::Event(int) { no_cuda(); }
Event::~Event() = default;
void Event::record(void*) { no_cuda(); }
void Event::wait_on(void*) const { no_cuda(); }
void Event::synchronize() const { no_cuda(); }

}  // namespace sluice::memory
