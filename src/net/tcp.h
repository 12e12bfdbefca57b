#pragma once

// Plain TCP for the shard server's front door: parsing HOST:PORT, a listening socket, and
// blocking-with-deadline connect, read and write for the client's side of the handshake.

#include "common/file.h"

#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <span>
#include <string>

namespace sluice::net {

using Clock = std::chrono::steady_clock;

/// A parsed HOST:PORT ("[v6addr]:port" for IPv6). Throws Error(kInvalidArgument) naming `text`.
struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;
  static SocketAddress parse(const std::string& text);
  const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

/// "HOST:PORT" of a bound or connected socket address.
std::string to_string(const sockaddr* addr);

/// A non-blocking listening socket on `addr` (SO_REUSEADDR, so that a restarted server gets its
/// port back at once), with `backlog`. Throws Error(kIo) "listen on TEXT: address already in
/// use" and the like.
detail::UniqueFd listen_tcp(const SocketAddress& addr, const std::string& text, int backlog);

/// The address a socket is bound to.
std::string local_address(int fd);

/// Connects to `addr` by `deadline`. Returns a blocking socket with TCP_NODELAY; throws
/// Error(kIo) "connect: ..." (refused, unreachable, "no answer within N ms"). Each of these
/// waits also ends, within 100 ms, when `*cancel` is set (Error(kIo) "...: cancelled").
detail::UniqueFd connect_tcp(const SocketAddress& addr, Clock::time_point deadline,
                             const std::atomic<bool>* cancel = nullptr);

/// Reads exactly out.size() bytes by `deadline`; throws Error(kIo) naming `what` on a timeout,
/// an error, or the peer closing first.
void read_exact(int fd, std::span<std::byte> out, Clock::time_point deadline,
                const std::string& what, const std::atomic<bool>* cancel = nullptr);
/// Writes all of `data` by `deadline`; throws Error(kIo) naming `what`.
void write_all(int fd, std::span<const std::byte> data, Clock::time_point deadline,
               const std::string& what, const std::atomic<bool>* cancel = nullptr);

}  // namespace sluice::net
