#pragma once

// The IO engine: asynchronous positional reads into caller memory. Two implementations share
// one interface: io_uring (liburing) and a pread thread pool for machines where io_uring is
// blocked. read_all() drives either one and owns the policy every engine shares: queue depth,
// short reads continued, EAGAIN/EINTR retried, errors and timeouts reported per op.
//
// Errors follow liburing: 0 or a count on success, -errno on failure.

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

namespace sluice::io {

class QueueStats;  // io/queue_stats.h

/// One read in flight: `length` bytes of file `file` (an index into the engine's file table)
/// at `offset` into `dest` (or, with `write`, from `dest` to the file).
struct Request {
  uint64_t tag = 0;
  uint32_t file = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
  std::byte* dest = nullptr;
  int fd = -1;         // >= 0: read this descriptor instead of file `file` (files opened per batch)
  bool write = false;  // write `length` bytes from `dest` instead (checkpoints)
};

struct Completion {
  uint64_t tag = 0;
  int32_t result = 0;  // bytes read, or -errno
};

/// One engine per thread: not thread-safe, and an io_uring engine must be used by the thread
/// that created it (SINGLE_ISSUER).
class Engine {
 public:
  virtual ~Engine() = default;
  /// "io_uring" or "threads", plus what it could enable ("registered files", ...).
  virtual std::string describe() const = 0;
  virtual uint32_t queue_depth() const = 0;
  /// Queues one read; 0 or -errno. May block only to make room (the queue is full).
  virtual int submit(const Request& request) = 0;
  /// Hands queued reads to the kernel or the worker threads; 0 or -errno.
  virtual int flush() = 0;
  /// Waits up to `timeout` for at least one completion; returns how many it wrote to `out`
  /// (0 on timeout) or -errno.
  virtual int reap(std::span<Completion> out, std::chrono::milliseconds timeout) = 0;
  /// Lets reads into `buffer` use a registered (pinned, pre-mapped) buffer where the engine and
  /// the memlock limit allow; best effort, returns whether it did.
  virtual bool register_buffer(std::span<std::byte> buffer) {
    (void)buffer;
    return false;
  }
};

/// What one read covers, for read_all (or, with `write`, one write: checkpoints).
struct ReadOp {
  uint32_t file = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
  std::byte* dest = nullptr;
  // Bytes that must be read (0: all of `length`); past them, end of file ends the op early
  // (a block-aligned cover of a file whose size is not block-aligned).
  uint32_t required = 0;
  int fd = -1;         // as Request::fd
  bool write = false;  // write `length` bytes from `dest` to the file; no bytes taken is -EIO
};

struct ReadFailure {
  size_t op = 0;  // index into the ops span
  int error = 0;  // -errno; -ETIMEDOUT when the deadline passed; -ENODATA for end of file
  // Reads were still in flight when this returned: past the deadline they were waited for
  // another kDrainGrace, in vain. They may land in the destinations at any later time, so the
  // caller must never reuse or free that memory (leak it, and the engine that reads into it).
  bool in_flight = false;
};

/// How long a job past its deadline waits for its reads in flight before giving up on them
/// (ReadFailure::in_flight).
inline constexpr std::chrono::milliseconds kDrainGrace{2000};

/// Reads every op completely with up to queue_depth() in flight. Returns nullopt-like
/// (error == 0) on success, else the first failure. Never returns while a read it submitted
/// is still in flight, except with ReadFailure::in_flight set (see there): past the deadline
/// it stops submitting and waits up to kDrainGrace for the reads in flight.
/// When `*cancel` becomes true, no new reads start; those in flight are drained and the
/// result is -ECANCELED. `stats`, when given, is noted with the reads in flight over time
/// (io/queue_stats.h; keep one per calling thread: its clock runs across calls).
ReadFailure read_all(Engine& engine, std::span<const ReadOp> ops,
                     std::chrono::steady_clock::time_point deadline,
                     const std::atomic<bool>* cancel = nullptr, QueueStats* stats = nullptr);

/// The io layer's own options (the config's io.engine and io.queue_depth, mapped in
/// read/dataset_files.h: nothing here reads <sluice/options.h>).
enum class EngineKind { kAuto, kUring, kThreads };

/// Test seams, carried per instance in the options of what is tested (as leveldb's Env is), so
/// that tests in one process never see each other's faults. Empty: normal operation.
struct Faults {
  /// io_uring setup fails with this -errno, as seccomp, kernel.io_uring_disabled or a low
  /// memlock limit would make it.
  int uring_setup = 0;
  /// Buffer registration fails with this -errno (a low memlock limit).
  int register_buffers = 0;
  /// Every engine made passes through this (fault injection at the engine boundary).
  std::function<std::unique_ptr<Engine>(std::unique_ptr<Engine>)> wrap_engine;
};

struct EngineOptions {
  EngineKind kind = EngineKind::kAuto;
  uint32_t queue_depth = 128;            // reads in flight
  std::shared_ptr<const Faults> faults;  // tests only
  // A layer over every engine made, above the tests' wrap_engine: the node cache's fallback
  // to its source when the cache disk fails (cache/sample_cache.h). Empty: none.
  std::function<std::unique_ptr<Engine>(std::unique_ptr<Engine>)> layer;
};

/// Creates the engine that `options.kind` asks for over `files` (file descriptors, indexed
/// by Request::file). kAuto picks io_uring and falls back to threads when io_uring is blocked
/// (seccomp, kernel.io_uring_disabled, ENOMEM); `on_choice` is called with a one-line account
/// of what was chosen and why. kUring throws Error(kUnsupported) when io_uring is unavailable.
std::unique_ptr<Engine> make_engine(const EngineOptions& options, std::span<const int> files,
                                    const std::function<void(const std::string&)>& on_choice);

std::unique_ptr<Engine> make_uring_engine(uint32_t queue_depth, std::span<const int> files,
                                          int* error, std::string* notes,
                                          const Faults* faults = nullptr);
std::unique_ptr<Engine> make_thread_engine(uint32_t queue_depth, std::span<const int> files);

}  // namespace sluice::io
