// PeerClient: the requests in flight on one session (client_connection.h) and their replies:
// sending them, routing each reply and record message to its request, receiving their data
// into the callers' buffers, waiting, kBusy resends, and failing them all when one fails. A
// reply's checks are client_request.h's.

#include "net/client.h"

#include "common/check.h"
#include "common/errors.h"
#include "common/keep.h"
#include "net/client_connection.h"
#include "net/client_request.h"
#include "net/ucx.h"

#include <fmt/format.h>

#include <cstddef>
#include <cstring>
#include <unordered_map>
#include <utility>

namespace sluice::net {
namespace {

using detail::fail;

// A record message larger than this is garbage, not a sample (and not worth allocating for).
constexpr uint32_t kMaxRecordBytes = 1u << 30;

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

}  // namespace

class ClientImpl final : public PeerClient {
 public:
  ClientImpl(const std::string& address, const ClientOptions& options,
             std::shared_ptr<ClientWorker> shared)
      : conn_(address, options, std::move(shared)), by_id_(conn_.shared().by_id) {}

  const std::string& address() const override { return conn_.address(); }

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
    Lock lock(conn_.mu());
    conn_.usable();
    auto call = std::make_unique<CallImpl>();
    call->client = this;
    auto& started = call->pendings;
    started.reserve(requests.size());
    for (ReadRequest& r : requests) {
      auto p = std::make_unique<Pending>();
      p->request = &r;
      p->header.count = static_cast<uint32_t>(r.indices.size());
      p->header.separate_bytes = conn_.options().separate_bytes;
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
    Lock lock(conn_.mu());
    auto& pendings = call.pendings;
    wait_all(pendings, lock);
    for (size_t k = 0; k < pendings.size(); ++k) {
      Pending& p = *pendings[k];
      if (p.reply.status != ReplyStatus::kOk)
        throw Error(code_for(p.reply.status), fmt::format("peer {}: {}: {}", conn_.address(),
                                                          to_string(p.reply.status), p.message));
    }
  }

  std::pair<ReplyStatus, std::string> send_raw(std::span<const std::byte> header,
                                               std::span<const std::byte> data,
                                               bool sign) override {
    Lock lock(conn_.mu());
    conn_.usable();
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
    Lock lock(conn_.mu());
    conn_.usable();
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
  using Lock = ClientConnection::Lock;

  // A call dropped unfinished (under no lock): see CallImpl.
  void drop(std::vector<std::unique_ptr<Pending>>& pendings) {
    Lock lock(conn_.mu());
    for (auto& p : pendings)
      if (p) by_id_.erase(p->id);
    const auto until = conn_.deadline();
    while (!conn_.failed() && receiving(pendings) && Clock::now() < until) conn_.wait_step(lock);
    if (receiving(pendings)) {
      conn_.set_broken();
      abandon(pendings, lock);
    }
  }

  // Sends every pending request (a send that fails marks the connection failed, for wait_all).
  void send_all(std::vector<std::unique_ptr<Pending>>& pendings, bool raw = false) {
    for (auto& p : pendings) {
      // A raw header too short to carry a request id is answered with id 0.
      constexpr size_t kIdAt = offsetof(RequestHeader, request_id);
      p->id = raw && p->raw_header.size() < kIdAt + 8 ? 0 : ++conn_.shared().next_id;
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
    std::span<std::byte> header = std::as_writable_bytes(std::span(&p.header, 1));
    if (p.raw) header = p.raw_header;
    return conn_.send(header, p.raw_data, p.sign);
  }

  // Progresses until every reply is in, the peer fails, or the timeout passes. When the peer
  // fails or times out, the connection is abandoned before the error is thrown; a damaged reply
  // first lets the receives under way finish (below).
  void wait_all(std::vector<std::unique_ptr<Pending>>& pendings, Lock& lock) {
    const ClientOptions& options = conn_.options();
    const auto until = conn_.deadline();
    auto all_done = [&] {
      for (auto& p : pendings)
        if (!p->complete()) return false;
      return true;
    };
    auto cancelled = [&] { return options.cancel && options.cancel->load(); };
    while (!conn_.failed() && !all_done() && Clock::now() < until && !cancelled()) {
      resend_due(pendings);
      if (conn_.wait_step(lock)) conn_.control_event();
    }
    for (auto& p : pendings) by_id_.erase(p->id);
    if (conn_.failed() || !all_done()) {
      size_t outstanding = 0;
      for (auto& p : pendings) outstanding += p->complete() ? 0 : 1;
      std::string why = conn_.failed() ? conn_.failure()
                        : cancelled()  ? std::string("cancelled")
                                       : fmt::format(
                                             "no reply within {} ms ({} of {} requests "
                                              "outstanding)",
                                             options.timeout_ms, outstanding, pendings.size());
      abandon(pendings, lock);
      conn_.set_broken(why);
      fail(ErrorCode::kIo, "peer {}: {}", conn_.address(), why);
    }
    // A damaged reply, or a bad message of one, fails the read while the connection is up.
    // Receives under way into the callers' memory are let finish first (later messages find no
    // request and are dropped): cancelling a rendezvous mid-transfer can abort the sending
    // server inside UCX's TCP transport (1.13: tcp_ep.c PUT_TX_WAITING_ACK assertion).
    for (auto& p : pendings)
      if (!p->corrupt.empty() || p->transport_failed) {
        while (!conn_.failed() && receiving(pendings) && Clock::now() < until)
          conn_.wait_step(lock);
        conn_.set_broken(p->corrupt.empty() ? p->message : p->corrupt);
        const bool transport = p->corrupt.empty();
        if (receiving(pendings)) abandon(pendings, lock);  // may release p
        throw Error(transport ? ErrorCode::kIo : ErrorCode::kCorruption,
                    fmt::format("peer {}: {}", conn_.address(), conn_.failure()));
      }
  }

  // Requests the server answered kBusy go again once their wait is over.
  void resend_due(std::vector<std::unique_ptr<Pending>>& pendings) {
    const auto now = Clock::now();
    for (auto& p : pendings)
      if (p->resend_at && now >= *p->resend_at && !conn_.failed()) {
        p->resend_at.reset();
        send(*p);
      }
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
          if (rc->request) ucx().ucp_request_cancel(conn_.worker().get(), rc->request);
    // The cancelled receives' callbacks name their Receive: let them run before it goes (the
    // worker outlives this client now). Ones UCX never completes keep their Receive forever.
    const auto until = Clock::now() + std::chrono::seconds(1);
    while (receiving(pendings) && Clock::now() < until)
      conn_.wait_step(lock, std::chrono::milliseconds(1));
    if (receiving(pendings))
      for (auto& p : pendings) detail::keep_forever(p.release());
    conn_.abandon(lock);
  }

  void handle_reply(std::span<const std::byte> header, void* data, size_t length,
                    const ucp_am_recv_param_t* param) {
    // First: a malformed reply still comes on an endpoint.
    if (!conn_.note_reply_ep(param)) return;
    auto h = parse_reply(header);
    if (!h) return conn_.set_failed("malformed reply: " + h.error());
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
    if (!conn_.note_reply_ep(param)) return;
    auto h = parse_record_header(header, length);
    if (!h) return conn_.set_failed("malformed record message: " + h.error());
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
        ucx().ucp_am_recv_data_nbx(conn_.worker().get(), data, dest.data(), dest.size(), &rp);
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
      if (p.request) p.check_records(conn_.options().verify);
      p.done = true;
      return;
    }
    const auto k = static_cast<size_t>(record);
    p.request->record_data[k] = dest;
    p.separate[k] = 2;
    ++p.separate_landed;
    if (p.table_ok && p.corrupt.empty()) p.check_separate(k, conn_.options().verify);
  }

  static void on_received(void* request, ucs_status_t status, size_t, void* user_data) {
    auto* rc = static_cast<Receive*>(user_data);
    Pending& p = *rc->pending;
    ++p.client->conn_.shared().events;
    rc->request = nullptr;
    ucx().ucp_request_free(request);
    if (status != UCS_OK) {
      p.transport_failed = true;
      p.message = fmt::format("receiving reply data: {}", ucx().ucs_status_string(status));
      return;
    }
    p.client->landed(p, rc->record, rc->dest);
  }

  ClientConnection conn_;  // the session: endpoints, signing, waits, how it failed
  std::unordered_map<uint64_t, Pending*>& by_id_;  // the shared worker's, every client's requests
};

ClientWorker::Impl::Impl() {
  worker.set_am_handler(kReplyAm, &ClientImpl::on_reply, this, "shard server replies");
  worker.set_am_handler(kRecordAm, &ClientImpl::on_record, this, "shard server records");
}

// Every client closed its endpoints; those UCX made itself may still have a wireup message
// queued, which UCX 1.13 aborts on when it purges them (see ClientConnection::close): flush
// first.
ClientWorker::Impl::~Impl() {
  ucp_request_param_t p{};
  wait_request(worker, ucx().ucp_worker_flush_nbx(worker.get(), &p),
               Clock::now() + std::chrono::milliseconds(200));
}

ClientWorker::ClientWorker() : impl_(std::make_unique<Impl>()) {}
ClientWorker::~ClientWorker() = default;

std::unique_ptr<PeerClient> PeerClient::connect(const std::string& address,
                                                const ClientOptions& options,
                                                std::shared_ptr<ClientWorker> worker) {
  return std::make_unique<ClientImpl>(address, options, std::move(worker));
}

}  // namespace sluice::net
