#include "net/ucx.h"

#include "common/errors.h"

#include <fmt/format.h>

#include <dlfcn.h>
#include <poll.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace sluice::net {

using detail::fail;

namespace {

// Loaded once; a failure is kept and reported to every caller (nothing retries dlopen).
struct LoadedUcx {
  UcxLibrary api;
  std::string error;

  LoadedUcx() {
    const char* env = std::getenv("SLUICE_UCX_LIBRARY");
    const std::string file = env && *env ? env : "libucp.so.0";
    // Symbols are looked up in libucp and the libraries it needs (libucs has status strings).
    void* lib = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      error = fmt::format(
          "UCX could not be loaded ({}). Remote reads, distributed.listen / distributed.peers, "
          "checkpoint copies and `sluice serve` need UCX 1.12 or later: apt-get install libucx0 "
          "(Debian, Ubuntu), dnf install ucx (Fedora, RHEL) or conda install -c conda-forge ucx",
          dlerror());
      return;
    }
#define SLUICE_UCX_RESOLVE(f)                                \
  api.f = reinterpret_cast<decltype(api.f)>(dlsym(lib, #f)); \
  if (!api.f && error.empty())                               \
    error = fmt::format("UCX: {} has no {} (UCX 1.12 or later is needed)", file, #f);
    SLUICE_UCX_FUNCTIONS(SLUICE_UCX_RESOLVE)
#undef SLUICE_UCX_RESOLVE
  }
};

}  // namespace

const UcxLibrary& ucx() {
  static const LoadedUcx loaded;
  if (!loaded.error.empty()) fail(ErrorCode::kUnsupported, "{}", loaded.error);
  return loaded.api;
}

void check(ucs_status_t status, const std::string& what) {
  if (status != UCS_OK && status != UCS_INPROGRESS)
    fail(ErrorCode::kIo, "{}: {}", what, ucx().ucs_status_string(status));
}

Worker::Worker(ucs_thread_mode_t mode) {
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  ucp_config_t* config = nullptr;
  check(ucx().ucp_config_read(nullptr, nullptr, &config), "UCX configuration (UCX_* variables)");
  ucs_status_t st =
      ucx().ucp_init_version(UCP_API_MAJOR, UCP_API_MINOR, &params, config, &context_);
  ucx().ucp_config_release(config);
  check(st, "UCX init");
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = mode;
  st = ucx().ucp_worker_create(context_, &wp, &worker_);
  if (st != UCS_OK) {
    ucx().ucp_cleanup(context_);
    check(st, "UCX worker");
  }
  st = ucx().ucp_worker_get_efd(worker_, &efd_);
  if (st != UCS_OK) {
    ucx().ucp_worker_destroy(worker_);
    ucx().ucp_cleanup(context_);
    check(st, "UCX worker event fd");
  }
}

Worker::~Worker() {
  if (worker_) ucx().ucp_worker_destroy(worker_);
  if (context_) ucx().ucp_cleanup(context_);
}

bool Worker::progress() {
  bool any = false;
  while (ucx().ucp_worker_progress(worker_) != 0) any = true;
  return any;
}

bool Worker::wait(std::chrono::milliseconds timeout, int also, std::unique_lock<std::mutex>* lock) {
  pollfd p[2] = {{efd_, POLLIN, 0}, {also, POLLIN, 0}};
  if (progress() || !arm()) timeout = std::chrono::milliseconds(0);  // events came meanwhile
  if (lock) lock->unlock();
  ::poll(p, also >= 0 ? 2 : 1, static_cast<int>(timeout.count()));
  if (lock) lock->lock();
  return also >= 0 && (p[1].revents & (POLLIN | POLLHUP | POLLERR)) != 0;
}

bool Worker::arm() {
  ucs_status_t st = ucx().ucp_worker_arm(worker_);
  if (st == UCS_ERR_BUSY) return false;
  check(st, "UCX worker arm");
  return true;
}

std::vector<std::byte> Worker::address() const {
  ucp_address_t* a = nullptr;
  size_t n = 0;
  check(ucx().ucp_worker_get_address(worker_, &a, &n), "UCX worker address");
  std::vector<std::byte> out(n);
  std::memcpy(out.data(), a, n);
  ucx().ucp_worker_release_address(worker_, a);
  return out;
}

// Peer-failure handling (UCP_ERR_HANDLING_MODE_PEER) is what keeps a process alive when the
// other side dies mid-transfer on every transport (without it a failed RDMA queue pair is
// fatal). Its price in UCX 1.13, measured: over TCP the endpoint gets no zero-copy put lanes
// (the lane table shows am/am_bw only), so rendezvous data goes through active messages.
ucp_ep_h Worker::connect(std::span<const std::byte> address, ucp_err_handler_cb_t on_error,
                         void* arg, const std::string& who) {
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                 UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  p.address = reinterpret_cast<const ucp_address_t*>(address.data());
  p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  p.err_handler.cb = on_error;
  p.err_handler.arg = arg;
  ucp_ep_h ep = nullptr;
  check(ucx().ucp_ep_create(worker_, &p, &ep), who + ": UCX endpoint");
  return ep;
}

void Worker::signal() { ucx().ucp_worker_signal(worker_); }

void Worker::set_am_handler(uint16_t id, ucp_am_recv_callback_t cb, void* arg,
                            const std::string& who) {
  ucp_am_handler_param_t am{};
  am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  am.id = id;
  am.flags = UCP_AM_FLAG_WHOLE_MSG;
  am.cb = cb;
  am.arg = arg;
  check(ucx().ucp_worker_set_am_recv_handler(worker_, &am), who + ": AM handler");
}

ucs_status_t wait_request(Worker& worker, ucs_status_ptr_t request,
                          std::chrono::steady_clock::time_point deadline,
                          std::unique_lock<std::mutex>* lock) {
  if (request == nullptr) return UCS_OK;
  if (UCS_PTR_IS_ERR(request)) return UCS_PTR_STATUS(request);
  ucs_status_t st;
  while ((st = ucx().ucp_request_check_status(request)) == UCS_INPROGRESS) {
    if (std::chrono::steady_clock::now() >= deadline) {
      // Not every request can be cancelled (a flush waits for the connection): give it back to
      // UCX, which frees it when it completes, e.g. once the caller force-closes the endpoint.
      ucx().ucp_request_cancel(worker.get(), request);
      worker.progress();
      ucx().ucp_request_free(request);
      return UCS_ERR_TIMED_OUT;
    }
    worker.wait(std::chrono::milliseconds(10), -1, lock);
  }
  ucx().ucp_request_free(request);
  return st;
}

}  // namespace sluice::net
