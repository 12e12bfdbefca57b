#include <sluice/server.h>

#include "common/errors.h"
#include "common/log.h"
#include "common/thread.h"
#include "net/checkpoint_replies.h"
#include "net/connections.h"
#include "net/record_replies.h"
#include "net/replica_store.h"
#include "net/reply.h"
#include "net/server.h"
#include "net/ucx.h"
#include "net/wire.h"

#include <fmt/format.h>

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

// The shard server, in three units: connections and their handshakes (connections.h, the
// progress thread's), the replies to sample requests (record_replies.h) and to checkpoint ops
// (checkpoint_replies.h). This file is the request path between them: authenticated requests
// checked and queued, the reader threads that build replies, and the sends.

namespace sluice::net {
namespace {

// Error replies a client may leave unsent (it floods requests and takes no replies) before it
// is disconnected: they are small, but not free.
constexpr uint32_t kMaxUnsentErrors = 1024;

class ServerImpl final : public ShardServer {
 public:
  ServerImpl(std::shared_ptr<const Dataset> dataset, const ServerOptions& options,
             ServerFaults faults)
      : dataset_(std::move(dataset)),
        options_(options),
        faults_(std::move(faults)),
        token_(std::span(reinterpret_cast<const uint8_t*>(options.token.data()),
                         options.token.size())),
        buffers_([this] {
          { std::lock_guard lock(mu_); }  // a reader between its check and its wait sees this
          jobs_cv_.notify_one();
        }) {
    if (dataset_)
      records_ = std::make_unique<RecordReplies>(dataset_, options_, faults_.io, buffers_);
    if (!options_.checkpoint_dir.empty())
      store_ = std::make_unique<ReplicaStore>(options_.checkpoint_dir);
    worker_.set_am_handler(kRequestAm, &ServerImpl::on_request, this, "shard server");
    conns_.emplace(options_, token_, worker_,
                   ConnectionEvents{[this] {
                                      std::lock_guard lock(mu_);
                                      ++stats_.refused;
                                    },
                                    [this] {
                                      std::lock_guard lock(mu_);
                                      ++stats_.connections;
                                      ++stats_.open_connections;
                                    },
                                    [this](const Conn& c) { forget(c); }});
    for (uint32_t i = 0; i < std::max(1u, options_.read_threads); ++i)
      readers_.emplace_back([this] { read_loop(); });
    progress_thread_ = std::thread([this] { progress_loop(); });
  }

  ~ServerImpl() override {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    jobs_cv_.notify_all();
    for (auto& t : readers_) t.join();
    worker_.signal();
    progress_thread_.join();
  }

  std::string address() const override { return conns_->address(); }
  std::string io_description() const override {
    return records_ ? records_->description() : "no dataset";
  }

  ServerStats stats() const override {
    std::lock_guard lock(mu_);
    return stats_;
  }

 private:
  // --- progress thread: connections, handshakes and everything that touches UCX ---------------

  void progress_loop() {
    detail::background_thread("sluice-serve");
    auto next_check = Clock::now();
    while (true) {
      worker_.progress();
      send_finished();
      {
        std::lock_guard lock(mu_);
        if (stop_) break;
      }
      if (auto now = Clock::now(); now >= next_check) {
        conns_->tick(now);
        next_check = now + std::chrono::milliseconds(100);
      }
      // With UCX events pending, look at the sockets without sleeping, then progress again:
      // a busy data path never starves the listener and the handshakes.
      conns_->poll(worker_.arm() ? 100 : 0);
    }
    // Shut down: close every connection, let their sends fail, then stop listening.
    conns_->close_all();
    auto until = Clock::now() + std::chrono::seconds(2);
    while (in_flight_ > 0 && Clock::now() < until) worker_.wait(std::chrono::milliseconds(10));
    worker_.progress();
  }

  // A connection is being closed: its queued requests go with it.
  void forget(const Conn& c) {
    std::lock_guard lock(mu_);
    if (c.ready) --stats_.open_connections;
    total_outstanding_ -= std::erase_if(jobs_, [&](const Job& j) { return j.conn == c.id; });
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
      request_log_.log(
          fmt::format("shard server {}: dropped a request: {}", conns_->address(), why));
    };
    if (header.size() < kRequestAuthBytes) return drop("too short to name its connection");
    uint64_t id = 0;
    std::memcpy(&id, header.data(), sizeof id);
    Conn* found = conns_->find(id);
    if (!found || !found->ready) return drop("names no open connection");
    Conn& c = *found;
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
      drop("data sent by rendezvous");  // index lists are small: not a sluice client
      return conns_->close(c, "a request's data sent by rendezvous");
    }
    auto indices = std::span(static_cast<const std::byte*>(data), length);
    RequestMac want = request_mac(*c.session, header, indices);
    RequestMac got;
    std::memcpy(got.data(), header.data() + sizeof id, got.size());
    if (!equal_constant_time(want, got)) {
      drop("MAC mismatch");
      return conns_->close(c, "a request failed authentication");
    }
    uint64_t request_id = 0;
    if (header.size() >= offsetof(RequestHeader, request_id) + 8)
      std::memcpy(&request_id, header.data() + offsetof(RequestHeader, request_id), 8);
    // Error replies go out at once unless the client stops taking them while it floods us.
    if (c.unsent_errors >= kMaxUnsentErrors)
      return conns_->close(
          c, fmt::format("does not take its replies ({} error replies unsent)", c.unsent_errors));
    uint32_t magic = 0;
    if (header.size() >= offsetof(RequestHeader, magic) + 4)
      std::memcpy(&magic, header.data() + offsetof(RequestHeader, magic), 4);
    if (magic == kCheckpointMagic) return handle_checkpoint(c, request_id, header, data, length);
    auto req = parse_request(header, length, options_.max_request_samples);
    if (!req) return reject(c, request_id, ReplyStatus::kBadRequest, req.error());
    if (!records_)
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

  void reject(Conn& c, uint64_t request_id, ReplyStatus status, const std::string& message) {
    auto reply = std::make_unique<Reply>();
    reply->conn = c.id;
    reply->header.request_id = request_id;
    reply->counted = false;
    set_message(*reply, buffers_, status, message);
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
    Conn* c = conns_->find(reply->conn);
    if (!c || !c->ep) {  // the client is gone
      replied(*reply);
      return buffers_.give_back(std::move(reply->buffer));
    }
    Reply* r = reply.release();
    const size_t parts = r->parts.size();  // r may be gone after its last post
    r->owner = this;
    r->sends_left = 1 + parts;
    ++in_flight_;
    ucp_ep_h ep = c->ep;
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
    static_cast<ServerImpl*>(reply->owner)->sent_one(reply);
    ucx().ucp_request_free(request);
  }

  void sent_one(Reply* reply) {
    if (--reply->sends_left > 0) return;
    --in_flight_;
    replied(*reply);
    buffers_.give_back(std::move(reply->buffer));
    delete reply;
  }

  // A reply is done with (sent, failed, or its client gone).
  void replied(const Reply& r) {
    Conn* c = conns_->find(r.conn);
    if (!r.counted) {
      if (c) --c->unsent_errors;
      return;
    }
    if (c) --c->outstanding;
    --total_outstanding_;
  }

  // --- reader threads ----------------------------------------------------------------------------

  void read_loop() {
    detail::background_thread("sluice-serve-io");
    while (true) {
      Job job;
      {
        std::unique_lock lock(mu_);
        // Replies not yet sent hold their buffers: past max_reply_memory of them, readers wait
        // for sends to finish (clients that do not take their replies meet kBusy, then a close).
        jobs_cv_.wait(lock, [&] {
          return stop_ || (!jobs_.empty() && buffers_.busy_bytes() < options_.max_reply_memory);
        });
        if (stop_) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      uint64_t record_bytes = 0;
      std::unique_ptr<Reply> reply;
      if (job.checkpoint) {
        reply = checkpoint_reply(*store_, buffers_, job);
        std::lock_guard lock(mu_);
        queued_payload_ -= job.payload.size();
        ++stats_.checkpoint_ops;
        stats_.checkpoint_bytes += job.payload.size();
      } else {
        reply = records_->build(job, record_bytes);
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

  std::shared_ptr<const Dataset> dataset_;
  ServerOptions options_;
  ServerFaults faults_;
  Mac token_;  // HMAC-SHA256 under the token (empty with no_token)
  ReplyBuffers buffers_;
  std::unique_ptr<RecordReplies> records_;  // the dataset's records (none: checkpoints only)
  std::unique_ptr<ReplicaStore> store_;     // peers' checkpoint copies (options.checkpoint_dir)
  Worker worker_;
  std::optional<Connections> conns_;    // progress thread only (made once the worker is)
  detail::RateLimitedLog request_log_;  // requests dropped unparsed

  // Progress thread only.
  size_t in_flight_ = 0;          // replies whose sends UCX has not finished
  size_t total_outstanding_ = 0;  // Conn::outstanding of all connections, and of closed ones
                                  // whose replies are still being read or sent

  // Shared, under mu_.
  mutable std::mutex mu_;
  std::condition_variable jobs_cv_;
  std::deque<Job> jobs_;
  std::deque<std::unique_ptr<Reply>> done_;
  size_t queued_payload_ = 0;  // checkpoint payloads queued or being written

  ServerStats stats_;
  bool stop_ = false;

  std::vector<std::thread> readers_;
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
