#include "net/client_connection.h"

#include "common/errors.h"
#include "net/handshake.h"
#include "net/wire.h"

#include <fmt/format.h>
#include <sys/socket.h>

#include <utility>

namespace sluice::net {

using detail::fail;

ClientConnection::ClientConnection(const std::string& address, const ClientOptions& options,
                                   std::shared_ptr<ClientWorker> shared)
    : shared_(shared ? std::move(shared) : std::make_shared<ClientWorker>()),
      worker_(shared_->impl().worker),
      mu_(shared_->impl().mu),
      address_(address),
      options_(options) {
  SocketAddress addr = SocketAddress::parse(address);
  // The token is proven on a TCP connection of our own first; UCX only ever sees the worker
  // address of a server that proved it too.
  const auto until = deadline();
  Session session;
  try {
    session = client_handshake(connect_tcp(addr, until, options_.cancel), options_.token,
                               worker_.address(), until, options_.cancel);
  } catch (const Error& e) {
    if (e.code() == ErrorCode::kConfig)
      throw Error(ErrorCode::kConfig, fmt::format("peer {}: {}", address_, e.what()));
    fail(ErrorCode::kIo, "peer {}: cannot connect: {}", address_, e.what());
  }
  Lock lock(mu_);
  control_ = std::move(session.control);
  conn_ = session.conn;
  session_ = std::make_unique<Mac>(session.key);
  ep_ = worker_.connect(session.server_address, &ClientConnection::on_ep_error, this,
                        "peer " + address_);
  // The connection is set up lazily; a flush completes once it is (or fails when it cannot).
  ucp_request_param_t fp{};
  ucs_status_t st = wait_request(worker_, ucx().ucp_ep_flush_nbx(ep_, &fp), until, &lock);
  if (st != UCS_OK || failed_) {
    std::string why = failed_ ? failure_ : std::string(ucx().ucs_status_string(st));
    if (st == UCS_ERR_TIMED_OUT) why = fmt::format("no answer within {} ms", options_.timeout_ms);
    close(true, lock);
    fail(ErrorCode::kIo, "peer {}: cannot connect: {}", address_, why);
  }
}

ClientConnection::~ClientConnection() {
  Lock lock(mu_);
  close(false, lock);
}

void ClientConnection::usable() const {
  if (broken_)
    fail(ErrorCode::kIo, "peer {}: unusable after an earlier failure: {}", address_, failure_);
}

bool ClientConnection::send(std::span<std::byte> header, std::span<const std::byte> data,
                            bool sign) {
  if (closing_) {
    failed_ = true;
    if (failure_.empty()) failure_ = "connection closed";
    return false;
  }
  if (header.size() >= kRequestAuthBytes) {
    std::memcpy(header.data(), &conn_, sizeof conn_);
    RequestMac mac = sign ? request_mac(*session_, header, data) : RequestMac{};
    std::memcpy(header.data() + sizeof conn_, mac.data(), mac.size());
  }
  ucp_request_param_t sp{};
  sp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_FLAGS;
  sp.flags = UCP_AM_SEND_FLAG_EAGER;
  sp.cb.send = [](void* request, ucs_status_t, void*) { ucx().ucp_request_free(request); };
  ucs_status_ptr_t r = ucx().ucp_am_send_nbx(ep_, kRequestAm, header.data(), header.size(),
                                             data.data(), data.size(), &sp);
  if (UCS_PTR_IS_ERR(r)) {
    set_failed(fmt::format("send: {}", ucx().ucs_status_string(UCS_PTR_STATUS(r))));
    return false;
  }
  return true;
}

bool ClientConnection::wait_step(Lock& lock, std::chrono::milliseconds most) {
  auto& w = shared();
  const uint64_t before = w.events;
  ++w.waiting;
  const bool control = worker_.wait(most, control_ ? control_.get() : -1, &lock);
  --w.waiting;
  if (w.events != before && w.waiting > 0) worker_.signal();
  return control;
}

void ClientConnection::control_event() {
  if (!control_) return;
  std::byte b;
  ssize_t n = ::recv(control_.get(), &b, 1, MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  failed_ = true;
  failure_ =
      n == 0 ? "the server closed the connection" : "unexpected bytes on the control connection";
}

// Replies come on the server's own endpoint to this worker; its end here is made by UCX
// (unless UCX matched it with ep_, as it may when both sides connect at once). It carries the
// receive side of rendezvous transfers (acknowledgements back to the server), so close()
// must close it too. Returns false for a message on another endpoint: on a shared worker,
// another peer's message that names one of this client's requests, which is not taken.
bool ClientConnection::note_reply_ep(const ucp_am_recv_param_t* param) {
  if (closing_) return false;  // closed, or being closed: nothing more is taken
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)) return true;
  if (!reply_ep_) reply_ep_ = param->reply_ep;
  return param->reply_ep == reply_ep_ || param->reply_ep == ep_;
}

void ClientConnection::abandon(Lock& lock) {
  if (!failed_) {
    failed_ = true;
    failure_ = "connection abandoned";
  }
  close(true, lock);
}

void ClientConnection::on_ep_error(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* self = static_cast<ClientConnection*>(arg);
  self->failed_ = true;
  self->failure_ = fmt::format("connection lost: {}", ucx().ucs_status_string(status));
}

void ClientConnection::close(bool force, Lock& lock) {
  closing_ = true;
  if (reply_ep_ == ep_) reply_ep_ = nullptr;  // UCX matched the two endpoints into one
  for (ucp_ep_h* slot : {&reply_ep_, &ep_}) {
    ucp_ep_h taken = std::exchange(*slot, nullptr);
    if (!taken) continue;
    ucp_ep_h* ep = &taken;
    ucp_request_param_t p{};
    // UCX 1.13 aborts (an assertion in ucp_request_send_state_ff) when it purges an endpoint
    // with a wireup message still queued, e.g. this worker's answer to the server's own
    // endpoint: a force close flushes first, for a bounded time (a dead peer never answers).
    if (force)
      wait_request(worker_, ucx().ucp_ep_flush_nbx(*ep, &p), Clock::now() + kFlushBeforeForce,
                   &lock);
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    auto until = Clock::now() + std::chrono::milliseconds(force ? 1000 : 2000);
    ucs_status_t st = wait_request(worker_, ucx().ucp_ep_close_nbx(*ep, &p), until, &lock);
    if (st == UCS_ERR_TIMED_OUT && !force) {
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      wait_request(worker_, ucx().ucp_ep_close_nbx(*ep, &p), Clock::now() + std::chrono::seconds(1),
                   &lock);
    }
  }
  worker_.progress();
  control_.reset();  // tells the server this session is over
}

}  // namespace sluice::net
