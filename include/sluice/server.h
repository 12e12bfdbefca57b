#pragma once

#include <sluice/dataset.h>
#include <sluice/export.h>
#include <sluice/options.h>

#include <cstdint>
#include <memory>
#include <string>

namespace sluice {

/// Options of a shard server (`sluice serve`, and the server inside each loader process).
struct ServerOptions {
  std::string listen = "127.0.0.1:0";       // HOST:PORT to listen on; port 0 picks a free one
  std::string token;                        // clients must present the same shared token
  uint32_t max_request_samples = 4096;      // larger requests are refused
  uint64_t max_reply_bytes = 256ull << 20;  // larger replies are refused
  uint32_t read_threads = 4;                // replies being read at once (their reads share
                                            // one IO thread and its queue)
  // engine, queue_depth, direct (O_DIRECT reads when the file system allows them) and
  // timeout_ms (longest wait for one reply's reads) apply; threads and verify do not (the
  // client checks every record against its checksum).
  IoOptions io;
};

struct ServerStats {
  uint64_t requests = 0;     // answered with data
  uint64_t rejected = 0;     // answered with an error: malformed, unauthorized, out of range
  uint64_t bytes_sent = 0;   // record bytes in data replies
  uint64_t connections = 0;  // accepted so far
};

/// Serves a dataset's samples to remote loaders over UCX (verbs on InfiniBand/RoCE, TCP or
/// shared memory elsewhere). Clients ask for samples by global index, never by file offset;
/// every request is checked (size, version, token, count, index range) and a bad one gets an
/// error reply. A reply exposes only a buffer of the dataset's records.
class SLUICE_EXPORT ShardServer {
 public:
  /// Listens on options.listen and serves `dataset` from threads of its own until destroyed.
  /// Throws Error(kInvalidArgument) for a bad address, Error(kIo) when UCX cannot listen.
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
