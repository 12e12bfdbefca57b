#include "net/connections.h"

#include "common/errors.h"

#include <fmt/format.h>

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <span>

namespace sluice::net {

namespace {

// epoll tags of the two descriptors that are not connections (connection ids are never these).
constexpr uint64_t kListenTag = 0;
constexpr uint64_t kWorkerTag = 1;

template <typename T>
void append(std::vector<std::byte>& out, const T& value) {
  auto b = std::as_bytes(std::span(&value, 1));
  out.insert(out.end(), b.begin(), b.end());
}

}  // namespace

Connections::Connections(const ServerOptions& options, const Mac& token, Worker& worker,
                         ConnectionEvents events)
    : options_(options),
      token_(token),
      worker_(worker),
      worker_address_(worker.address()),
      events_(std::move(events)) {
  SocketAddress addr = SocketAddress::parse(options.listen);
  listen_fd_ =
      listen_tcp(addr, options.listen, static_cast<int>(std::max(16u, options.max_handshakes)));
  address_ = local_address(listen_fd_.get());
  reserve_fd_ = detail::UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  epoll_fd_ = detail::UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epoll_fd_) detail::fail_errno(errno, "shard server: epoll");
  watch(worker_.event_fd(), kWorkerTag, EPOLLIN, EPOLL_CTL_ADD);
  watch(listen_fd_.get(), kListenTag, EPOLLIN, EPOLL_CTL_ADD);
}

void Connections::tick(Clock::time_point now) {
  expire_handshakes(now);
  if (accept_paused_ && now >= accept_resume_) {
    accept_paused_ = false;
    watch(listen_fd_.get(), kListenTag, EPOLLIN, EPOLL_CTL_ADD);
  }
}

void Connections::poll(int timeout_ms) {
  epoll_event events[64];
  int n = ::epoll_wait(epoll_fd_.get(), events, 64, timeout_ms);
  for (int i = 0; i < n; ++i) {
    const uint64_t tag = events[i].data.u64;
    if (tag == kListenTag)
      accept_all();
    else if (tag != kWorkerTag)
      on_conn_event(tag, events[i].events);
  }
}

Conn* Connections::find(uint64_t id) {
  auto it = conns_.find(id);
  return it == conns_.end() ? nullptr : it->second.get();
}

void Connections::close_all() {
  while (!conns_.empty()) close(*conns_.begin()->second, "");
  listen_fd_.reset();
}

void Connections::watch(int fd, uint64_t tag, uint32_t events, int op) {
  epoll_event e{};
  e.events = events;
  e.data.u64 = tag;
  if (::epoll_ctl(epoll_fd_.get(), op, fd, &e) != 0 && op != EPOLL_CTL_DEL)
    detail::fail_errno(errno, "shard server: epoll_ctl");
}

// Takes every connection waiting in the backlog. Over the limits (connections, handshakes
// under way) or out of descriptors, a connection is closed at once: the backlog never fills
// with connections nobody serves, and the loop never spins on one it cannot take.
void Connections::accept_all() {
  while (true) {
    sockaddr_storage sa{};
    socklen_t len = sizeof sa;
    int fd = ::accept4(listen_fd_.get(), reinterpret_cast<sockaddr*>(&sa), &len,
                       SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      if (err == EINTR || err == ECONNABORTED) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) return;
      if ((err == EMFILE || err == ENFILE) && shed_one()) continue;
      // Out of descriptors with none in reserve, or another error: stop accepting for a
      // moment instead of spinning on a listener that stays readable.
      fd_log_.log(
          fmt::format("shard server {}: accept: {}; not accepting for 100 ms ({} "
                      "connections open)",
                      address_, std::strerror(err), conns_.size()));
      watch(listen_fd_.get(), kListenTag, 0, EPOLL_CTL_DEL);
      accept_paused_ = true;
      accept_resume_ = Clock::now() + std::chrono::milliseconds(100);
      return;
    }
    detail::UniqueFd owned(fd);
    std::string peer = to_string(reinterpret_cast<const sockaddr*>(&sa));
    if (handshakes_ >= options_.max_handshakes ||
        conns_.size() - handshakes_ >= options_.max_connections) {
      events_.refused();
      accept_log_.log(
          fmt::format("shard server {}: refused {}: {} connections and {} handshakes "
                      "open (limits {} and {})",
                      address_, peer, conns_.size() - handshakes_, handshakes_,
                      options_.max_connections, options_.max_handshakes));
      continue;
    }
    auto c = std::make_unique<Conn>();
    c->id = new_conn_id();
    c->fd = std::move(owned);
    c->peer = std::move(peer);
    c->deadline = Clock::now() + std::chrono::milliseconds(options_.handshake_timeout_ms);
    random_bytes(c->nonce);
    ServerHello hello;
    hello.nonce = c->nonce;
    if (options_.no_token) hello.flags |= kServerOpen;
    append(c->out, hello);
    Conn& conn = *c;
    conns_[c->id] = std::move(c);
    ++handshakes_;
    watch(conn.fd.get(), conn.id, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_ADD);
    flush(conn);
  }
}

// At the descriptor limit: the one kept in reserve makes room to accept a connection and
// close it at once (so that the client sees a close, not a hang). False when none is left.
bool Connections::shed_one() {
  if (!reserve_fd_) return false;
  reserve_fd_.reset();
  detail::UniqueFd victim(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
  const bool took = static_cast<bool>(victim);
  victim.reset();
  reserve_fd_ = detail::UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (took) {
    events_.refused();
    fd_log_.log(
        fmt::format("shard server {}: out of file descriptors ({} connections open): "
                    "closing new connections at once",
                    address_, conns_.size()));
  }
  return took && reserve_fd_;
}

uint64_t Connections::new_conn_id() {
  uint64_t id = 0;
  while (id == kListenTag || id == kWorkerTag || conns_.count(id))
    random_bytes(std::span(reinterpret_cast<uint8_t*>(&id), sizeof id));
  return id;
}

void Connections::on_conn_event(uint64_t id, uint32_t events) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  Conn& c = *it->second;
  if ((events & EPOLLOUT) && !flush(c)) return;
  if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) receive(c);
}

// Sends what is left of c.out; returns false when that closed the connection.
bool Connections::flush(Conn& c) {
  while (c.out_sent < c.out.size()) {
    ssize_t n = ::send(c.fd.get(), c.out.data() + c.out_sent, c.out.size() - c.out_sent,
                       MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      c.out_sent += static_cast<size_t>(n);
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      watch(c.fd.get(), c.id, EPOLLIN | EPOLLRDHUP | EPOLLOUT, EPOLL_CTL_MOD);
      return true;
    } else {
      close(c, fmt::format("send: {}", std::strerror(errno)));
      return false;
    }
  }
  if (!c.out.empty()) {
    c.out = {};
    c.out_sent = 0;
    watch(c.fd.get(), c.id, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_MOD);
  }
  return true;
}

// Bytes on a connection's socket: the client's hello (bounded, checked as it comes), then
// nothing but its close.
void Connections::receive(Conn& c) {
  std::byte buf[4096];
  while (true) {
    ssize_t n = ::recv(c.fd.get(), buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    if (n < 0) return close(c, fmt::format("receive: {}", std::strerror(errno)));
    if (n == 0) return close(c, c.ready ? "" : "closed during the handshake");
    if (c.ready) return close(c, "sent bytes after the handshake");
    c.in.insert(c.in.end(), buf, buf + n);
    HelloParse hello = parse_client_hello(c.in);
    if (hello.state == HelloParse::kBad) return refuse(c, AcceptStatus::kRefused, hello.error);
    if (hello.state == HelloParse::kComplete) return finish_handshake(c, hello);
  }
}

void Connections::finish_handshake(Conn& c, const HelloParse& hello) {
  Digest want = client_proof(token_, c.nonce, hello.hello.nonce, hello.address);
  if (!equal_constant_time(want, hello.hello.proof))
    return refuse(c, AcceptStatus::kUnauthorized,
                  options_.no_token ? "token mismatch: this server runs without a token"
                                    : "token mismatch: this server needs the cluster's token");
  try {
    c.ep = worker_.connect(hello.address, &Connections::on_ep_error, this, "client " + c.peer);
  } catch (const Error& e) {
    return refuse(c, AcceptStatus::kRefused, e.what());
  }
  ep_ids_[c.ep] = c.id;
  c.session = std::make_unique<Mac>(session_key(token_, c.nonce, hello.hello.nonce, c.id));
  Accept a;
  a.conn = c.id;
  a.data_bytes = static_cast<uint32_t>(worker_address_.size());
  a.proof = server_proof(token_, c.nonce, hello.hello.nonce, c.id, hello.address, worker_address_);
  append(c.out, a);
  c.out.insert(c.out.end(), worker_address_.begin(), worker_address_.end());
  c.in = {};
  c.ready = true;
  --handshakes_;
  events_.ready();
  flush(c);
}

// Ends a handshake that failed: one line in the log (rate-limited), the reason to the client
// if its socket takes it at once, and the connection closed.
void Connections::refuse(Conn& c, AcceptStatus status, const std::string& why) {
  events_.refused();
  Accept a;
  a.status = status;
  std::string text = why.substr(0, kMaxRefusalText);
  a.data_bytes = static_cast<uint32_t>(text.size());
  std::vector<std::byte> out;
  append(out, a);
  auto t = std::as_bytes(std::span(text));
  out.insert(out.end(), t.begin(), t.end());
  [[maybe_unused]] ssize_t sent =
      ::send(c.fd.get(), out.data(), out.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  close(c, why);
}

void Connections::expire_handshakes(Clock::time_point now) {
  std::vector<Conn*> late;
  for (auto& [id, c] : conns_)
    if (!c->ready && now >= c->deadline) late.push_back(c.get());
  for (Conn* c : late)
    refuse(*c, AcceptStatus::kRefused,
           fmt::format("no complete hello within {} ms", options_.handshake_timeout_ms));
}

void Connections::close(Conn& c, const std::string& why) {
  if (!why.empty())
    close_log_.log(fmt::format("shard server {}: closed {}: {}", address_, c.peer, why));
  watch(c.fd.get(), c.id, 0, EPOLL_CTL_DEL);
  if (!c.ready) --handshakes_;
  if (c.ep) {
    ep_ids_.erase(c.ep);
    close_ep(c.ep);
  }
  events_.closed(c);
  conns_.erase(c.id);
}

// A client's endpoint failed (it died, or its connection broke): forget the client.
void Connections::on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t status) {
  auto* self = static_cast<Connections*>(arg);
  auto it = self->ep_ids_.find(ep);
  if (it == self->ep_ids_.end()) return;
  auto c = self->conns_.find(it->second);
  if (c != self->conns_.end()) {
    c->second->ep = nullptr;  // closed below, not again in close_conn
    self->ep_ids_.erase(it);
    self->close_ep(ep);
    self->close(*c->second, status == UCS_ERR_CONNECTION_RESET
                                ? ""
                                : fmt::format("endpoint: {}", ucx().ucs_status_string(status)));
  }
}

void Connections::close_ep(ucp_ep_h ep) {
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_EP_CLOSE_FLAG_FORCE;
  ucs_status_ptr_t r = ucx().ucp_ep_close_nbx(ep, &p);
  if (UCS_PTR_IS_PTR(r)) ucx().ucp_request_free(r);  // released by UCX once the close completes
}

}  // namespace sluice::net
