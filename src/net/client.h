#pragma once

// A client of one shard server: batched sample reads over UCX, many requests in flight, each
// reply's data landing in a buffer the caller chooses (for large replies UCX rendezvous pulls
// it straight into that buffer: no staging copy).

#include "net/wire.h"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace sluice::net {

struct ClientOptions {
  std::string token;           // the cluster's shared token
  uint32_t timeout_ms = 5000;  // connecting, and waiting for the replies of one read()
  bool verify = true;          // check every record against its checksum (end to end)
  // Records at least this long come in messages of their own, each moved from where it lies on
  // the server straight into its own destination (ReadRequest::record_destination); 0: never.
  uint32_t separate_bytes = 256 << 10;
  // Once set, a client waiting to connect or for replies gives up within 100 ms ("cancelled"):
  // the loader stopping. Must outlive the client.
  const std::atomic<bool>* cancel = nullptr;
};

/// One request: which samples, where their bytes go, and (after read()) what came back.
struct ReadRequest {
  std::vector<uint64_t> indices;
  /// Called once with the reply's data size (the records, then one RecordInfo per sample);
  /// returns an 8-byte-aligned buffer at least that long.
  std::function<std::span<std::byte>(size_t bytes)> destination;
  /// Optional: where record `record` (its position in `indices`) goes when it comes in a
  /// message of its own (ClientOptions::separate_bytes). A span shorter than `bytes` (or no
  /// function) lets the client keep it in `owned`.
  std::function<std::span<std::byte>(size_t record, size_t bytes)> record_destination;

  // Filled by read():
  std::vector<std::span<const std::byte>> record_data;  // each record's bytes, wherever they are
  std::vector<RecordInfo> records;            // the reply's table (offset kSeparate: came apart)
  std::vector<std::vector<std::byte>> owned;  // separate records without a destination
};

/// A request of another kind than a sample read (a checkpoint op, wire.h CheckpointHeader), and
/// after PeerClient::call its reply.
struct RawCall {
  std::vector<std::byte> header;  // its connection id, MAC and request id are filled in
  std::span<const std::byte> data;
  // Filled by call():
  ReplyStatus status = ReplyStatus::kOk;
  std::vector<std::byte> reply;  // the reply's data: what was asked for, or the error text
};

/// A UCX context and worker that several clients share, each with its endpoint on it: one per
/// loader serves every peer for all its threads, so n peers cost n endpoints, not a context
/// and worker each (per thread). Replies are routed to their client by request id, and a client
/// takes them only from its own server's endpoint. Thread-safe: every use of the worker is
/// under its lock, released while a thread sleeps; a thread that handles another's reply
/// wakes it.
class ClientWorker {
 public:
  ClientWorker();
  ~ClientWorker();
  ClientWorker(const ClientWorker&) = delete;
  ClientWorker& operator=(const ClientWorker&) = delete;
  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

class PeerClient {
 public:
  /// Connects to the server at HOST:PORT, on `worker` (null: a worker of its own). Throws
  /// Error(kInvalidArgument) for a bad address and Error(kIo) "peer HOST:PORT: ..." when it
  /// cannot connect within the timeout.
  static std::unique_ptr<PeerClient> connect(const std::string& address,
                                             const ClientOptions& options,
                                             std::shared_ptr<ClientWorker> worker = nullptr);
  virtual ~PeerClient() = default;
  virtual const std::string& address() const = 0;

  /// Sends every request at once and waits for all replies (at most timeout_ms in all). On
  /// return each request's data is in its destination, every record checked against its
  /// checksum. Throws Error naming the peer: kIo when the peer is unreachable, dies or does not
  /// answer in time (the client is unusable afterwards), kInvalidArgument / kNotFound /
  /// kCorruption for the server's refusals and for damaged bytes.
  virtual void read(std::span<ReadRequest> requests) = 0;
  /// The requests of one start(). Dropped before finish(), it waits for the receives under way
  /// into the caller's memory (or closes the connection) before it goes. It must not outlive
  /// its client.
  class Call {
   public:
    virtual ~Call() = default;
  };
  /// read() in two halves, so that one thread keeps requests in flight to several peers (and
  /// reads local samples) meanwhile: start() sends, finish() waits, checks and throws as read()
  /// does. `requests` must stay alive until finish() returns (or the call goes). Replies that
  /// arrive before finish() wait in the transport (or land, when another thread progresses the
  /// shared worker); the timeout counts from finish(). Thread-safe: several threads may have
  /// calls in flight on one client. A failure of one (a timeout, a dead peer) fails the others.
  virtual std::unique_ptr<Call> start(std::span<ReadRequest> requests) = 0;
  virtual void finish(Call& call) = 0;

  /// Sends every call at once (signed, eagerly: the server takes no request data by rendezvous),
  /// sends again those the server answers kBusy, and waits for every reply (timeout_ms in all).
  /// The server's answers, refusals included, are each call's status and reply; throws as read()
  /// does when the peer fails or does not answer.
  virtual void call(std::span<RawCall> calls) = 0;

  /// Test seam: sends a raw request (any header and data bytes; where there is room, its first
  /// kRequestAuthBytes become this connection's id and the request's MAC, or a zero MAC without
  /// `sign`) and returns the
  /// reply's status and message; throws as read() does when none comes.
  virtual std::pair<ReplyStatus, std::string> send_raw(std::span<const std::byte> header,
                                                       std::span<const std::byte> data,
                                                       bool sign = true) = 0;
};

}  // namespace sluice::net
