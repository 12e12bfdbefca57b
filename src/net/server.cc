#include <sluice/server.h>

#include "common/errors.h"
#include "common/file.h"
#include "common/host.h"
#include "common/log.h"
#include "config/io_options.h"
#include "format/layout.h"
#include "index/internals.h"
#include "io/service.h"
#include "memory/aligned_buffer.h"
#include "net/handshake.h"
#include "net/replica_store.h"
#include "net/server.h"
#include "net/tcp.h"
#include "net/ucx.h"
#include "net/wire.h"
#include "read/direct.h"
#include "read/record_reader.h"

#include <fmt/format.h>

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <deque>
#include <fstream>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

namespace sluice::net {
namespace {

// Reply data lives in pooled memory::AlignedBuffers: zeroed once when allocated (so a reply
// never carries memory other than dataset bytes), then reused. Reuse is what keeps them
// registered: UCX registers a send buffer with the NIC (verbs) on first use and keeps it in its
// registration cache, so a pooled buffer is registered once. (Mapping them ourselves with
// ucp_mem_map gave nothing more and made shutdown racy: UCX may still hold a region when a
// send to a dead peer is cancelled.)
using memory::AlignedBuffer;

class ServerImpl;

// A record that goes in a message of its own, straight from where it lies: the shard's
// mapping (page cache) or the reply buffer it was read into (direct I/O).
struct Part {
  RecordHeader header;
  const std::byte* data = nullptr;
};

// One reply in flight: its messages' headers and data stay alive until UCX reports every send
// complete.
struct Reply {
  ReplyHeader header;
  AlignedBuffer buffer;
  size_t size = 0;  // bytes of the kReplyAm data, from buffer.data()
  std::vector<Part> parts;
  size_t sends_left = 0;
  uint64_t conn = 0;    // the connection it answers
  bool counted = true;  // a data reply: counts in Conn::outstanding (else in Conn::unsent_errors)
  ServerImpl* owner = nullptr;
};

// A shard file mapped read-only, for records sent straight from the page cache.
struct Mapping {
  const std::byte* data = nullptr;
  size_t size = 0;
};

struct Job {
  uint64_t conn = 0;
  uint64_t request_id = 0;
  uint32_t separate_bytes = 0;  // as RequestHeader::separate_bytes
  std::vector<uint64_t> indices;
  // A checkpoint op instead (its names and payload copied out of the message).
  std::optional<CheckpointRequest> checkpoint;
  std::vector<std::byte> payload;
};

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

// Error replies a client may leave unsent (it floods requests and takes no replies) before it
// is disconnected: they are small, but not free.
constexpr uint32_t kMaxUnsentErrors = 1024;

// epoll tags of the two descriptors that are not connections (connection ids are never these).
constexpr uint64_t kListenTag = 0;
constexpr uint64_t kWorkerTag = 1;

class ServerImpl final : public ShardServer {
 public:
  ServerImpl(std::shared_ptr<const Dataset> dataset, const ServerOptions& options,
             ServerFaults faults)
      : dataset_(std::move(dataset)),
        options_(options),
        faults_(std::move(faults)),
        token_(std::span(reinterpret_cast<const uint8_t*>(options.token.data()),
                         options.token.size())) {
    SocketAddress addr = SocketAddress::parse(options.listen);
    if (dataset_)
      open_io();
    else
      io_description_ = "no dataset";
    if (!options_.checkpoint_dir.empty())
      store_ = std::make_unique<ReplicaStore>(options_.checkpoint_dir);
    worker_.set_am_handler(kRequestAm, &ServerImpl::on_request, this, "shard server");
    worker_address_ = worker_.address();
    listen_fd_ =
        listen_tcp(addr, options.listen, static_cast<int>(std::max(16u, options.max_handshakes)));
    address_ = local_address(listen_fd_.get());
    reserve_fd_ = detail::UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    epoll_fd_ = detail::UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
    if (!epoll_fd_) detail::fail_errno(errno, "shard server: epoll");
    watch(worker_.event_fd(), kWorkerTag, EPOLLIN);
    watch(listen_fd_.get(), kListenTag, EPOLLIN);
    for (uint32_t i = 0; i < std::max(1u, options_.read_threads); ++i)
      readers_.emplace_back([this] { read_loop(); });
    progress_thread_ = std::thread([this] { progress_loop(); });
    // The data fits in memory (io.direct: auto chose the page cache): read it in before clients
    // ask, so that their first epoch does not pay a random disk read per sample.
    if (warm_ && dataset_)
      warm_thread_ = std::thread([this] { warm_page_cache(*dataset_, warm_stop_); });
  }

  ~ServerImpl() override {
    warm_stop_ = true;
    if (warm_thread_.joinable()) warm_thread_.join();
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    jobs_cv_.notify_all();
    for (auto& t : readers_) t.join();
    worker_.signal();
    progress_thread_.join();
    for (const Mapping& m : maps_)
      if (m.data) ::munmap(const_cast<std::byte*>(m.data), m.size);
  }

  std::string address() const override { return address_; }
  std::string io_description() const override { return io_description_; }

  ServerStats stats() const override {
    std::lock_guard lock(mu_);
    return stats_;
  }

 private:
  // --- progress thread: connections, handshakes and everything that touches UCX ---------------

  void progress_loop() {
    epoll_event events[64];
    auto next_check = Clock::now();
    while (true) {
      worker_.progress();
      send_finished();
      {
        std::lock_guard lock(mu_);
        if (stop_) break;
      }
      if (auto now = Clock::now(); now >= next_check) {
        expire_handshakes(now);
        if (accept_paused_ && now >= accept_resume_) {
          accept_paused_ = false;
          watch(listen_fd_.get(), kListenTag, EPOLLIN);
        }
        next_check = now + std::chrono::milliseconds(100);
      }
      // With UCX events pending, look at the sockets without sleeping, then progress again:
      // a busy data path never starves the listener and the handshakes.
      const int timeout_ms = worker_.arm() ? 100 : 0;
      int n = ::epoll_wait(epoll_fd_.get(), events, 64, timeout_ms);
      for (int i = 0; i < n; ++i) {
        const uint64_t tag = events[i].data.u64;
        if (tag == kListenTag)
          accept_all();
        else if (tag != kWorkerTag)
          on_conn_event(tag, events[i].events);
      }
    }
    // Shut down: close every connection, let their sends fail, then stop listening.
    while (!conns_.empty()) close_conn(*conns_.begin()->second, "");
    auto until = Clock::now() + std::chrono::seconds(2);
    while (in_flight_ > 0 && Clock::now() < until) worker_.wait(std::chrono::milliseconds(10));
    listen_fd_.reset();
    worker_.progress();
  }

  void watch(int fd, uint64_t tag, uint32_t events, int op = EPOLL_CTL_ADD) {
    epoll_event e{};
    e.events = events;
    e.data.u64 = tag;
    if (::epoll_ctl(epoll_fd_.get(), op, fd, &e) != 0 && op != EPOLL_CTL_DEL)
      detail::fail_errno(errno, "shard server: epoll_ctl");
  }

  // Takes every connection waiting in the backlog. Over the limits (connections, handshakes
  // under way) or out of descriptors, a connection is closed at once: the backlog never fills
  // with connections nobody serves, and the loop never spins on one it cannot take.
  void accept_all() {
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
        count_refused();
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
      watch(conn.fd.get(), conn.id, EPOLLIN | EPOLLRDHUP);
      flush(conn);
    }
  }

  // At the descriptor limit: the one kept in reserve makes room to accept a connection and
  // close it at once (so that the client sees a close, not a hang). False when none is left.
  bool shed_one() {
    if (!reserve_fd_) return false;
    reserve_fd_.reset();
    detail::UniqueFd victim(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    const bool took = static_cast<bool>(victim);
    victim.reset();
    reserve_fd_ = detail::UniqueFd(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (took) {
      count_refused();
      fd_log_.log(
          fmt::format("shard server {}: out of file descriptors ({} connections open): "
                      "closing new connections at once",
                      address_, conns_.size()));
    }
    return took && reserve_fd_;
  }

  uint64_t new_conn_id() {
    uint64_t id = 0;
    while (id == kListenTag || id == kWorkerTag || conns_.count(id))
      random_bytes(std::span(reinterpret_cast<uint8_t*>(&id), sizeof id));
    return id;
  }

  template <typename T>
  static void append(std::vector<std::byte>& out, const T& value) {
    auto b = std::as_bytes(std::span(&value, 1));
    out.insert(out.end(), b.begin(), b.end());
  }

  void count_refused() {
    std::lock_guard lock(mu_);
    ++stats_.refused;
  }

  void on_conn_event(uint64_t id, uint32_t events) {
    auto it = conns_.find(id);
    if (it == conns_.end()) return;
    Conn& c = *it->second;
    if ((events & EPOLLOUT) && !flush(c)) return;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) receive(c);
  }

  // Sends what is left of c.out; returns false when that closed the connection.
  bool flush(Conn& c) {
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
        close_conn(c, fmt::format("send: {}", std::strerror(errno)));
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
  void receive(Conn& c) {
    std::byte buf[4096];
    while (true) {
      ssize_t n = ::recv(c.fd.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      if (n < 0) return close_conn(c, fmt::format("receive: {}", std::strerror(errno)));
      if (n == 0) return close_conn(c, c.ready ? "" : "closed during the handshake");
      if (c.ready) return close_conn(c, "sent bytes after the handshake");
      c.in.insert(c.in.end(), buf, buf + n);
      HelloParse hello = parse_client_hello(c.in);
      if (hello.state == HelloParse::kBad) return refuse(c, AcceptStatus::kRefused, hello.error);
      if (hello.state == HelloParse::kComplete) return finish_handshake(c, hello);
    }
  }

  void finish_handshake(Conn& c, const HelloParse& hello) {
    Digest want = client_proof(token_, c.nonce, hello.hello.nonce, hello.address);
    if (!equal_constant_time(want, hello.hello.proof))
      return refuse(c, AcceptStatus::kUnauthorized,
                    options_.no_token ? "token mismatch: this server runs without a token"
                                      : "token mismatch: this server needs the cluster's token");
    try {
      c.ep = worker_.connect(hello.address, &ServerImpl::on_ep_error, this, "client " + c.peer);
    } catch (const Error& e) {
      return refuse(c, AcceptStatus::kRefused, e.what());
    }
    ep_ids_[c.ep] = c.id;
    c.session = std::make_unique<Mac>(session_key(token_, c.nonce, hello.hello.nonce, c.id));
    Accept a;
    a.conn = c.id;
    a.data_bytes = static_cast<uint32_t>(worker_address_.size());
    a.proof =
        server_proof(token_, c.nonce, hello.hello.nonce, c.id, hello.address, worker_address_);
    append(c.out, a);
    c.out.insert(c.out.end(), worker_address_.begin(), worker_address_.end());
    c.in = {};
    c.ready = true;
    --handshakes_;
    {
      std::lock_guard lock(mu_);
      ++stats_.connections;
      ++stats_.open_connections;
    }
    flush(c);
  }

  // Ends a handshake that failed: one line in the log (rate-limited), the reason to the client
  // if its socket takes it at once, and the connection closed.
  void refuse(Conn& c, AcceptStatus status, const std::string& why) {
    count_refused();
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
    close_conn(c, why);
  }

  void expire_handshakes(Clock::time_point now) {
    std::vector<Conn*> late;
    for (auto& [id, c] : conns_)
      if (!c->ready && now >= c->deadline) late.push_back(c.get());
    for (Conn* c : late)
      refuse(*c, AcceptStatus::kRefused,
             fmt::format("no complete hello within {} ms", options_.handshake_timeout_ms));
  }

  // Forgets a connection: its socket, its endpoint (force-closed: sends under way fail), and
  // the requests it has queued. `why` (unless empty) goes to the log.
  void close_conn(Conn& c, const std::string& why) {
    if (!why.empty())
      close_log_.log(fmt::format("shard server {}: closed {}: {}", address_, c.peer, why));
    watch(c.fd.get(), c.id, 0, EPOLL_CTL_DEL);
    if (!c.ready) --handshakes_;
    if (c.ep) {
      ep_ids_.erase(c.ep);
      close_ep(c.ep);
    }
    {
      std::lock_guard lock(mu_);
      if (c.ready) --stats_.open_connections;
      total_outstanding_ -= std::erase_if(jobs_, [&](const Job& j) { return j.conn == c.id; });
    }
    conns_.erase(c.id);
  }

  // A client's endpoint failed (it died, or its connection broke): forget the client.
  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t status) {
    auto* self = static_cast<ServerImpl*>(arg);
    auto it = self->ep_ids_.find(ep);
    if (it == self->ep_ids_.end()) return;
    auto c = self->conns_.find(it->second);
    if (c != self->conns_.end()) {
      c->second->ep = nullptr;  // closed below, not again in close_conn
      self->ep_ids_.erase(it);
      self->close_ep(ep);
      self->close_conn(*c->second,
                       status == UCS_ERR_CONNECTION_RESET
                           ? ""
                           : fmt::format("endpoint: {}", ucx().ucs_status_string(status)));
    }
  }

  void close_ep(ucp_ep_h ep) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t r = ucx().ucp_ep_close_nbx(ep, &p);
    if (UCS_PTR_IS_PTR(r)) ucx().ucp_request_free(r);  // released by UCX once the close completes
  }

  // --- requests -------------------------------------------------------------------------------

  static ucs_status_t on_request(void* arg, const void* header, size_t header_length, void* data,
                                 size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<ServerImpl*>(arg);
    self->handle_request(std::span(static_cast<const std::byte*>(header), header_length), data,
                         length, param);
    // Data of an eager message is consumed here; a rendezvous message that was not received is
    // dropped by UCX when the handler returns UCS_OK.
    return UCS_OK;
  }

  // Nothing of a request is read before its connection is known and its MAC checks out; a
  // request that fails that closes the connection it names. An authenticated request that is
  // malformed or asks too much gets an error reply.
  void handle_request(std::span<const std::byte> header, void* data, size_t length,
                      const ucp_am_recv_param_t* param) {
    auto drop = [&](const std::string& why) {
      {
        std::lock_guard lock(mu_);
        ++stats_.rejected;
      }
      request_log_.log(fmt::format("shard server {}: dropped a request: {}", address_, why));
    };
    if (header.size() < kRequestAuthBytes) return drop("too short to name its connection");
    uint64_t id = 0;
    std::memcpy(&id, header.data(), sizeof id);
    auto it = conns_.find(id);
    if (it == conns_.end() || !it->second->ready) return drop("names no open connection");
    Conn& c = *it->second;
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
      drop("data sent by rendezvous");  // index lists are small: not a sluice client
      return close_conn(c, "a request's data sent by rendezvous");
    }
    auto indices = std::span(static_cast<const std::byte*>(data), length);
    RequestMac want = request_mac(*c.session, header, indices);
    RequestMac got;
    std::memcpy(got.data(), header.data() + sizeof id, got.size());
    if (!equal_constant_time(want, got)) {
      drop("MAC mismatch");
      return close_conn(c, "a request failed authentication");
    }
    uint64_t request_id = 0;
    if (header.size() >= offsetof(RequestHeader, request_id) + 8)
      std::memcpy(&request_id, header.data() + offsetof(RequestHeader, request_id), 8);
    // Error replies go out at once unless the client stops taking them while it floods us.
    if (c.unsent_errors >= kMaxUnsentErrors)
      return close_conn(
          c, fmt::format("does not take its replies ({} error replies unsent)", c.unsent_errors));
    uint32_t magic = 0;
    if (header.size() >= offsetof(RequestHeader, magic) + 4)
      std::memcpy(&magic, header.data() + offsetof(RequestHeader, magic), 4);
    if (magic == kCheckpointMagic) return handle_checkpoint(c, request_id, header, data, length);
    auto req = parse_request(header, length, options_.max_request_samples);
    if (!req) return reject(c, request_id, ReplyStatus::kBadRequest, req.error());
    if (!dataset_)
      return reject(c, req->request_id, ReplyStatus::kBadRequest,
                    "this server serves no dataset (only checkpoint copies)");
    Job job{
        c.id, req->request_id, req->separate_bytes, std::vector<uint64_t>(req->count), std::nullopt,
        {}};
    std::memcpy(job.indices.data(), data, length);
    const uint64_t n = dataset_->num_samples();
    for (uint64_t index : job.indices) {
      if (index >= n)
        return reject(c, req->request_id, ReplyStatus::kOutOfRange,
                      fmt::format("sample {} out of range: {} has {} samples", index,
                                  dataset_->path().string(), n));
    }
    if (queue_full(c)) {
      {
        std::lock_guard lock(mu_);
        ++stats_.busy;
      }
      return reject(c, req->request_id, ReplyStatus::kBusy,
                    fmt::format("{} requests outstanding from this client (limit {}), {} in all "
                                "(limit {})",
                                c.outstanding, options_.max_queued_per_connection,
                                total_outstanding_, options_.max_queued));
    }
    enqueue(c, std::move(job));
  }

  // The queue limits, per connection and in all: a request over them is answered kBusy.
  bool queue_full(const Conn& c) const {
    return c.outstanding >= options_.max_queued_per_connection ||
           total_outstanding_ >= options_.max_queued;
  }

  // Hands `job` to the reader threads.
  void enqueue(Conn& c, Job job) {
    ++c.outstanding;
    ++total_outstanding_;
    {
      std::lock_guard lock(mu_);
      jobs_.push_back(std::move(job));
    }
    jobs_cv_.notify_one();
  }

  // An authenticated checkpoint op (net/replica_store.h): checked, copied out of the message
  // and queued for a reader thread; payloads waiting count against max_reply_memory (kBusy
  // beyond it).
  void handle_checkpoint(Conn& c, uint64_t request_id, std::span<const std::byte> header,
                         void* data, size_t length) {
    if (!store_)
      return reject(c, request_id, ReplyStatus::kBadRequest,
                    "this server keeps no checkpoint copies (sluice serve --checkpoint-dir DIR)");
    auto bytes = std::span(static_cast<const std::byte*>(data), length);
    auto req = parse_checkpoint_request(header, bytes);
    if (!req) return reject(c, request_id, ReplyStatus::kBadRequest, req.error());
    const size_t payload = req->payload.size();
    bool busy = queue_full(c);
    {
      std::lock_guard lock(mu_);
      busy = busy || (payload > 0 && queued_payload_ + payload > options_.max_reply_memory);
      if (busy)
        ++stats_.busy;
      else
        queued_payload_ += payload;
    }
    if (busy)
      return reject(c, request_id, ReplyStatus::kBusy,
                    "too many checkpoint requests or bytes queued: send it again later");
    Job job{c.id, request_id, 0, {}, std::nullopt, {}};
    job.payload.assign(req->payload.begin(), req->payload.end());
    req->payload = job.payload;  // (moving the vector keeps its buffer)
    job.checkpoint = std::move(*req);
    enqueue(c, std::move(job));
  }

  // A reader thread: carries out a checkpoint op against the store; its reply (the bytes read
  // and their checksum, the listing, or the error) goes out of a pooled buffer.
  std::unique_ptr<Reply> checkpoint_reply(const Job& job) {
    auto reply = std::make_unique<Reply>();
    reply->conn = job.conn;
    reply->header.request_id = job.request_id;
    const CheckpointRequest& r = *job.checkpoint;
    try {
      std::string text;
      switch (r.header.op) {
        case CheckpointOp::kWrite:
          store_->write(r);
          break;
        case CheckpointOp::kCommit:
          store_->commit(r);
          break;
        case CheckpointOp::kPublish:
          store_->publish(r);
          break;
        case CheckpointOp::kList:
          text = store_->list(r.checkpoint);
          break;
        case CheckpointOp::kRead: {
          const size_t n = r.header.length;
          reply->buffer = take_buffer(n + sizeof(uint64_t));
          store_->read(r, {reply->buffer.data(), n});
          const uint64_t sum =
              checkpoint_chunk_checksum({reply->buffer.data(), n}, r.header.offset);
          std::memcpy(reply->buffer.data() + n, &sum, sizeof sum);
          reply->size = n + sizeof sum;
          reply->header.data_bytes = reply->size;
          return reply;
        }
      }
      set_message(*reply, ReplyStatus::kOk, text);
    } catch (const Error& e) {
      set_message(*reply,
                  e.code() == ErrorCode::kNotFound          ? ReplyStatus::kNotFound
                  : e.code() == ErrorCode::kInvalidArgument ? ReplyStatus::kBadRequest
                                                            : ReplyStatus::kReadError,
                  e.what());
    } catch (const std::exception& e) {
      set_message(*reply, ReplyStatus::kReadError, e.what());
    }
    return reply;
  }

  void reject(Conn& c, uint64_t request_id, ReplyStatus status, const std::string& message) {
    auto reply = std::make_unique<Reply>();
    reply->conn = c.id;
    reply->header.request_id = request_id;
    reply->counted = false;
    set_message(*reply, status, message);
    ++c.unsent_errors;
    if (status != ReplyStatus::kBusy) {
      std::lock_guard lock(mu_);
      ++stats_.rejected;
    }
    send(std::move(reply));
  }

  void send_finished() {
    std::deque<std::unique_ptr<Reply>> done;
    {
      std::lock_guard lock(mu_);
      done.swap(done_);
    }
    for (auto& r : done) send(std::move(r));
  }

  // The reply's message, then each of its separate records; the reply is freed once UCX has
  // finished with all of them.
  void send(std::unique_ptr<Reply> reply) {
    auto it = conns_.find(reply->conn);
    if (it == conns_.end() || !it->second->ep) {  // the client is gone
      replied(*reply);
      return give_back(std::move(reply->buffer));
    }
    Reply* r = reply.release();
    const size_t parts = r->parts.size();  // r may be gone after its last post
    r->owner = this;
    r->sends_left = 1 + parts;
    ++in_flight_;
    ucp_ep_h ep = it->second->ep;
    post(ep, kReplyAm, &r->header, sizeof r->header, r->buffer.data(), r->size, r);
    for (size_t k = 0; k < parts; ++k) {
      Part& part = r->parts[k];
      post(ep, kRecordAm, &part.header, sizeof part.header, part.data, part.header.size, r);
    }
  }

  void post(ucp_ep_h ep, uint16_t id, const void* header, size_t header_bytes, const void* data,
            size_t bytes, Reply* reply) {
    ucp_request_param_t p{};
    p.op_attr_mask =
        UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_AM_SEND_FLAG_REPLY;  // the client closes its end of this endpoint too
    p.cb.send = &ServerImpl::on_sent;
    p.user_data = reply;
    ucs_status_ptr_t st = ucx().ucp_am_send_nbx(ep, id, header, header_bytes, data, bytes, &p);
    if (!UCS_PTR_IS_PTR(st)) sent_one(reply);  // sent (or failed) at once
  }

  // Runs in the progress thread, from ucp_worker_progress.
  static void on_sent(void* request, ucs_status_t, void* user_data) {
    auto* reply = static_cast<Reply*>(user_data);
    reply->owner->sent_one(reply);
    ucx().ucp_request_free(request);
  }

  void sent_one(Reply* reply) {
    if (--reply->sends_left > 0) return;
    --in_flight_;
    replied(*reply);
    give_back(std::move(reply->buffer));
    delete reply;
  }

  // A reply is done with (sent, failed, or its client gone).
  void replied(const Reply& r) {
    auto it = conns_.find(r.conn);
    Conn* c = it == conns_.end() ? nullptr : it->second.get();
    if (!r.counted) {
      if (c) --c->unsent_errors;
      return;
    }
    if (c) --c->outstanding;
    --total_outstanding_;
  }

  // --- reply buffers -----------------------------------------------------------------------------

  // Any thread: the smallest idle buffer that holds `bytes`, else a new one (in 64 KiB steps,
  // so that buffers get reused).
  AlignedBuffer take_buffer(size_t bytes) {
    {
      std::lock_guard lock(mu_);
      auto best = free_buffers_.end();
      for (auto it = free_buffers_.begin(); it != free_buffers_.end(); ++it)
        if (it->capacity() >= bytes &&
            (best == free_buffers_.end() || it->capacity() < best->capacity()))
          best = it;
      if (best != free_buffers_.end()) {
        AlignedBuffer b = std::move(*best);
        idle_bytes_ -= b.capacity();
        busy_bytes_ += b.capacity();
        free_buffers_.erase(best);
        return b;
      }
    }
    AlignedBuffer b;
    b.reserve(format::align_up(std::max<size_t>(bytes, 1), 64 << 10));
    std::memset(b.data(), 0, b.capacity());
    std::lock_guard lock(mu_);
    busy_bytes_ += b.capacity();
    return b;
  }

  // Keeps up to kMaxIdleBytes of buffers for reuse, frees the rest; wakes a reader that waits
  // for reply memory.
  void give_back(AlignedBuffer&& b) {
    constexpr size_t kMaxIdleBytes = 256ull << 20;
    {
      std::lock_guard lock(mu_);
      busy_bytes_ -= b.capacity();
      if (b.data() && idle_bytes_ + b.capacity() <= kMaxIdleBytes) {
        idle_bytes_ += b.capacity();
        free_buffers_.push_back(std::move(b));
      }
    }
    jobs_cv_.notify_one();
  }

  // --- reader threads ----------------------------------------------------------------------------

  void read_loop() {
    while (true) {
      Job job;
      {
        std::unique_lock lock(mu_);
        // Replies not yet sent hold their buffers: past max_reply_memory of them, readers wait
        // for sends to finish (clients that do not take their replies meet kBusy, then a close).
        jobs_cv_.wait(lock, [&] {
          return stop_ || (!jobs_.empty() && busy_bytes_ < options_.max_reply_memory);
        });
        if (stop_) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      uint64_t record_bytes = 0;
      std::unique_ptr<Reply> reply;
      if (job.checkpoint) {
        reply = checkpoint_reply(job);
        std::lock_guard lock(mu_);
        queued_payload_ -= job.payload.size();
        ++stats_.checkpoint_ops;
        stats_.checkpoint_bytes += job.payload.size();
      } else {
        reply = build_reply(job, record_bytes);
      }
      if (faults_.reply) {
        std::chrono::milliseconds delay{0};
        faults_.reply(reply->header, {reply->buffer.data(), reply->size}, delay);
        if (delay.count() > 0) std::this_thread::sleep_for(delay);
      }
      {
        std::lock_guard lock(mu_);
        if (job.checkpoint) {
          if (reply->header.status != ReplyStatus::kOk) ++stats_.rejected;
        } else if (reply->header.status == ReplyStatus::kOk) {
          ++stats_.requests;
          stats_.bytes_sent += record_bytes;
        } else {
          ++stats_.rejected;
        }
        done_.push_back(std::move(reply));
      }
      worker_.signal();
    }
  }

  // Replies and errors both go out of a pooled buffer.
  void set_message(Reply& reply, ReplyStatus status, std::string_view message) {
    reply.header.status = status;
    reply.header.count = 0;
    reply.header.separate = 0;
    reply.parts.clear();
    if (!reply.buffer.data()) reply.buffer = take_buffer(message.size());
    reply.size = std::min(message.size(), reply.buffer.capacity());
    std::memcpy(reply.buffer.data(), message.data(), reply.size);
    reply.header.data_bytes = reply.size;
  }

  // Reads the job's records with the IO engine straight into a pooled reply buffer: each record
  // inside its block-aligned cover under direct I/O (RecordInfo says where), back to back
  // otherwise. Records of at least job.separate_bytes go in messages of their own: from the
  // shard's mapping when reading through the page cache (no read, no copy here: the transport
  // takes them from the page cache), else from where they were read, after the table. The
  // stored checksums go along unchecked: the client checks every record end to end. Datasets
  // without stored checksums (read in place) get them computed here, so transit is covered.
  std::unique_ptr<Reply> build_reply(const Job& job, uint64_t& record_bytes) {
    auto reply = std::make_unique<Reply>();
    reply->conn = job.conn;
    reply->header.request_id = job.request_id;
    try {
      const size_t n = job.indices.size();
      std::vector<RecordInfo> infos(n);
      read::ReadPlan plan(*dataset_, direct_);
      std::vector<uint64_t> read_at(n);  // where a separate record that is read lands
      std::vector<SampleExtent> extents(n);
      for (size_t i = 0; i < n; ++i) extents[i] = dataset_->extent(job.indices[i]);
      auto separate = [&](size_t i) {
        return job.separate_bytes > 0 && extents[i].size >= job.separate_bytes;
      };
      auto mapped = [&](size_t i) -> const Mapping* {
        const SampleExtent& e = extents[i];
        if (e.shard >= maps_.size() || !maps_[e.shard].data) return nullptr;
        const Mapping& m = maps_[e.shard];
        return e.offset <= m.size && e.size <= m.size - e.offset ? &m : nullptr;
      };
      for (size_t i = 0; i < n; ++i) {
        infos[i] = {kSeparate, extents[i].size, extents[i].checksum};
        record_bytes += extents[i].size;
        if (separate(i)) {
          ++reply->header.separate;
          continue;
        }
        // Not merged: the client takes records laid out in request order, each after the last.
        infos[i].offset = plan.add(job.indices[i], extents[i], /*merge=*/false);
      }
      const uint64_t table = plan.reserve(n * sizeof(RecordInfo), 8);
      const uint64_t reply_bytes = plan.bytes();
      for (size_t i = 0; i < n; ++i)  // separate records not sent from a mapping: read them too
        if (separate(i) && !mapped(i)) read_at[i] = plan.add(job.indices[i], extents[i], false);
      if (plan.bytes() > options_.max_reply_bytes) {
        record_bytes = 0;
        set_message(*reply, ReplyStatus::kTooLarge,
                    fmt::format("reply of {} bytes is over the server's limit of {}", plan.bytes(),
                                options_.max_reply_bytes));
        return reply;
      }
      reply->buffer = take_buffer(plan.bytes());
      std::byte* out = reply->buffer.data();
      plan.bind(out);
      if (!plan.empty()) {
        auto deadline =
            std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.io.timeout_ms);
        io::ReadFailure f = io_->read_all(plan.ops(), deadline);
        if (f.in_flight) {
          // Reads given up on may still land in this buffer: it is never reused (the error
          // text goes out of a fresh one).
          std::lock_guard lock(mu_);
          busy_bytes_ -= reply->buffer.capacity();
          reply->buffer.leak();
        }
        if (f.error != 0) plan.fail(f, options_.io.timeout_ms);
      }
      for (size_t i = 0; i < n; ++i) {
        const std::byte* record = nullptr;
        if (!separate(i)) {
          record = out + infos[i].offset;
        } else {
          const Mapping* m = mapped(i);
          record = m ? m->data + extents[i].offset : out + read_at[i];
          Part part;
          part.header.request_id = job.request_id;
          part.header.record = static_cast<uint32_t>(i);
          part.header.size = extents[i].size;
          part.data = record;
          reply->parts.push_back(part);
        }
        if (!dataset_->packed())
          infos[i].checksum = format::record_checksum(record, infos[i].size, job.indices[i]);
      }
      std::memcpy(out + table, infos.data(), n * sizeof(RecordInfo));
      reply->size = reply_bytes;
      reply->header.data_bytes = reply_bytes;
      reply->header.count = static_cast<uint32_t>(n);
      return reply;
    } catch (const std::exception& e) {
      record_bytes = 0;
      set_message(*reply, ReplyStatus::kReadError, e.what());
      return reply;
    }
  }

  // The IO engine on the dataset's files: O_DIRECT where the file system takes it (as the
  // loader does), so reads of records skip the page cache and its copy.
  void open_io() {
    DirectFiles direct =
        open_direct(*dataset_, options_.io.direct, "server io.direct", detail::memory_room());
    direct_ = direct.on;
    direct_fds_ = std::move(direct.fds);
    warm_ = direct.warm;
    if (warm_) direct.why += "; warming it in the background";
    files_ = dataset_->format() == DatasetFormat::kFiles;
    std::vector<int> fds;
    if (files_)
      fds = {index::shard_fd(*dataset_, 0)};  // reads use each op's own descriptor
    else
      for (uint32_t i = 0; i < dataset_->shards().size(); ++i)
        fds.push_back(direct_ ? direct_fds_[i].get() : index::shard_fd(*dataset_, i));
    // Through the page cache, a packed dataset's shards are also mapped: a large record is sent
    // straight from there (the kernel copies it into the socket, or the NIC reads it), never
    // touched here (its stored checksum is what the client checks it against).
    if (!direct_ && !files_ && dataset_->packed()) {
      maps_.resize(fds.size());
      for (size_t i = 0; i < fds.size(); ++i) {
        struct stat st {};
        if (fds[i] < 0 || ::fstat(fds[i], &st) != 0 || st.st_size <= 0) continue;
        void* m =
            ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, fds[i], 0);
        if (m != MAP_FAILED)
          maps_[i] = {static_cast<const std::byte*>(m), static_cast<size_t>(st.st_size)};
      }
    }
    std::string engine;
    io::EngineOptions eo = config::engine_options(options_.io);
    eo.faults = faults_.io;
    io_ = std::make_unique<io::Service>(eo, fds, [&](const std::string& line) { engine = line; });
    io_description_ = fmt::format(
        "{}; {}", engine,
        direct_ ? "direct I/O (O_DIRECT) on" + (direct.why.empty() ? "" : ": " + direct.why)
                : "reading through the page cache" +
                      std::string(maps_.empty() ? "" : ", large records sent from it") +
                      (direct.why.empty() ? "" : " (" + direct.why + ")"));
  }

  std::shared_ptr<const Dataset> dataset_;
  ServerOptions options_;
  ServerFaults faults_;
  Mac token_;  // HMAC-SHA256 under the token (empty with no_token)
  bool direct_ = false;
  bool files_ = false;  // a files tree: each sample's file is opened for its read
  std::vector<detail::UniqueFd> direct_fds_;
  std::unique_ptr<io::Service> io_;
  std::vector<Mapping> maps_;            // per shard, through the page cache (packed datasets)
  std::unique_ptr<ReplicaStore> store_;  // peers' checkpoint copies (options.checkpoint_dir)
  std::string io_description_;
  Worker worker_;
  std::vector<std::byte> worker_address_;
  detail::UniqueFd listen_fd_;
  detail::UniqueFd epoll_fd_;
  detail::UniqueFd reserve_fd_;  // spent to accept-and-close when out of descriptors
  std::string address_;
  // One line a second each, so that a flood of one kind (a port scan) hides no other kind.
  detail::RateLimitedLog accept_log_;   // connections over the limits
  detail::RateLimitedLog fd_log_;       // out of descriptors, accept errors
  detail::RateLimitedLog close_log_;    // connections closed: garbage, handshakes, errors
  detail::RateLimitedLog request_log_;  // requests dropped unparsed

  // Progress thread only.
  std::unordered_map<uint64_t, std::unique_ptr<Conn>> conns_;  // by id, handshakes included
  std::unordered_map<ucp_ep_h, uint64_t> ep_ids_;
  uint32_t handshakes_ = 0;       // connections in conns_ not ready yet
  size_t in_flight_ = 0;          // replies whose sends UCX has not finished
  size_t total_outstanding_ = 0;  // Conn::outstanding of all connections, and of closed ones
                                  // whose replies are still being read or sent
  bool accept_paused_ = false;
  Clock::time_point accept_resume_;

  // Shared, under mu_.
  mutable std::mutex mu_;
  std::condition_variable jobs_cv_;
  std::deque<Job> jobs_;
  std::deque<std::unique_ptr<Reply>> done_;
  std::vector<AlignedBuffer> free_buffers_;
  size_t idle_bytes_ = 0;
  size_t busy_bytes_ = 0;      // reply buffers handed out and not given back
  size_t queued_payload_ = 0;  // checkpoint payloads queued or being written

  ServerStats stats_;
  bool stop_ = false;

  std::vector<std::thread> readers_;
  bool warm_ = false;
  std::atomic<bool> warm_stop_{false};
  std::thread warm_thread_;  // warm_page_cache, when io.direct: auto chose the page cache
  std::thread progress_thread_;
};

}  // namespace

std::unique_ptr<ShardServer> start_server(std::shared_ptr<const Dataset> dataset,
                                          const ServerOptions& options, ServerFaults faults) {
  if (options.token.empty() && !options.no_token)
    throw Error(ErrorCode::kConfig,
                "shard server: no token: give the cluster's shared token, or run without one "
                "explicitly (--no-token, distributed.no_token: true) on a trusted host only");
  if (!options.token.empty() && options.no_token)
    throw Error(ErrorCode::kConfig, "shard server: a token and no_token both given; pick one");
  return std::make_unique<ServerImpl>(std::move(dataset), options, std::move(faults));
}

}  // namespace sluice::net

namespace sluice {

std::unique_ptr<ShardServer> ShardServer::start(std::shared_ptr<const Dataset> dataset,
                                                const ServerOptions& options) {
  return net::start_server(std::move(dataset), options, {});
}

}  // namespace sluice
