#include <sluice/server.h>

#include "common/errors.h"
#include "common/file.h"
#include "format/layout.h"
#include "index/direct.h"
#include "io/service.h"
#include "memory/aligned_buffer.h"
#include "net/ucx.h"
#include "net/wire.h"

#include <fmt/format.h>

#include <sys/mman.h>
#include <sys/stat.h>

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
  uint64_t conn = 0;
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
    open_io();
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
    Job job{conn->second, req->request_id, req->separate_bytes, std::vector<uint64_t>(req->count)};
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
    set_message(*reply, status, message);
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

  // The reply's message, then each of its separate records; the reply is freed once UCX has
  // finished with all of them.
  void send(std::unique_ptr<Reply> reply) {
    auto it = conns_.find(reply->conn);
    if (it == conns_.end()) return give_back(std::move(reply->buffer));  // the client is gone
    Reply* r = reply.release();
    const size_t parts = r->parts.size();  // r may be gone after its last post
    r->owner = this;
    r->sends_left = 1 + parts;
    ++in_flight_;
    post(it->second, kReplyAm, &r->header, sizeof r->header, r->buffer.data(), r->size, r);
    for (size_t k = 0; k < parts; ++k) {
      Part& part = r->parts[k];
      post(it->second, kRecordAm, &part.header, sizeof part.header, part.data, part.header.size, r);
    }
  }

  void post(ucp_ep_h ep, uint16_t id, const void* header, size_t header_bytes, const void* data,
            size_t bytes, Reply* reply) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = &ServerImpl::on_sent;
    p.user_data = reply;
    ucs_status_ptr_t st = ucp_am_send_nbx(ep, id, header, header_bytes, data, bytes, &p);
    if (!UCS_PTR_IS_PTR(st)) sent_one(reply);  // sent (or failed) at once
  }

  // Runs in the progress thread, from ucp_worker_progress.
  static void on_sent(void* request, ucs_status_t, void* user_data) {
    auto* reply = static_cast<Reply*>(user_data);
    reply->owner->sent_one(reply);
    ucp_request_free(request);
  }

  void sent_one(Reply* reply) {
    if (--reply->sends_left > 0) return;
    --in_flight_;
    give_back(std::move(reply->buffer));
    delete reply;
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
        free_buffers_.erase(best);
        return b;
      }
    }
    AlignedBuffer b;
    b.reserve(format::align_up(std::max<size_t>(bytes, 1), 64 << 10));
    std::memset(b.data(), 0, b.capacity());
    return b;
  }

  // Keeps up to kMaxIdleBytes of buffers for reuse, frees the rest.
  void give_back(AlignedBuffer&& b) {
    constexpr size_t kMaxIdleBytes = 256ull << 20;
    std::lock_guard lock(mu_);
    if (b.data() && idle_bytes_ + b.capacity() <= kMaxIdleBytes) {
      idle_bytes_ += b.capacity();
      free_buffers_.push_back(std::move(b));
    }
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
      uint64_t record_bytes = 0;
      auto reply = build_reply(job, record_bytes);
      if (ReplyFault fault = reply_fault()) {
        std::chrono::milliseconds delay{0};
        fault(address_, reply->header, {reply->buffer.data(), reply->size}, delay);
        if (delay.count() > 0) std::this_thread::sleep_for(delay);
      }
      {
        std::lock_guard lock(mu_);
        if (reply->header.status == ReplyStatus::kOk) {
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
      const uint64_t align = direct_ ? dataset_->alignment() : 1;
      std::vector<RecordInfo> infos(n);
      std::vector<io::ReadOp> ops;
      std::vector<uint64_t> op_at;       // where each op's cover goes in the buffer
      std::vector<size_t> op_sample;     // whose cover each op reads
      std::vector<uint64_t> read_at(n);  // where a separate record that is read lands
      std::vector<detail::UniqueFd> files;
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
      // Plans the read of record i's cover at the next free place from `end`; returns where
      // the record itself lands.
      uint64_t end = 0;
      auto plan_read = [&](size_t i) {
        const SampleExtent& e = extents[i];
        const uint64_t start = e.offset / align * align;
        const uint64_t cover = format::align_up(e.offset + e.size, align) - start;
        const uint64_t at = format::align_up(end, align);
        ops.push_back({e.shard, start, static_cast<uint32_t>(cover), nullptr,
                       static_cast<uint32_t>(e.offset - start + e.size)});
        op_at.push_back(at);
        op_sample.push_back(i);
        if (files_) {
          files.emplace_back(dataset_->open_sample(job.indices[i], direct_));
          ops.back().fd = files.back().get();
        }
        end = at + cover;
        return at + (e.offset - start);
      };
      for (size_t i = 0; i < n; ++i) {
        infos[i] = {kSeparate, extents[i].size, extents[i].checksum};
        record_bytes += extents[i].size;
        if (separate(i)) {
          ++reply->header.separate;
          continue;
        }
        infos[i].offset = plan_read(i);
      }
      const uint64_t table = format::align_up(end, 8);
      const uint64_t reply_bytes = table + n * sizeof(RecordInfo);
      end = reply_bytes;
      for (size_t i = 0; i < n; ++i)  // separate records not sent from a mapping: read them too
        if (separate(i) && !mapped(i)) read_at[i] = plan_read(i);
      if (end > options_.max_reply_bytes) {
        record_bytes = 0;
        set_message(*reply, ReplyStatus::kTooLarge,
                    fmt::format("reply of {} bytes is over the server's limit of {}", end,
                                options_.max_reply_bytes));
        return reply;
      }
      reply->buffer = take_buffer(end);
      std::byte* out = reply->buffer.data();
      for (size_t k = 0; k < ops.size(); ++k) ops[k].dest = out + op_at[k];
      if (!ops.empty()) {
        auto deadline =
            std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.io.timeout_ms);
        io::ReadFailure f = io_->read_all(ops, deadline);
        if (f.error != 0) {
          const io::ReadOp& op = ops[f.op];
          const uint64_t index = job.indices[op_sample[f.op]];
          std::string file = files_ ? std::string(dataset_->sample_file(index))
                                    : dataset_->shards()[op.file].path.string();
          detail::fail(ErrorCode::kIo, "{}: sample {}: read [{}+{}]: {}", file, index, op.offset,
                       op.length,
                       f.error == -ENODATA ? "end of file (truncated?)" : std::strerror(-f.error));
        }
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
    DirectFiles direct = open_direct(*dataset_, options_.io.direct, "server io.direct");
    direct_ = direct.on;
    direct_fds_ = std::move(direct.fds);
    files_ = !dataset_->sample_file(0).empty();
    std::vector<int> fds;
    if (files_)
      fds = {dataset_->shard_fd(0)};  // reads use each op's own descriptor
    else
      for (uint32_t i = 0; i < dataset_->shards().size(); ++i)
        fds.push_back(direct_ ? direct_fds_[i].get() : dataset_->shard_fd(i));
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
    io_ = std::make_unique<io::Service>(options_.io, fds,
                                        [&](const std::string& line) { engine = line; });
    io_description_ =
        fmt::format("{}; {}", engine,
                    direct_ ? "direct I/O (O_DIRECT) on"
                            : "reading through the page cache" +
                                  std::string(maps_.empty() ? "" : ", large records sent from it") +
                                  (direct.why_not.empty() ? "" : " (" + direct.why_not + ")"));
  }

  std::shared_ptr<const Dataset> dataset_;
  ServerOptions options_;
  TokenDigest token_;
  bool direct_ = false;
  bool files_ = false;  // a files tree: each sample's file is opened for its read
  std::vector<detail::UniqueFd> direct_fds_;
  std::unique_ptr<io::Service> io_;
  std::vector<Mapping> maps_;  // per shard, through the page cache (packed datasets)
  std::string io_description_;
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
  std::vector<AlignedBuffer> free_buffers_;
  size_t idle_bytes_ = 0;
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
