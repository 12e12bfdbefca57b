#pragma once

// The shard server's replies to sample requests: the records read from the dataset's files
// (read::DatasetFiles, the same owner the loader reads through) with the IO engine, straight
// into a pooled reply buffer.

#include <sluice/dataset.h>
#include <sluice/server.h>

#include "io/engine.h"
#include "io/service.h"
#include "net/reply.h"
#include "read/dataset_files.h"

#include <memory>
#include <string>

namespace sluice::net {

class RecordReplies {
 public:
  /// Opens the dataset's files per `options.io.direct` (under auto, on data that fits in
  /// memory, warms the page cache in the background) and the IO engine on them.
  RecordReplies(std::shared_ptr<const Dataset> dataset, const ServerOptions& options,
                std::shared_ptr<const io::Faults> faults, ReplyBuffers& buffers);

  /// Any reader thread: the reply to `job` (its records, or the error that stopped them);
  /// `record_bytes` gets the records' bytes (0 on an error).
  std::unique_ptr<Reply> build(const Job& job, uint64_t& record_bytes);

  /// The engine and the direct-I/O choice, for the log.
  const std::string& description() const { return description_; }

 private:
  std::shared_ptr<const Dataset> dataset_;
  const ServerOptions& options_;
  ReplyBuffers& buffers_;
  read::DatasetFiles files_;
  std::unique_ptr<io::Service> io_;
  std::string description_;
};

}  // namespace sluice::net
