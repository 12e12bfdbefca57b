#pragma once

// The little of UCX that the shard server and its clients share: a context + worker pair that
// owns both handles, and UCX status -> sluice::Error. Endpoints are made from worker addresses
// that the handshake (net/handshake.h) exchanged; UCX's own connection manager is never
// exposed to the network. UCX picks the
// transport (verbs on InfiniBand/RoCE, TCP or shared memory elsewhere) from UCX_TLS and what
// the machine has; this code is the same on every fabric.

#include <ucp/api/ucp.h>

#include <chrono>
#include <cstddef>
#include <mutex>
#include <span>
#include <string>
#include <vector>

namespace sluice::net {

// UCX is loaded when first used (a Worker made: remote reads, `distributed.listen`/`peers`,
// checkpoint copies, `sluice serve`), not linked: a single-node user, and a wheel that does not
// bundle it, never need it installed. Only the functions below are called, through ucx().
#define SLUICE_UCX_FUNCTIONS(X)                                                                  \
  X(ucp_am_recv_data_nbx)                                                                        \
  X(ucp_am_send_nbx) X(ucp_cleanup) X(ucp_config_read) X(ucp_config_release) X(ucp_ep_close_nbx) \
      X(ucp_ep_create) X(ucp_ep_flush_nbx) X(ucp_init_version) X(ucp_request_cancel)             \
          X(ucp_request_check_status) X(ucp_request_free) X(ucp_worker_arm) X(ucp_worker_create) \
              X(ucp_worker_destroy) X(ucp_worker_flush_nbx) X(ucp_worker_get_address)            \
                  X(ucp_worker_get_efd) X(ucp_worker_progress) X(ucp_worker_release_address)     \
                      X(ucp_worker_set_am_recv_handler) X(ucp_worker_signal) X(ucs_status_string)

struct UcxLibrary {
#define SLUICE_UCX_MEMBER(f) decltype(&::f) f = nullptr;
  SLUICE_UCX_FUNCTIONS(SLUICE_UCX_MEMBER)
#undef SLUICE_UCX_MEMBER
};

/// UCX's functions, from libucp.so.0 loaded on the first call (SLUICE_UCX_LIBRARY names
/// another file). Throws Error(kUnavailable) naming what to install when it cannot be loaded.
const UcxLibrary& ucx();

/// Throws Error(kIo) "WHAT: UCX status text" when `status` is an error.
void check(ucs_status_t status, const std::string& what);

/// A UCX context and one worker on it, with active messages and event-fd wake-up. Single
/// (one thread uses it), or serialized (several threads, one at a time: the caller's lock).
/// Move-only; the destructor tears both down.
class Worker {
 public:
  explicit Worker(ucs_thread_mode_t mode = UCS_THREAD_MODE_SINGLE);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  ucp_worker_h get() const { return worker_; }
  /// Progresses until idle; returns whether anything happened.
  bool progress();
  /// Sleeps until UCX has an event, `also` (a descriptor, -1: none) is readable or `timeout`
  /// passes (after arming the worker), unless events are already pending. Wakes early when
  /// another thread calls signal(). Returns whether `also` is readable. A serialized worker's
  /// caller passes its lock, which is released while it sleeps.
  bool wait(std::chrono::milliseconds timeout, int also = -1,
            std::unique_lock<std::mutex>* lock = nullptr);
  /// Arms the worker's event fd for a wait of the caller's own (epoll); returns false when
  /// events are pending instead (progress first).
  bool arm();
  int event_fd() const { return efd_; }
  /// Wakes a thread in wait(); thread-safe.
  void signal();
  /// Calls `cb(arg, ...)` for every whole active message `id` that arrives; throws Error(kIo)
  /// naming `who` when UCX refuses.
  void set_am_handler(uint16_t id, ucp_am_recv_callback_t cb, void* arg, const std::string& who);
  /// This worker's address, for the other side's connect().
  std::vector<std::byte> address() const;
  /// An endpoint to the worker at `address` (from a peer that proved the token), with peer
  /// failure reported to `on_error`. Throws Error(kIo) naming `who`.
  ucp_ep_h connect(std::span<const std::byte> address, ucp_err_handler_cb_t on_error, void* arg,
                   const std::string& who);

 private:
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1;
};

/// Waits for a UCX request (or immediate result) by progressing `worker`, at most until
/// `deadline`; returns its status (UCS_ERR_TIMED_OUT, after cancelling it, on time out).
ucs_status_t wait_request(Worker& worker, ucs_status_ptr_t request,
                          std::chrono::steady_clock::time_point deadline,
                          std::unique_lock<std::mutex>* lock = nullptr);

}  // namespace sluice::net
