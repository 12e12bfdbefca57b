#pragma once

// The shard server's connections: its TCP listener, each client's handshake (bounded, checked
// as it comes, timed out) and then its UCX endpoint, with the TCP socket kept open to tell when
// the client goes away. Progress thread only.

#include <sluice/server.h>

#include "common/file.h"
#include "common/log.h"
#include "net/crypto.h"
#include "net/handshake.h"
#include "net/tcp.h"
#include "net/ucx.h"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace sluice::net {

// One client connection: first the handshake on its TCP socket, then (ready) its UCX endpoint
// for replies, with the TCP socket kept open to tell when the client goes away.
struct Conn {
  uint64_t id = 0;  // random: requests name it, and nobody can guess another client's
  detail::UniqueFd fd;
  std::string peer;  // the client's HOST:PORT, for log lines
  bool ready = false;
  Clock::time_point deadline;  // of the handshake
  Nonce nonce{};
  std::vector<std::byte> in;   // handshake bytes received so far
  std::vector<std::byte> out;  // handshake bytes to send, from out_sent
  size_t out_sent = 0;
  std::unique_ptr<Mac> session;  // checks this connection's requests
  ucp_ep_h ep = nullptr;
  uint32_t outstanding = 0;    // requests queued, being read or their replies being sent
  uint32_t unsent_errors = 0;  // error and busy replies UCX has not sent yet
};

/// What the server counts and drops as connections come and go (progress thread).
struct ConnectionEvents {
  std::function<void()> refused;            // a connection refused, or its handshake failed
  std::function<void()> ready;              // a handshake completed
  std::function<void(const Conn&)> closed;  // a connection is about to be forgotten
};

class Connections {
 public:
  /// Listens on options.listen; the worker's event fd is watched with the sockets, so that
  /// poll() wakes for UCX events too. Throws naming the address when it cannot listen.
  Connections(const ServerOptions& options, const Mac& token, Worker& worker,
              ConnectionEvents events);
  Connections(const Connections&) = delete;
  Connections& operator=(const Connections&) = delete;

  /// HOST:PORT it listens on.
  const std::string& address() const { return address_; }
  /// Every 100 ms: refuses handshakes past their deadline, resumes accepting after a pause.
  void tick(Clock::time_point now);
  /// Waits up to `timeout_ms` for the listener, a connection or the worker's event fd, and
  /// handles what came (accepts, handshake bytes, closes).
  void poll(int timeout_ms);
  /// A connection by id (handshakes included), or nullptr.
  Conn* find(uint64_t id);
  /// Forgets a connection: its socket, its endpoint (force-closed: sends under way fail), and
  /// (ConnectionEvents::closed) its requests. `why` (unless empty) goes to the log.
  void close(Conn& c, const std::string& why);
  /// Closes every connection, then the listener.
  void close_all();

 private:
  void watch(int fd, uint64_t tag, uint32_t events, int op);
  void accept_all();
  bool shed_one();
  uint64_t new_conn_id();
  void on_conn_event(uint64_t id, uint32_t events);
  bool flush(Conn& c);
  void receive(Conn& c);
  void finish_handshake(Conn& c, const HelloParse& hello);
  void refuse(Conn& c, AcceptStatus status, const std::string& why);
  void expire_handshakes(Clock::time_point now);
  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t status);
  void close_ep(ucp_ep_h ep);

  const ServerOptions& options_;
  const Mac& token_;  // HMAC-SHA256 under the token (empty with no_token)
  Worker& worker_;
  std::vector<std::byte> worker_address_;
  ConnectionEvents events_;
  detail::UniqueFd listen_fd_;
  detail::UniqueFd epoll_fd_;
  detail::UniqueFd reserve_fd_;  // spent to accept-and-close when out of descriptors
  std::string address_;
  // One line a second each, so that a flood of one kind (a port scan) hides no other kind.
  detail::RateLimitedLog accept_log_;  // connections over the limits
  detail::RateLimitedLog fd_log_;      // out of descriptors, accept errors
  detail::RateLimitedLog close_log_;   // connections closed: garbage, handshakes, errors

  std::unordered_map<uint64_t, std::unique_ptr<Conn>> conns_;  // by id, handshakes included
  std::unordered_map<ucp_ep_h, uint64_t> ep_ids_;
  uint32_t handshakes_ = 0;  // connections in conns_ not ready yet
  bool accept_paused_ = false;
  Clock::time_point accept_resume_;
};

}  // namespace sluice::net
