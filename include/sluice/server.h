#pragma once

#include <sluice/dataset.h>
#include <sluice/export.h>
#include <sluice/options.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

namespace sluice {

/// Options of a shard server (`sluice serve`, and the server inside each loader process).
struct ServerOptions {
  std::string listen = "127.0.0.1:0";  // HOST:PORT to listen on (TCP); port 0 picks a free one
  std::string token;                   // clients prove they hold it (HMAC challenge-response)
  bool no_token = false;  // serve without a token: anyone who can connect reads (trusted hosts)
  uint32_t max_request_samples = 4096;      // larger requests are refused
  uint64_t max_reply_bytes = 256ull << 20;  // larger replies are refused
  uint32_t max_connections = 1024;          // clients at once; more are closed at accept
  uint32_t max_handshakes = 64;             // connections still proving the token, at once
  uint32_t handshake_timeout_ms = 5000;     // to prove the token; then the connection is closed
  // Requests queued, being read or sent: beyond these a request is answered kBusy (the client
  // sends it again later); a client that floods requests and takes no replies is disconnected.
  uint32_t max_queued_per_connection = 64;
  uint32_t max_queued = 1024;              // all clients together
  uint64_t max_reply_memory = 1ull << 30;  // reply buffers at once; readers wait beyond it
  uint32_t read_threads = 4;               // replies being read at once (their reads share
                                           // one IO thread and its queue)
  // Keep copies of peers' checkpoints here (include/sluice/checkpoint.h, CheckpointReplica);
  // empty: refuse them. Authenticated clients write and read any checkpoint under it.
  std::filesystem::path checkpoint_dir;
  // engine, queue_depth, direct (O_DIRECT reads when the file system allows them) and
  // timeout_ms (longest wait for one reply's reads) apply; threads and verify do not (the
  // client checks every record against its checksum).
  IoOptions io;
};

struct ServerStats {
  uint64_t requests = 0;          // answered with data
  uint64_t rejected = 0;          // malformed, unauthenticated, out of range: answered or dropped
  uint64_t busy = 0;              // answered kBusy (back-pressure)
  uint64_t bytes_sent = 0;        // record bytes in data replies
  uint64_t connections = 0;       // clients that proved the token, so far
  uint64_t open_connections = 0;  // of them, connected now
  // Connections closed before or at the handshake: garbage, a wrong token, too slow, over the
  // limits.
  uint64_t refused = 0;
  uint64_t checkpoint_ops = 0;    // checkpoint copy requests carried out (writes, commits, reads)
  uint64_t checkpoint_bytes = 0;  // checkpoint bytes received
};

/// Serves a dataset's samples to remote loaders over UCX (verbs on InfiniBand/RoCE, TCP or
/// shared memory elsewhere). A client first proves the token on a plain TCP connection
/// (challenge-response, HMAC-SHA256); only then do the two exchange UCX worker addresses. Clients
/// ask for samples by global index, never by file offset; every request is authenticated and
/// checked (size, version, count, index range) and a bad one gets an error reply. A reply
/// exposes only a buffer of the dataset's records.
class SLUICE_EXPORT ShardServer {
 public:
  /// Listens on options.listen and serves `dataset` (null: none, only checkpoint copies) from
  /// threads of its own until destroyed.
  /// Throws Error(kInvalidArgument) for a bad address, Error(kConfig) without a token unless
  /// no_token says so, Error(kIo) when it cannot listen ("address already in use") or UCX fails.
  static std::unique_ptr<ShardServer> start(std::shared_ptr<const Dataset> dataset,
                                            const ServerOptions& options);
  virtual ~ShardServer() = default;
  /// HOST:PORT that clients connect to (the bound port when options.listen said 0).
  virtual std::string address() const = 0;
  virtual ServerStats stats() const = 0;
  /// How records are read: the IO engine, and direct I/O on or why not ("io_uring ...; direct
  /// I/O (O_DIRECT) on").
  virtual std::string io_description() const = 0;
};

}  // namespace sluice
