#include "net/ucx.h"

#include "common/errors.h"

#include <fmt/format.h>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>

#include <cerrno>
#include <cstring>

namespace sluice::net {

using detail::fail;

void check(ucs_status_t status, const std::string& what) {
  if (status != UCS_OK && status != UCS_INPROGRESS)
    fail(ErrorCode::kIo, "{}: {}", what, ucs_status_string(status));
}

Worker::Worker() {
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  ucp_config_t* config = nullptr;
  check(ucp_config_read(nullptr, nullptr, &config), "UCX configuration (UCX_* variables)");
  ucs_status_t st = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  check(st, "UCX init");
  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  st = ucp_worker_create(context_, &wp, &worker_);
  if (st != UCS_OK) {
    ucp_cleanup(context_);
    check(st, "UCX worker");
  }
  st = ucp_worker_get_efd(worker_, &efd_);
  if (st != UCS_OK) {
    ucp_worker_destroy(worker_);
    ucp_cleanup(context_);
    check(st, "UCX worker event fd");
  }
}

Worker::~Worker() {
  if (worker_) ucp_worker_destroy(worker_);
  if (context_) ucp_cleanup(context_);
}

bool Worker::progress() {
  bool any = false;
  while (ucp_worker_progress(worker_) != 0) any = true;
  return any;
}

void Worker::wait(std::chrono::milliseconds timeout) {
  if (progress()) return;
  ucs_status_t st = ucp_worker_arm(worker_);
  if (st == UCS_ERR_BUSY) return;  // events arrived meanwhile: progress again
  check(st, "UCX worker arm");
  pollfd p{efd_, POLLIN, 0};
  ::poll(&p, 1, static_cast<int>(timeout.count()));
}

void Worker::signal() { ucp_worker_signal(worker_); }

void Worker::set_am_handler(uint16_t id, ucp_am_recv_callback_t cb, void* arg,
                            const std::string& who) {
  ucp_am_handler_param_t am{};
  am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                  UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
  am.id = id;
  am.flags = UCP_AM_FLAG_WHOLE_MSG;
  am.cb = cb;
  am.arg = arg;
  check(ucp_worker_set_am_recv_handler(worker_, &am), who + ": AM handler");
}

SocketAddress SocketAddress::parse(const std::string& text) {
  std::string host, port;
  if (!text.empty() && text[0] == '[') {
    size_t close = text.find(']');
    if (close != std::string::npos && close + 1 < text.size() && text[close + 1] == ':') {
      host = text.substr(1, close - 1);
      port = text.substr(close + 2);
    }
  } else if (size_t colon = text.rfind(':'); colon != std::string::npos) {
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  if (host.empty() || port.empty() || port.find_first_not_of("0123456789") != std::string::npos)
    fail(ErrorCode::kInvalidArgument, "\"{}\": expected HOST:PORT", text);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0 || !res)
    fail(ErrorCode::kInvalidArgument, "\"{}\": cannot resolve {}: {}", text, host,
         ::gai_strerror(rc));
  SocketAddress a;
  std::memcpy(&a.storage, res->ai_addr, res->ai_addrlen);
  a.length = res->ai_addrlen;
  ::freeaddrinfo(res);
  return a;
}

std::string to_string(const sockaddr* addr) {
  char host[INET6_ADDRSTRLEN] = {0};
  if (addr->sa_family == AF_INET) {
    auto* in = reinterpret_cast<const sockaddr_in*>(addr);
    ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    return fmt::format("{}:{}", host, ntohs(in->sin_port));
  }
  if (addr->sa_family == AF_INET6) {
    auto* in6 = reinterpret_cast<const sockaddr_in6*>(addr);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    return fmt::format("[{}]:{}", host, ntohs(in6->sin6_port));
  }
  return "(unknown address family)";
}

ucs_status_t wait_request(Worker& worker, ucs_status_ptr_t request,
                          std::chrono::steady_clock::time_point deadline) {
  if (request == nullptr) return UCS_OK;
  if (UCS_PTR_IS_ERR(request)) return UCS_PTR_STATUS(request);
  ucs_status_t st;
  while ((st = ucp_request_check_status(request)) == UCS_INPROGRESS) {
    if (std::chrono::steady_clock::now() >= deadline) {
      // Not every request can be cancelled (a flush waits for the connection): give it back to
      // UCX, which frees it when it completes, e.g. once the caller force-closes the endpoint.
      ucp_request_cancel(worker.get(), request);
      worker.progress();
      ucp_request_free(request);
      return UCS_ERR_TIMED_OUT;
    }
    worker.wait(std::chrono::milliseconds(10));
  }
  ucp_request_free(request);
  return st;
}

}  // namespace sluice::net
