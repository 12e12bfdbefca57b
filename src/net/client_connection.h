#pragma once

// A PeerClient's session with its shard server, the half of the client that knows nothing of
// requests (client.cc keeps those): the TCP connection and handshake that prove the token both
// ways, the UCX endpoints to the server, signed sends, waits on the worker that clients share,
// how the session failed, and closing it. Also that shared worker (ClientWorker::Impl), through
// which replies are routed to the requests in flight.

#include "common/file.h"
#include "net/client.h"
#include "net/crypto.h"
#include "net/tcp.h"
#include "net/ucx.h"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>

namespace sluice::net {

struct Pending;  // client_request.h

// The worker and what its clients share: request ids and the requests in flight, by id.
struct ClientWorker::Impl {
  Impl();
  ~Impl();
  std::mutex mu;  // held for every use of `worker` and of what follows, by every client
  Worker worker{UCS_THREAD_MODE_SERIALIZED};
  int waiting = 0;      // threads in ClientConnection::wait_step
  uint64_t events = 0;  // messages and receives handled, so far
  uint64_t next_id = 0;
  std::unordered_map<uint64_t, Pending*> by_id;
  // The request a message answers, as far as its header says (read before any other check, so
  // that a malformed message still fails the client it was meant for); null when none is.
  Pending* pending_of(const void* header, size_t length, size_t id_at) const {
    uint64_t id = 0;
    if (length < id_at + sizeof id) return nullptr;
    std::memcpy(&id, static_cast<const std::byte*>(header) + id_at, sizeof id);
    auto it = by_id.find(id);
    return it == by_id.end() ? nullptr : it->second;
  }
};

/// One authenticated session with the shard server at HOST:PORT, on a ClientWorker that several
/// clients may share. Every method but the constructor and destructor is called under the
/// worker's lock (mu()); the waits release it meanwhile, so other threads of the same client
/// may come in. Once failed (a dead peer, a malformed message, a closed control connection) it
/// stays failed; once broken (a call failed) the client is done.
class ClientConnection {
 public:
  using Lock = std::unique_lock<std::mutex>;

  /// Connects within options.timeout_ms on `shared` (null: a worker of its own). Throws as
  /// PeerClient::connect does.
  ClientConnection(const std::string& address, const ClientOptions& options,
                   std::shared_ptr<ClientWorker> shared);
  /// Closes both endpoints (gracefully, forced when that takes too long) and the TCP
  /// connection.
  ~ClientConnection();
  ClientConnection(const ClientConnection&) = delete;
  ClientConnection& operator=(const ClientConnection&) = delete;

  const std::string& address() const { return address_; }
  const ClientOptions& options() const { return options_; }
  ClientWorker::Impl& shared() const { return shared_->impl(); }
  Worker& worker() const { return worker_; }
  std::mutex& mu() const { return mu_; }
  Clock::time_point deadline() const {
    return Clock::now() + std::chrono::milliseconds(options_.timeout_ms);
  }

  /// Sends one request message (kRequestAm): `header`, where it has room, first names this
  /// session and carries the MAC of header and `data` under the session key (a zero MAC without
  /// `sign`). Returns false, the session failed, when the send fails or the session is closing.
  bool send(std::span<std::byte> header, std::span<const std::byte> data, bool sign);

  /// One wait of at most `most` for the worker's events, the lock released meanwhile. Messages
  /// this thread handles may be other threads' replies (the worker is shared): it wakes them.
  /// Returns whether the control connection is readable (control_event then says what it was).
  bool wait_step(Lock& lock, std::chrono::milliseconds most = std::chrono::milliseconds(10));
  /// The control connection is readable: the server closed it or sent bytes it never sends;
  /// either fails the session.
  void control_event();

  /// Whether a message that names one of this session's requests is to be taken: it came on
  /// the server's endpoint (noted from the first message) and the session is not closing.
  bool note_reply_ep(const ucp_am_recv_param_t* param);

  /// Fails the session "connection abandoned" (unless it failed already) and closes it by force,
  /// so that no late bytes land anywhere. The caller cancels its receives first.
  void abandon(Lock& lock);

  bool failed() const { return failed_; }
  /// Why the session failed, or (once broken) why the call that broke it failed.
  const std::string& failure() const { return failure_; }
  /// The session failed: `why`.
  void set_failed(std::string why) {
    failure_ = std::move(why);
    failed_ = true;
  }
  /// A call failed, the client is done: usable() throws from now on (`why`: its failure).
  void set_broken() { broken_ = true; }
  void set_broken(std::string why) {
    failure_ = std::move(why);
    broken_ = true;
  }
  /// Throws Error(kIo) naming the peer and the earlier failure once the client is broken.
  void usable() const;

 private:
  static void on_ep_error(void* arg, ucp_ep_h, ucs_status_t status);
  // Closes both endpoints, once: the lock is released while it waits, and another thread of
  // this client may come here too meanwhile (it finds them taken).
  void close(bool force, Lock& lock);

  static constexpr std::chrono::milliseconds kFlushBeforeForce{200};

  std::shared_ptr<ClientWorker> shared_;  // first: the worker outlives this client's endpoints
  Worker& worker_;
  std::mutex& mu_;  // the shared worker's lock
  std::string address_;
  ClientOptions options_;
  detail::UniqueFd control_;      // the handshake's TCP connection, open for the session
  uint64_t conn_ = 0;             // the server's id of this session
  std::unique_ptr<Mac> session_;  // signs requests
  ucp_ep_h ep_ = nullptr;
  ucp_ep_h reply_ep_ = nullptr;  // this worker's end of the server's endpoint (see note_reply_ep)
  bool closing_ = false;         // close() began: the endpoints are taken
  bool failed_ = false;          // the connection failed (error handler, malformed reply)
  bool broken_ = false;          // a read failed: this client is done
  std::string failure_;
};

}  // namespace sluice::net
