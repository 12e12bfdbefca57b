#pragma once

// Copies of peers' checkpoints on this node's disk (`sluice serve --checkpoint-dir DIR`): the
// server side of checkpoint replication. Under DIR:
//
//   .CHECKPOINT.incoming/FILE.part.sluice   a file arriving (kWrite chunks, any order)
//   .CHECKPOINT.incoming/FILE               committed: whole at its size, fsynced
//   CHECKPOINT/                             published: every file the writer named, durable;
//                                           replaced in one step by the next publish
//
// Names come checked by parse_checkpoint_request (no path can leave DIR). One writer per file
// at a time; the ops of different files may run in parallel.

#include "net/wire.h"

#include <filesystem>
#include <mutex>
#include <span>
#include <string>

namespace sluice::net {

class ReplicaStore {
 public:
  /// Creates `root` if needed. Throws Error(kIo) when it cannot.
  explicit ReplicaStore(std::filesystem::path root);

  /// The op's effect; throws Error: kNotFound (no such checkpoint or file), kInvalidArgument
  /// (a commit at the wrong size, a publish naming a file not committed), kIo (the disk).
  void write(const CheckpointRequest& r);
  void commit(const CheckpointRequest& r);
  void publish(const CheckpointRequest& r);
  /// "SIZE CHECKSUM FILE\n" for each file of the published checkpoint (CHECKSUM: 16 hex digits
  /// of its FileChecksum, taken at its commit). kCorruption when a file's size moved since.
  std::string list(const std::string& checkpoint) const;
  /// Reads r.header.length bytes at r.header.offset of a published file into `out` (that long);
  /// kInvalidArgument when the file ends before.
  void read(const CheckpointRequest& r, std::span<std::byte> out) const;

  const std::filesystem::path& root() const { return root_; }

 private:
  std::filesystem::path incoming(const std::string& checkpoint) const;

  std::filesystem::path root_;
  std::mutex mu_;  // publishes, and the incoming directories' creation
};

}  // namespace sluice::net
