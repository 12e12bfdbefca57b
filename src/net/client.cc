#include "net/client.h"

#include "common/check.h"
#include "common/errors.h"
#include "common/keep.h"
#include "format/layout.h"
#include "net/handshake.h"
#include "net/ucx.h"

#include <fmt/format.h>

#include <cstddef>
#include <cstring>
#include <optional>
#include <unordered_map>
#include <utility>

namespace sluice::net {
namespace {

using detail::fail;

// A record message larger than this is garbage, not a sample (and not worth allocating for).
constexpr uint32_t kMaxRecordBytes = 1u << 30;

class ClientImpl;

struct Pending;

// A rendezvous receive in progress: the reply's data (record < 0) or a separate record.
struct Receive {
  Pending* pending = nullptr;
  int64_t record = -1;
  std::span<std::byte> dest;
  void* request = nullptr;  // UCX's, until it completes
};

// One request on the wire. Lives until read() returns, after every callback that names it.
struct Pending {
  uint64_t id = 0;
  ReadRequest* request = nullptr;  // nullptr for send_raw and call
  RawCall* call = nullptr;         // call(): where the reply goes
  RequestHeader header;
  bool raw = false;  // send_raw: raw_header goes instead of header
  bool sign = true;  // send_raw: set the connection id and MAC
  std::vector<std::byte> raw_header;
  std::span<const std::byte> raw_data;
  // kBusy: the server asked to send it again later; when, and the wait after the next kBusy.
  std::optional<Clock::time_point> resend_at;
  std::chrono::milliseconds backoff{1};
  bool done = false;  // the reply's message is settled (data in, or an error)
  ReplyHeader reply;
  std::string message;  // the server's error text, or a transport failure
  bool transport_failed = false;
  std::span<std::byte> dest;  // where the reply data goes, exactly its length
  std::string corrupt;        // what the checks found wrong
  bool table_ok = false;      // the reply's record table is in and well-formed
  ClientImpl* client = nullptr;
  // Records in messages of their own: per record 0 (not yet), 1 (arriving), 2 (landed).
  std::vector<uint8_t> separate;
  size_t separate_landed = 0;
  std::vector<std::unique_ptr<Receive>> receives;

  bool complete() const {
    return transport_failed || (done && (reply.status != ReplyStatus::kOk || !request ||
                                         !corrupt.empty() || separate_landed == reply.separate));
  }
};

}  // namespace

// The worker and what its clients share: request ids and the requests in flight, by id.
struct ClientWorker::Impl {
  Impl();
  ~Impl();
  std::mutex mu;  // held for every use of `worker` and of what follows, by every client
  Worker worker{UCS_THREAD_MODE_SERIALIZED};
  int waiting = 0;      // threads in ClientImpl::wait_step
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

ClientWorker::ClientWorker() : impl_(std::make_unique<Impl>()) {}
ClientWorker::~ClientWorker() = default;

namespace {

ErrorCode code_for(ReplyStatus s) {
  switch (s) {
    case ReplyStatus::kReadError:
      return ErrorCode::kIo;
    case ReplyStatus::kUnauthorized:
      return ErrorCode::kConfig;
    default:
      return ErrorCode::kInvalidArgument;
  }
}

class ClientImpl final : public PeerClient {
 public:
  ClientImpl(const std::string& address, const ClientOptions& options,
             std::shared_ptr<ClientWorker> shared)
      : shared_(shared ? std::move(shared) : std::make_shared<ClientWorker>()),
        worker_(shared_->impl().worker),
        mu_(shared_->impl().mu),
        by_id_(shared_->impl().by_id),
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
    ep_ =
        worker_.connect(session.server_address, &ClientImpl::on_ep_error, this, "peer " + address_);
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

  ~ClientImpl() override {
    Lock lock(mu_);
    close(false, lock);
  }

  const std::string& address() const override { return address_; }

  void read(std::span<ReadRequest> requests) override {
    auto call = start(requests);
    finish(*call);
  }

  // One start()'s requests. Dropped unfinished (the caller gave up on its batch), they leave
  // the worker's table, and their receives under way are let land (or the connection closed)
  // before the caller's memory can go.
  struct CallImpl final : Call {
    ClientImpl* client = nullptr;
    std::vector<std::unique_ptr<Pending>> pendings;
    bool finished = false;
    ~CallImpl() override {
      if (!finished) client->drop(pendings);
    }
  };

  std::unique_ptr<Call> start(std::span<ReadRequest> requests) override {
    Lock lock(mu_);
    usable();
    auto call = std::make_unique<CallImpl>();
    call->client = this;
    auto& started = call->pendings;
    started.reserve(requests.size());
    for (ReadRequest& r : requests) {
      auto p = std::make_unique<Pending>();
      p->request = &r;
      p->header.count = static_cast<uint32_t>(r.indices.size());
      p->header.separate_bytes = options_.separate_bytes;
      p->separate.assign(r.indices.size(), 0);
      r.records.clear();
      r.record_data.assign(r.indices.size(), {});
      r.owned.clear();
      p->raw_data = std::as_bytes(std::span<const uint64_t>(r.indices));
      started.push_back(std::move(p));
    }
    send_all(started);
    return call;
  }

  void finish(Call& c) override {
    auto& call = static_cast<CallImpl&>(c);
    SLUICE_CHECK(call.client == this && !call.finished);
    call.finished = true;  // whatever wait_all does, nothing of it is in flight afterwards
    Lock lock(mu_);
    auto& pendings = call.pendings;
    wait_all(pendings, lock);
    for (size_t k = 0; k < pendings.size(); ++k) {
      Pending& p = *pendings[k];
      if (p.reply.status != ReplyStatus::kOk)
        throw Error(code_for(p.reply.status),
                    fmt::format("peer {}: {}: {}", address_, to_string(p.reply.status), p.message));
    }
  }

  std::pair<ReplyStatus, std::string> send_raw(std::span<const std::byte> header,
                                               std::span<const std::byte> data,
                                               bool sign) override {
    Lock lock(mu_);
    usable();
    std::vector<std::unique_ptr<Pending>> pendings;
    auto p = std::make_unique<Pending>();
    p->sign = sign;
    p->raw_header.assign(header.begin(), header.end());
    p->raw_data = data;
    pendings.push_back(std::move(p));
    send_all(pendings, /*raw=*/true);
    wait_all(pendings, lock);
    return {pendings[0]->reply.status, pendings[0]->message};
  }

  void call(std::span<RawCall> calls) override {
    Lock lock(mu_);
    usable();
    std::vector<std::unique_ptr<Pending>> pendings;
    for (RawCall& c : calls) {
      auto p = std::make_unique<Pending>();
      p->call = &c;
      p->raw_header = c.header;
      p->raw_data = c.data;
      c.reply.clear();
      pendings.push_back(std::move(p));
    }
    send_all(pendings, /*raw=*/true);
    wait_all(pendings, lock);
    for (auto& p : pendings) p->call->status = p->reply.status;
  }

 private:
  using Lock = std::unique_lock<std::mutex>;

  // One wait of at most 10 ms for the worker's events, the lock released meanwhile. Messages
  // this thread handles may be other threads' replies (the worker is shared): it wakes them.
  // Returns whether the control connection is readable.
  bool wait_step(Lock& lock, std::chrono::milliseconds most = std::chrono::milliseconds(10)) {
    auto& w = shared_->impl();
    const uint64_t before = w.events;
    ++w.waiting;
    const bool control = worker_.wait(most, control_ ? control_.get() : -1, &lock);
    --w.waiting;
    if (w.events != before && w.waiting > 0) worker_.signal();
    return control;
  }

  // A call dropped unfinished (under no lock): see CallImpl.
  void drop(std::vector<std::unique_ptr<Pending>>& pendings) {
    Lock lock(mu_);
    for (auto& p : pendings)
      if (p) by_id_.erase(p->id);
    const auto until = deadline();
    while (!failed_ && receiving(pendings) && Clock::now() < until) wait_step(lock);
    if (receiving(pendings)) {
      broken_ = true;
      abandon(pendings, lock);
    }
  }

  Clock::time_point deadline() const {
    return Clock::now() + std::chrono::milliseconds(options_.timeout_ms);
  }

  void usable() const {
    if (broken_)
      fail(ErrorCode::kIo, "peer {}: unusable after an earlier failure: {}", address_, failure_);
  }

  // Sends every pending request (a send that fails marks the connection failed, for wait_all).
  void send_all(std::vector<std::unique_ptr<Pending>>& pendings, bool raw = false) {
    for (auto& p : pendings) {
      // A raw header too short to carry a request id is answered with id 0.
      constexpr size_t kIdAt = offsetof(RequestHeader, request_id);
      p->id = raw && p->raw_header.size() < kIdAt + 8 ? 0 : ++shared_->impl().next_id;
      p->header.request_id = p->id;
      p->client = this;
      by_id_[p->id] = p.get();
      if (raw) {
        p->raw = true;
        if (p->raw_header.size() >= kIdAt + 8)  // match the reply
          std::memcpy(p->raw_header.data() + kIdAt, &p->id, 8);
      }
      if (!send(*p)) break;
    }
  }

  // Sends one request, naming this connection and signed with its session key (a raw request
  // too, as far as it has room for both). Returns false when the send fails.
  bool send(Pending& p) {
    if (closing_) {
      failed_ = true;
      if (failure_.empty()) failure_ = "connection closed";
      return false;
    }
    std::span<std::byte> header = std::as_writable_bytes(std::span(&p.header, 1));
    if (p.raw) header = p.raw_header;
    if (header.size() >= kRequestAuthBytes) {
      std::memcpy(header.data(), &conn_, sizeof conn_);
      RequestMac mac = p.sign ? request_mac(*session_, header, p.raw_data) : RequestMac{};
      std::memcpy(header.data() + sizeof conn_, mac.data(), mac.size());
    }
    ucp_request_param_t sp{};
    sp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_FLAGS;
    sp.flags = UCP_AM_SEND_FLAG_EAGER;
    sp.cb.send = [](void* request, ucs_status_t, void*) { ucx().ucp_request_free(request); };
    ucs_status_ptr_t r = ucx().ucp_am_send_nbx(ep_, kRequestAm, header.data(), header.size(),
                                               p.raw_data.data(), p.raw_data.size(), &sp);
    if (UCS_PTR_IS_ERR(r)) {
      failure_ = fmt::format("send: {}", ucx().ucs_status_string(UCS_PTR_STATUS(r)));
      failed_ = true;
      return false;
    }
    return true;
  }

  // Progresses until every reply is in, the peer fails, or the timeout passes. When the peer
  // fails or times out, the connection is abandoned before the error is thrown; a damaged reply
  // first lets the receives under way finish (below).
  void wait_all(std::vector<std::unique_ptr<Pending>>& pendings, Lock& lock) {
    const auto until = deadline();
    auto all_done = [&] {
      for (auto& p : pendings)
        if (!p->complete()) return false;
      return true;
    };
    auto cancelled = [&] { return options_.cancel && options_.cancel->load(); };
    while (!failed_ && !all_done() && Clock::now() < until && !cancelled()) {
      resend_due(pendings);
      if (wait_step(lock)) control_event();
    }
    for (auto& p : pendings) by_id_.erase(p->id);
    if (failed_ || !all_done()) {
      size_t outstanding = 0;
      for (auto& p : pendings) outstanding += p->complete() ? 0 : 1;
      std::string why = failed_       ? failure_
                        : cancelled() ? std::string("cancelled")
                                      : fmt::format(
                                            "no reply within {} ms ({} of {} requests "
                                            "outstanding)",
                                            options_.timeout_ms, outstanding, pendings.size());
      abandon(pendings, lock);
      failure_ = why;
      broken_ = true;
      fail(ErrorCode::kIo, "peer {}: {}", address_, why);
    }
    // A damaged reply, or a bad message of one, fails the read while the connection is up.
    // Receives under way into the callers' memory are let finish first (later messages find no
    // request and are dropped): cancelling a rendezvous mid-transfer can abort the sending
    // server inside UCX's TCP transport (1.13: tcp_ep.c PUT_TX_WAITING_ACK assertion).
    for (auto& p : pendings)
      if (!p->corrupt.empty() || p->transport_failed) {
        while (!failed_ && receiving(pendings) && Clock::now() < until) wait_step(lock);
        broken_ = true;
        failure_ = p->corrupt.empty() ? p->message : p->corrupt;
        const bool transport = p->corrupt.empty();
        if (receiving(pendings)) abandon(pendings, lock);  // may release p
        throw Error(transport ? ErrorCode::kIo : ErrorCode::kCorruption,
                    fmt::format("peer {}: {}", address_, failure_));
      }
  }

  // Requests the server answered kBusy go again once their wait is over.
  void resend_due(std::vector<std::unique_ptr<Pending>>& pendings) {
    const auto now = Clock::now();
    for (auto& p : pendings)
      if (p->resend_at && now >= *p->resend_at && !failed_) {
        p->resend_at.reset();
        send(*p);
      }
  }

  // The handshake's TCP connection is readable: the server closed it (it dropped this client),
  // or sent bytes it never sends. Either way the session is over.
  void control_event() {
    if (!control_) return;
    std::byte b;
    ssize_t n = ::recv(control_.get(), &b, 1, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    failed_ = true;
    failure_ =
        n == 0 ? "the server closed the connection" : "unexpected bytes on the control connection";
  }

  static bool receiving(const std::vector<std::unique_ptr<Pending>>& pendings) {
    for (auto& p : pendings)
      if (p)
        for (auto& rc : p->receives)
          if (rc->request) return true;
    return false;
  }

  // Cancels the receives under way and force-closes the connection, so that no late bytes land
  // in the callers' memory. Other calls on this connection fail with it.
  void abandon(std::vector<std::unique_ptr<Pending>>& pendings, Lock& lock) {
    for (auto& p : pendings)
      if (p)
        for (auto& rc : p->receives)
          if (rc->request) ucx().ucp_request_cancel(worker_.get(), rc->request);
    // The cancelled receives' callbacks name their Receive: let them run before it goes (the
    // worker outlives this client now). Ones UCX never completes keep their Receive forever.
    const auto until = Clock::now() + std::chrono::seconds(1);
    while (receiving(pendings) && Clock::now() < until)
      wait_step(lock, std::chrono::milliseconds(1));
    if (receiving(pendings))
      for (auto& p : pendings) detail::keep_forever(p.release());
    if (!failed_) {
      failed_ = true;
      failure_ = "connection abandoned";
    }
    close(true, lock);
  }

  // The reply's data is in: checks its record table, then (unless verify is off) every record
  // against the checksum the server sent (seeded with the sample index, as in the shard index),
  // the separate ones that landed already included. Runs as soon as the data is in: the bytes
  // are still in cache, and other replies keep arriving meanwhile. What it finds goes to
  // p.corrupt, which read() throws.
  void check_records(Pending& p) {
    ReadRequest& r = *p.request;
    std::span<const std::byte> data = p.dest;
    auto table = parse_records(p.reply, data);
    if (!table || table->size() != r.indices.size()) {
      p.corrupt = fmt::format(
          "malformed reply: {}",
          table ? fmt::format("{} records for {} samples", table->size(), r.indices.size())
                : table.error());
      return;
    }
    r.records = std::move(*table);
    p.table_ok = true;
    for (size_t i = 0; i < r.records.size(); ++i) {
      const RecordInfo& info = r.records[i];
      if (info.offset != kSeparate) {
        if (p.separate[i] != 0) return corrupt_record(p, i, "sent both in the reply and apart");
        r.record_data[i] = data.subspan(info.offset, info.size);
        check_sum(p, i);
      } else if (p.separate[i] == 2) {
        check_separate(p, i);
      }
    }
  }

  // A record that came in a message of its own, once both it and the table are in.
  void check_separate(Pending& p, size_t i) {
    ReadRequest& r = *p.request;
    if (r.records[i].offset != kSeparate || r.records[i].size != r.record_data[i].size())
      return corrupt_record(p, i, "its message does not match the reply's table");
    check_sum(p, i);
  }

  void check_sum(Pending& p, size_t i) {
    if (!options_.verify || !p.corrupt.empty()) return;
    ReadRequest& r = *p.request;
    const RecordInfo& info = r.records[i];
    auto checked =
        format::check_record({r.record_data[i].data(), info.size}, r.indices[i], info.checksum);
    if (!checked) p.corrupt = checked.error() + ": damaged on the peer's disk or in transit";
  }

  void corrupt_record(Pending& p, size_t i, std::string_view why) {
    if (p.corrupt.empty())
      p.corrupt = fmt::format("malformed reply: sample {}: {}", p.request->indices[i], why);
  }

 public:
  static ucs_status_t on_reply(void* arg, const void* header, size_t header_length, void* data,
                               size_t length, const ucp_am_recv_param_t* param) {
    auto* w = static_cast<ClientWorker::Impl*>(arg);
    ++w->events;
    if (Pending* p = w->pending_of(header, header_length, offsetof(ReplyHeader, request_id)))
      p->client->handle_reply(std::span(static_cast<const std::byte*>(header), header_length), data,
                              length, param);
    return UCS_OK;  // no request of this worker's: dropped (its sender's requests time out)
  }

  static ucs_status_t on_record(void* arg, const void* header, size_t header_length, void* data,
                                size_t length, const ucp_am_recv_param_t* param) {
    auto* w = static_cast<ClientWorker::Impl*>(arg);
    ++w->events;
    if (Pending* p = w->pending_of(header, header_length, offsetof(RecordHeader, request_id)))
      p->client->handle_record(std::span(static_cast<const std::byte*>(header), header_length),
                               data, length, param);
    return UCS_OK;
  }

 private:
  void handle_reply(std::span<const std::byte> header, void* data, size_t length,
                    const ucp_am_recv_param_t* param) {
    if (!note_reply_ep(param)) return;  // first: a malformed reply still comes on an endpoint
    auto h = parse_reply(header);
    if (!h) {
      failure_ = "malformed reply: " + h.error();
      failed_ = true;
      return;
    }
    auto it = by_id_.find(h->request_id);
    if (it == by_id_.end() || it->second->done) return;  // not ours (any more)
    Pending& p = *it->second;
    const bool rndv = param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV;
    if (h->status == ReplyStatus::kBusy && (p.request || p.call)) {  // again, a bit later
      p.resend_at = Clock::now() + p.backoff;
      p.backoff = std::min(p.backoff * 2, std::chrono::milliseconds(100));
      return;
    }
    p.reply = *h;
    auto transport_failure = [&](std::string why) {
      p.transport_failed = true;
      p.message = std::move(why);
      p.done = true;
    };
    if (p.call) {  // the whole reply, whatever its status, into the call's buffer
      constexpr size_t kMaxCallReply = kMaxCheckpointChunk + (1 << 20);
      if (length != h->data_bytes || length > kMaxCallReply)
        return transport_failure(fmt::format("reply says {} bytes, carries {} (at most {})",
                                             h->data_bytes, length, kMaxCallReply));
      p.call->reply.resize(length);
      p.dest = p.call->reply;
      return receive(p, -1, data, p.dest, rndv);
    }
    if (h->status != ReplyStatus::kOk || !p.request) {
      if (!rndv) p.message.assign(static_cast<const char*>(data), std::min<size_t>(length, 4096));
      p.done = true;
      return;
    }
    if (length != h->data_bytes)
      return transport_failure(
          fmt::format("reply says {} bytes, carries {}", h->data_bytes, length));
    if (h->separate > p.separate.size())
      return transport_failure(fmt::format("malformed reply: says {} of {} records come apart",
                                           h->separate, p.separate.size()));
    std::span<std::byte> dest = p.request->destination(length);
    if (dest.size() < length)
      return transport_failure(
          fmt::format("destination of {} bytes for a reply of {}", dest.size(), length));
    p.dest = dest.first(length);
    receive(p, -1, data, p.dest, rndv);
  }

  void handle_record(std::span<const std::byte> header, void* data, size_t length,
                     const ucp_am_recv_param_t* param) {
    if (!note_reply_ep(param)) return;
    auto h = parse_record_header(header, length);
    if (!h) {
      failure_ = "malformed record message: " + h.error();
      failed_ = true;
      return;
    }
    auto it = by_id_.find(h->request_id);
    if (it == by_id_.end() || !it->second->request) return;  // not ours (any more)
    Pending& p = *it->second;
    if (h->record >= p.separate.size() || p.separate[h->record] != 0 || h->size > kMaxRecordBytes) {
      p.transport_failed = true;
      p.message = fmt::format(
          "record {} ({} bytes) of a request for {}: out of range, too large or sent twice",
          h->record, h->size, p.separate.size());
      return;
    }
    ReadRequest& r = *p.request;
    std::span<std::byte> dest;
    if (r.record_destination) dest = r.record_destination(h->record, h->size);
    if (dest.size() < h->size) dest = r.owned.emplace_back(h->size);
    p.separate[h->record] = 1;
    receive(p, h->record, data, dest.first(h->size), param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV);
  }

  // Replies come on the server's own endpoint to this worker; its end here is made by UCX
  // (unless UCX matched it with ep_, as it may when both sides connect at once). It carries the
  // receive side of rendezvous transfers (acknowledgements back to the server), so close()
  // must close it too. Returns false for a message on another endpoint: on a shared worker,
  // another peer's message that names one of this client's requests, which is not taken.
  bool note_reply_ep(const ucp_am_recv_param_t* param) {
    if (closing_) return false;  // closed, or being closed: nothing more is taken
    if (!(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)) return true;
    if (!reply_ep_) reply_ep_ = param->reply_ep;
    return param->reply_ep == reply_ep_ || param->reply_ep == ep_;
  }

  // Takes a message's data into `dest`: a copy for an eager message, else a rendezvous receive
  // (UCX pulls the bytes from the server straight into `dest`).
  void receive(Pending& p, int64_t record, void* data, std::span<std::byte> dest, bool rndv) {
    if (!rndv) {
      if (!dest.empty()) std::memcpy(dest.data(), data, dest.size());  // (an empty reply: null)
      return landed(p, record, dest);
    }
    auto rc = std::make_unique<Receive>();
    rc->pending = &p;
    rc->record = record;
    rc->dest = dest;
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    rp.cb.recv_am = &ClientImpl::on_received;
    rp.user_data = rc.get();
    ucs_status_ptr_t r =
        ucx().ucp_am_recv_data_nbx(worker_.get(), data, dest.data(), dest.size(), &rp);
    if (r == nullptr) return landed(p, record, dest);
    if (UCS_PTR_IS_ERR(r)) {
      p.transport_failed = true;
      p.message = fmt::format("receiving {} bytes: {}", dest.size(),
                              ucx().ucs_status_string(UCS_PTR_STATUS(r)));
      return;
    }
    rc->request = r;
    p.receives.push_back(std::move(rc));
  }

  void landed(Pending& p, int64_t record, std::span<std::byte> dest) {
    if (record < 0) {
      if (p.request) check_records(p);
      p.done = true;
      return;
    }
    const auto k = static_cast<size_t>(record);
    p.request->record_data[k] = dest;
    p.separate[k] = 2;
    ++p.separate_landed;
    if (p.table_ok && p.corrupt.empty()) check_separate(p, k);
  }

  static void on_received(void* request, ucs_status_t status, size_t, void* user_data) {
    auto* rc = static_cast<Receive*>(user_data);
    Pending& p = *rc->pending;
    ++p.client->shared_->impl().events;
    rc->request = nullptr;
    ucx().ucp_request_free(request);
    if (status != UCS_OK) {
      p.transport_failed = true;
      p.message = fmt::format("receiving reply data: {}", ucx().ucs_status_string(status));
      return;
    }
    p.client->landed(p, rc->record, rc->dest);
  }

  static void on_ep_error(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* self = static_cast<ClientImpl*>(arg);
    self->failed_ = true;
    self->failure_ = fmt::format("connection lost: {}", ucx().ucs_status_string(status));
  }

  // Closes both endpoints, once: the lock is released while it waits, and another thread of
  // this client may come here too meanwhile (it finds them taken).
  void close(bool force, Lock& lock) {
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
        wait_request(worker_, ucx().ucp_ep_close_nbx(*ep, &p),
                     Clock::now() + std::chrono::seconds(1), &lock);
      }
    }
    worker_.progress();
    control_.reset();  // tells the server this session is over
  }

  static constexpr std::chrono::milliseconds kFlushBeforeForce{200};

  std::shared_ptr<ClientWorker> shared_;  // first: the worker outlives this client's endpoints
  Worker& worker_;
  std::mutex& mu_;                                 // the shared worker's lock
  std::unordered_map<uint64_t, Pending*>& by_id_;  // the shared worker's, every client's requests
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

}  // namespace

ClientWorker::Impl::Impl() {
  worker.set_am_handler(kReplyAm, &ClientImpl::on_reply, this, "shard server replies");
  worker.set_am_handler(kRecordAm, &ClientImpl::on_record, this, "shard server records");
}

// Every client closed its endpoints; those UCX made itself may still have a wireup message
// queued, which UCX 1.13 aborts on when it purges them (see ClientImpl::close): flush first.
ClientWorker::Impl::~Impl() {
  ucp_request_param_t p{};
  wait_request(worker, ucx().ucp_worker_flush_nbx(worker.get(), &p),
               Clock::now() + std::chrono::milliseconds(200));
}

std::unique_ptr<PeerClient> PeerClient::connect(const std::string& address,
                                                const ClientOptions& options,
                                                std::shared_ptr<ClientWorker> worker) {
  return std::make_unique<ClientImpl>(address, options, std::move(worker));
}

}  // namespace sluice::net
