#include "cache/shared_state.h"

#include "common/errors.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace sluice::cache {

namespace fs = std::filesystem;
using detail::fail;

namespace {
constexpr char kMagic[8] = {'s', 'l', 'c', 'a', 'c', 'h', 'e', '\0'};
constexpr uint32_t kVersion = 1;

size_t map_size(uint64_t samples) {
  return sizeof(SharedState::Header) + samples * sizeof(SampleRecord);
}

void init_mutex(pthread_mutex_t* m) {
  pthread_mutexattr_t a;
  pthread_mutexattr_init(&a);
  pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
  pthread_mutex_init(m, &a);
  pthread_mutexattr_destroy(&a);
}
}  // namespace

SharedState::SharedState(const fs::path& dir, uint64_t samples, uint64_t identity, bool first_user)
    : path_(dir / "state"), samples_(samples) {
  fd_ = detail::open_file(path_, O_RDWR | O_CREAT);
  size_ = map_size(samples);
  const uint64_t had = detail::file_size(fd_.get(), path_.string());
  if (!first_user && had != size_)
    fail(ErrorCode::kIo,
         "{}: {} bytes, not the {} that {} samples take: another process shares "
         "this cache for other data",
         path_.string(), had, size_, samples);
  // Every block allocated now: a store into a hole of the mapping on a full disk is SIGBUS.
  if (had != size_) {
    if (ftruncate(fd_.get(), 0) != 0) detail::fail_errno(errno, "size " + path_.string());
    if (int rc = posix_fallocate(fd_.get(), 0, static_cast<off_t>(size_)); rc != 0)
      detail::fail_errno(rc, fmt::format("allocate the {} bytes of {}", size_, path_.string()));
  }
  map_ = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    detail::fail_errno(errno, "map " + path_.string());
  }
  header_ = static_cast<Header*>(map_);
  records_ = reinterpret_cast<SampleRecord*>(static_cast<char*>(map_) + sizeof(Header));
  Header& h = *header_;
  const bool same = had == size_ && std::memcmp(h.magic, kMagic, 8) == 0 && h.version == kVersion &&
                    h.samples == samples && h.identity == identity;
  if (!first_user) {
    if (!same)
      fail(ErrorCode::kIo,
           "{}: describes other data than this process opened, and another "
           "process still uses it",
           path_.string());
    return;
  }
  // Nobody else has it: whatever a killed process left (a held mutex, pins, fetches cut short)
  // goes, and what the mirror held from an earlier run is checked again before use.
  if (!same) {
    std::memset(map_, 0, size_);
    std::memcpy(h.magic, kMagic, 8);
    h.version = kVersion;
    h.samples = samples;
    h.identity = identity;
  }
  init_mutex(&h.mutex);
  h.seq = 0;
  h.bypass = 0;
  h.error_code = 0;
  h.error[0] = '\0';
  h.demand_count = 0;
  std::memset(h.processes, 0, sizeof(h.processes));
  for (uint64_t s = 0; s < samples; ++s) {
    SampleRecord& r = records_[s];
    r.pins = 0;
    if (r.state == kPresent || r.state == kUnchecked) {
      r.state = kUnchecked;
      ++restored_;
    } else {
      r.state = kAbsent;
    }
  }
}

SharedState::~SharedState() {
  if (map_) munmap(map_, size_);
}

void SharedState::lock() {
  int rc = pthread_mutex_lock(&header_->mutex);
  // Its holder died: what it changed under the lock is small and each step leaves the records
  // consistent (a pin or a state at a time); carry on.
  if (rc == EOWNERDEAD) rc = pthread_mutex_consistent(&header_->mutex);
  if (rc != 0) fail(ErrorCode::kIo, "{}: lock: {}", path_.string(), detail::errno_text(rc));
}

void SharedState::unlock() { pthread_mutex_unlock(&header_->mutex); }

void SharedState::notify() {
  __atomic_add_fetch(&header_->seq, 1, __ATOMIC_SEQ_CST);
  syscall(SYS_futex, &header_->seq, FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

void SharedState::wait(std::unique_lock<SharedState>& lock, std::chrono::milliseconds timeout) {
  const uint32_t seen = __atomic_load_n(&header_->seq, __ATOMIC_SEQ_CST);
  lock.unlock();
  timespec ts{static_cast<time_t>(timeout.count() / 1000),
              static_cast<long>(timeout.count() % 1000) * 1000000};
  // Returns at once when seq moved since it was read under the lock: no wake-up is lost.
  syscall(SYS_futex, &header_->seq, FUTEX_WAIT, seen, &ts, nullptr, 0);
  lock.lock();
}

}  // namespace sluice::cache
