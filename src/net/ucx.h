#pragma once

// The little of UCX that the shard server and its clients share: a context + worker pair that
// owns both handles, UCX status -> sluice::Error, and HOST:PORT parsing. UCX picks the
// transport (verbs on InfiniBand/RoCE, TCP or shared memory elsewhere) from UCX_TLS and what
// the machine has; this code is the same on every fabric.

#include <sys/socket.h>
#include <ucp/api/ucp.h>

#include <chrono>
#include <string>

namespace sluice::net {

/// Throws Error(kIo) "WHAT: UCX status text" when `status` is an error.
void check(ucs_status_t status, const std::string& what);

/// A UCX context and one worker on it, single-threaded (one thread progresses it), with
/// active messages and event-fd wake-up. Move-only; the destructor tears both down.
class Worker {
 public:
  Worker();
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  ucp_worker_h get() const { return worker_; }
  /// Progresses until idle; returns whether anything happened.
  bool progress();
  /// Sleeps until UCX has an event or `timeout` passes (after arming the worker), unless events
  /// are already pending. Wakes early when another thread calls signal().
  void wait(std::chrono::milliseconds timeout);
  /// Wakes a thread in wait(); thread-safe.
  void signal();
  /// Calls `cb(arg, ...)` for every whole active message `id` that arrives; throws Error(kIo)
  /// naming `who` when UCX refuses.
  void set_am_handler(uint16_t id, ucp_am_recv_callback_t cb, void* arg, const std::string& who);

 private:
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1;
};

/// A parsed HOST:PORT ("[v6addr]:port" for IPv6). Throws Error(kInvalidArgument) naming `text`.
struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;
  static SocketAddress parse(const std::string& text);
  const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

/// "HOST:PORT" of a bound or connected socket address.
std::string to_string(const sockaddr* addr);

/// Waits for a UCX request (or immediate result) by progressing `worker`, at most until
/// `deadline`; returns its status (UCS_ERR_TIMED_OUT, after cancelling it, on time out).
ucs_status_t wait_request(Worker& worker, ucs_status_ptr_t request,
                          std::chrono::steady_clock::time_point deadline);

}  // namespace sluice::net
