#include "net/tcp.h"

#include "common/errors.h"

#include <fmt/format.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace sluice::net {

using detail::fail;
using detail::UniqueFd;

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

UniqueFd listen_tcp(const SocketAddress& addr, const std::string& text, int backlog) {
  UniqueFd fd(::socket(addr.get()->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) detail::fail_errno(errno, "listen on " + text + ": socket");
  int one = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(fd.get(), addr.get(), addr.length) != 0 || ::listen(fd.get(), backlog) != 0) {
    int err = errno;
    throw Error(ErrorCode::kIo,
                fmt::format("listen on {}: {}", text,
                            err == EADDRINUSE ? "address already in use" : std::strerror(err)),
                err);
  }
  return fd;
}

std::string local_address(int fd) {
  sockaddr_storage s{};
  socklen_t n = sizeof s;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&s), &n) != 0)
    detail::fail_errno(errno, "getsockname");
  return to_string(reinterpret_cast<const sockaddr*>(&s));
}

namespace {

int ms_left(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return static_cast<int>(std::max<int64_t>(0, left.count()));
}

// Waits until `fd` is ready for `events` or the deadline passes; returns whether it is.
// Throws "WHAT: cancelled" once `*cancel` is set (looked at every 100 ms).
bool wait_for(int fd, short events, Clock::time_point deadline, const std::atomic<bool>* cancel,
              const std::string& what) {
  while (true) {
    if (cancel && cancel->load()) fail(ErrorCode::kIo, "{}: cancelled", what);
    pollfd p{fd, events, 0};
    const int left = ms_left(deadline);
    int rc = ::poll(&p, 1, cancel ? std::min(left, 100) : left);
    if (rc > 0) return true;
    if (rc == 0 && (!cancel || left <= 100)) return false;
    if (rc < 0 && errno != EINTR) return false;
  }
}

}  // namespace

UniqueFd connect_tcp(const SocketAddress& addr, Clock::time_point deadline,
                     const std::atomic<bool>* cancel) {
  UniqueFd fd(::socket(addr.get()->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) detail::fail_errno(errno, "socket");
  int err = 0;
  if (::connect(fd.get(), addr.get(), addr.length) != 0) {
    if (errno != EINPROGRESS) {
      err = errno;
    } else if (!wait_for(fd.get(), POLLOUT, deadline, cancel, "connect")) {
      fail(ErrorCode::kIo, "connect: no answer in time");
    } else {
      socklen_t n = sizeof err;
      ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &n);
    }
  }
  if (err != 0) throw Error(ErrorCode::kIo, fmt::format("connect: {}", std::strerror(err)), err);
  ::fcntl(fd.get(), F_SETFL, ::fcntl(fd.get(), F_GETFL) & ~O_NONBLOCK);
  int one = 1;
  ::setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

void read_exact(int fd, std::span<std::byte> out, Clock::time_point deadline,
                const std::string& what, const std::atomic<bool>* cancel) {
  size_t got = 0;
  while (got < out.size()) {
    if (!wait_for(fd, POLLIN, deadline, cancel, what))
      fail(ErrorCode::kIo, "{}: no answer in time", what);
    ssize_t n = ::recv(fd, out.data() + got, out.size() - got, MSG_DONTWAIT);
    if (n > 0) {
      got += static_cast<size_t>(n);
    } else if (n == 0) {
      fail(ErrorCode::kIo, "{}: connection closed by the peer", what);
    } else if (errno != EINTR && errno != EAGAIN) {
      detail::fail_errno(errno, what);
    }
  }
}

void write_all(int fd, std::span<const std::byte> data, Clock::time_point deadline,
               const std::string& what, const std::atomic<bool>* cancel) {
  size_t sent = 0;
  while (sent < data.size()) {
    if (!wait_for(fd, POLLOUT, deadline, cancel, what))
      fail(ErrorCode::kIo, "{}: peer not reading", what);
    ssize_t n = ::send(fd, data.data() + sent, data.size() - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0)
      sent += static_cast<size_t>(n);
    else if (n < 0 && errno != EINTR && errno != EAGAIN)
      detail::fail_errno(errno, what);
  }
}

}  // namespace sluice::net
