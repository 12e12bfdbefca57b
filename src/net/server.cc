#include <sluice/server.h>

#include "common/errors.h"
#include "net/ucx.h"
#include "net/wire.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

namespace sluice::net {
namespace {

std::mutex g_fault_mu;
ReplyFault g_fault;

ReplyFault reply_fault() {
  std::lock_guard lock(g_fault_mu);
  return g_fault;
}

// One reply in flight: header and data stay alive until UCX reports the send complete.
struct Reply {
  ReplyHeader header;
  // Not value-initialised: zeroing megabytes that pread overwrites cost 6% of the server's
  // CPU at 1 MiB samples (perf).
  std::unique_ptr<std::byte[]> data;
  size_t size = 0;

  std::span<std::byte> resize(size_t n) {
    data = std::make_unique_for_overwrite<std::byte[]>(n);
    size = n;
    header.data_bytes = n;
    return {data.get(), n};
  }
  void set_message(std::string_view message) {
    std::memcpy(resize(message.size()).data(), message.data(), message.size());
  }
  uint64_t conn = 0;
  size_t* in_flight = nullptr;  // the server's count of replies being sent
};

struct Job {
  uint64_t conn = 0;
  uint64_t request_id = 0;
  std::vector<uint64_t> indices;
};

bool same_digest(const TokenDigest& a, const TokenDigest& b) {
  uint8_t diff = 0;  // constant time: no early exit on the first differing byte
  for (size_t i = 0; i < a.size(); ++i) diff = static_cast<uint8_t>(diff | (a[i] ^ b[i]));
  return diff == 0;
}

class ServerImpl final : public ShardServer {
 public:
  ServerImpl(std::shared_ptr<const Dataset> dataset, const ServerOptions& options)
      : dataset_(std::move(dataset)), options_(options), token_(token_digest(options.token)) {
    SocketAddress addr = SocketAddress::parse(options.listen);
    worker_.set_am_handler(kRequestAm, &ServerImpl::on_request, this, "shard server");
    ucp_listener_params_t lp{};
    lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
    lp.sockaddr.addr = addr.get();
    lp.sockaddr.addrlen = addr.length;
    lp.conn_handler.cb = &ServerImpl::on_connection;
    lp.conn_handler.arg = this;
    check(ucp_listener_create(worker_.get(), &lp, &listener_),
          "shard server: listen on " + options.listen);
    ucp_listener_attr_t la{};
    la.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
    check(ucp_listener_query(listener_, &la), "shard server: listener address");
    address_ = to_string(reinterpret_cast<const sockaddr*>(&la.sockaddr));
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

  std::string address() const override { return address_; }

  ServerStats stats() const override {
    std::lock_guard lock(mu_);
    return stats_;
  }

 private:
  // --- progress thread: everything that touches UCX --------------------------------------------

  void progress_loop() {
    while (true) {
      worker_.progress();
      send_finished();
      {
        std::lock_guard lock(mu_);
        if (stop_) break;
      }
      worker_.wait(std::chrono::milliseconds(100));
    }
    // Shut down: close every connection, let their sends fail, then drop the listener.
    for (auto& [id, ep] : conns_) close_ep(ep);
    conns_.clear();
    ep_ids_.clear();
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (in_flight_ > 0 && std::chrono::steady_clock::now() < until)
      worker_.wait(std::chrono::milliseconds(10));
    ucp_listener_destroy(listener_);
    worker_.progress();
  }

  static void on_connection(ucp_conn_request_h request, void* arg) {
    auto* self = static_cast<ServerImpl*>(arg);
    ucp_ep_params_t p{};
    p.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLER |
                   UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    p.conn_request = request;
    p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    p.err_handler.cb = &ServerImpl::on_ep_error;
    p.err_handler.arg = self;
    ucp_ep_h ep = nullptr;
    if (ucp_ep_create(self->worker_.get(), &p, &ep) != UCS_OK) return;  // the client sees a failure
    uint64_t id = ++self->next_conn_;
    self->conns_[id] = ep;
    self->ep_ids_[ep] = id;
    std::lock_guard lock(self->mu_);
    ++self->stats_.connections;
  }

  // A client went away (or its connection broke): forget it; its queued replies are dropped.
  static void on_ep_error(void* arg, ucp_ep_h ep, ucs_status_t) {
    auto* self = static_cast<ServerImpl*>(arg);
    auto it = self->ep_ids_.find(ep);
    if (it == self->ep_ids_.end()) return;
    self->conns_.erase(it->second);
    self->ep_ids_.erase(it);
    self->close_ep(ep);
  }

  void close_ep(ucp_ep_h ep) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t r = ucp_ep_close_nbx(ep, &p);
    if (UCS_PTR_IS_PTR(r)) ucp_request_free(r);  // released by UCX once the close completes
  }

  static ucs_status_t on_request(void* arg, const void* header, size_t header_length, void* data,
                                 size_t length, const ucp_am_recv_param_t* param) {
    auto* self = static_cast<ServerImpl*>(arg);
    self->handle_request(std::span(static_cast<const std::byte*>(header), header_length), data,
                         length, param);
    // Data of an eager message is consumed here; a rendezvous message that was not received is
    // dropped by UCX when the handler returns UCS_OK.
    return UCS_OK;
  }

  void handle_request(std::span<const std::byte> header, void* data, size_t length,
                      const ucp_am_recv_param_t* param) {
    ucp_ep_h ep = (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ? param->reply_ep : nullptr;
    auto conn = ep ? ep_ids_.find(ep) : ep_ids_.end();
    if (conn == ep_ids_.end()) {  // nobody to answer: sent without a reply endpoint
      std::lock_guard lock(mu_);
      ++stats_.rejected;
      return;
    }
    uint64_t request_id = 0;
    if (header.size() >= 16) std::memcpy(&request_id, header.data() + 8, 8);
    std::string error;
    auto req = parse_request(header, length, options_.max_request_samples, &error);
    if (!req) return reject(conn->second, request_id, ReplyStatus::kBadRequest, error);
    if (!same_digest(req->token, token_)) {
      return reject(conn->second, req->request_id, ReplyStatus::kUnauthorized,
                    "token mismatch: this server needs the cluster's shared token");
    }
    if (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) {
      // Index lists are small; a client that sends one by rendezvous is not a sluice client.
      return reject(conn->second, req->request_id, ReplyStatus::kBadRequest,
                    "request data must be sent eagerly");
    }
    Job job{conn->second, req->request_id, std::vector<uint64_t>(req->count)};
    std::memcpy(job.indices.data(), data, length);
    const uint64_t n = dataset_->num_samples();
    for (uint64_t index : job.indices) {
      if (index >= n)
        return reject(conn->second, req->request_id, ReplyStatus::kOutOfRange,
                      fmt::format("sample {} out of range: {} has {} samples", index,
                                  dataset_->path().string(), n));
    }
    {
      std::lock_guard lock(mu_);
      jobs_.push_back(std::move(job));
    }
    jobs_cv_.notify_one();
  }

  void reject(uint64_t conn, uint64_t request_id, ReplyStatus status, const std::string& message) {
    auto reply = std::make_unique<Reply>();
    reply->conn = conn;
    reply->header.request_id = request_id;
    reply->header.status = status;
    reply->set_message(message);
    {
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

  void send(std::unique_ptr<Reply> reply) {
    auto it = conns_.find(reply->conn);
    if (it == conns_.end()) return;  // the client is gone
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = &ServerImpl::on_sent;
    p.user_data = reply.get();
    ucs_status_ptr_t r = ucp_am_send_nbx(it->second, kReplyAm, &reply->header, sizeof reply->header,
                                         reply->data.get(), reply->size, &p);
    if (UCS_PTR_IS_PTR(r)) {
      ++in_flight_;
      reply->in_flight = &in_flight_;
      reply.release();  // freed by on_sent
    }
  }

  // Runs in the progress thread, from ucp_worker_progress.
  static void on_sent(void* request, ucs_status_t, void* user_data) {
    std::unique_ptr<Reply> reply(static_cast<Reply*>(user_data));
    --*reply->in_flight;
    ucp_request_free(request);
  }

  // --- reader threads ----------------------------------------------------------------------------

  void read_loop() {
    while (true) {
      Job job;
      {
        std::unique_lock lock(mu_);
        jobs_cv_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
        if (stop_) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      auto reply = build_reply(job);
      if (ReplyFault fault = reply_fault()) {
        std::chrono::milliseconds delay{0};
        fault(address_, reply->header, {reply->data.get(), reply->size}, delay);
        if (delay.count() > 0) std::this_thread::sleep_for(delay);
      }
      {
        std::lock_guard lock(mu_);
        if (reply->header.status == ReplyStatus::kOk) {
          ++stats_.requests;
          stats_.bytes_sent += reply->size - job.indices.size() * sizeof(RecordInfo);
        } else {
          ++stats_.rejected;
        }
        done_.push_back(std::move(reply));
      }
      worker_.signal();
    }
  }

  std::unique_ptr<Reply> build_reply(const Job& job) {
    auto reply = std::make_unique<Reply>();
    reply->conn = job.conn;
    reply->header.request_id = job.request_id;
    auto fail_with = [&](ReplyStatus status, const std::string& message) {
      reply->header.status = status;
      reply->header.count = 0;
      reply->set_message(message);
      return std::move(reply);
    };
    try {
      std::vector<RecordInfo> infos(job.indices.size());
      uint64_t total = 0;
      for (size_t i = 0; i < job.indices.size(); ++i) {
        SampleExtent e = dataset_->extent(job.indices[i]);
        infos[i] = {e.size, e.checksum};
        total += e.size;
      }
      const uint64_t padded = (total + 7) / 8 * 8;
      const uint64_t bytes = padded + infos.size() * sizeof(RecordInfo);
      if (bytes > options_.max_reply_bytes)
        return fail_with(ReplyStatus::kTooLarge,
                         fmt::format("reply of {} bytes is over the server's limit of {}", bytes,
                                     options_.max_reply_bytes));
      std::span<std::byte> out = reply->resize(bytes);
      uint64_t at = 0;
      for (uint64_t index : job.indices)  // pread straight into the reply; checks checksums
        at += dataset_->read_record_into(index, out.subspan(at));
      std::memset(out.data() + at, 0, padded - at);
      std::memcpy(out.data() + padded, infos.data(), infos.size() * sizeof(RecordInfo));
      reply->header.count = static_cast<uint32_t>(infos.size());
      return reply;
    } catch (const std::exception& e) {
      return fail_with(ReplyStatus::kReadError, e.what());
    }
  }

  std::shared_ptr<const Dataset> dataset_;
  ServerOptions options_;
  TokenDigest token_;
  Worker worker_;
  ucp_listener_h listener_ = nullptr;
  std::string address_;

  // Progress thread only.
  std::unordered_map<uint64_t, ucp_ep_h> conns_;
  std::unordered_map<ucp_ep_h, uint64_t> ep_ids_;
  uint64_t next_conn_ = 0;
  size_t in_flight_ = 0;

  // Shared, under mu_.
  mutable std::mutex mu_;
  std::condition_variable jobs_cv_;
  std::deque<Job> jobs_;
  std::deque<std::unique_ptr<Reply>> done_;
  ServerStats stats_;
  bool stop_ = false;

  std::vector<std::thread> readers_;
  std::thread progress_thread_;
};

}  // namespace

void set_reply_fault(ReplyFault fault) {
  std::lock_guard lock(g_fault_mu);
  g_fault = std::move(fault);
}

}  // namespace sluice::net

namespace sluice {

std::unique_ptr<ShardServer> ShardServer::start(std::shared_ptr<const Dataset> dataset,
                                                const ServerOptions& options) {
  return std::make_unique<net::ServerImpl>(std::move(dataset), options);
}

}  // namespace sluice
