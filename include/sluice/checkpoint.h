#pragma once

/// Checkpoints written and read through sluice's IO engine: large aligned O_DIRECT writes from
/// reused staging buffers, a checksum per part, and directories that become visible only when
/// complete and durable. For C++ trainers: save_checkpoint and load_checkpoint. (The file layer
/// python/sluice/checkpoint.py builds torch.distributed.checkpoint's StorageWriter and
/// StorageReader on is internal: src/checkpoint/files.h.)

#include <sluice/export.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace sluice {

/// A peer that keeps a copy of checkpoints on its disk: a `sluice serve --checkpoint-dir DIR`,
/// which takes them only from clients holding the cluster's token.
struct CheckpointReplica {
  std::string address;          // HOST:PORT; empty: no copy
  std::string token;            // the cluster's token (DistributedOptions::resolved_token)
  uint32_t timeout_ms = 30000;  // connecting, and each step (4 chunks of 8 MiB) of a copy
  std::string name;             // the copy's name on the peer; "": checkpoint_copy_name(dir)
};

/// How checkpoint files are written and read. Config `checkpoint` (Python: keyword arguments).
struct CheckpointOptions {
  bool direct = true;                 // O_DIRECT where the file system takes it (else the page
                                      // cache, one line says so)
  uint32_t queue_depth = 8;           // IOs in flight
  uint64_t chunk_bytes = 8ull << 20;  // bytes per IO, each from its own 4 KiB-aligned staging
                                      // buffer, reused
  bool durable = true;                // fsync the files and the directories that name them
  // While a Loader in this process has reads waiting on the same device, checkpoint writes take at
  // most this share of the device's time (one write of at most 1 MiB at a time, then a pause): the
  // loader's reads go first. 1: no priority for reads.
  double share = 0.05;
  // save_checkpoint also copies the checkpoint to this peer; load_checkpoint restores from it
  // when the local copy is gone.
  CheckpointReplica replica;
};

/// One named part of a checkpoint file (a tensor's bytes).
struct CheckpointPart {
  std::string name;
  std::span<const std::byte> bytes;
};

/// Where a part lies in its file, and the checksum of its bytes.
struct PartExtent {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint32_t checksum = 0;
};

/// What a write did.
struct CheckpointWriteResult {
  std::vector<PartExtent> parts;  // in the order given
  uint64_t bytes = 0;
  double seconds = 0;       // from the call to the file durable
  double held_seconds = 0;  // writes held back while a Loader's reads waited (QoS)
  bool direct = false;      // written with O_DIRECT
  // save_checkpoint with a replica: why its copy on the peer is missing (the local save
  // succeeded all the same); "" when copied.
  std::string replica_error;
};

/// For C++ trainers: writes `parts` as the checkpoint directory `dir` (`data`: the parts one
/// after another; `index.json`: each part's name, offset, length and checksum). Written in a
/// staging directory and published as publish_checkpoint_dir does, so a crash at any point
/// leaves the previous `dir` as it was; staging left by earlier crashed saves is removed first.
/// With options.replica, then copies `dir` to the peer (named checkpoint_copy_name(dir) there)
/// and publishes it; a failed copy is `replica_error` (and one log line), not an exception.
SLUICE_EXPORT CheckpointWriteResult save_checkpoint(const std::filesystem::path& dir,
                                                    std::span<const CheckpointPart> parts,
                                                    const CheckpointOptions& options = {});

/// Fetches the replica's checkpoint `name` into `dir` (a node that lost its disk), every chunk
/// checked against its checksum (kCorruption naming the file and range), written in a staging
/// directory and published as save_checkpoint does. Processes restoring the same `dir` take
/// turns (a lock file `.NAME.restore-lock` beside it): the first fetches, the others find `dir`
/// matching the replica (same files and sizes) and return false. kNotFound when the peer has
/// no such checkpoint.
SLUICE_EXPORT bool restore_checkpoint_dir(const CheckpointReplica& replica, const std::string& name,
                                          const std::filesystem::path& dir);

struct LoadedPart {
  std::string name;
  std::vector<std::byte> bytes;
};

/// Reads back what save_checkpoint wrote, every part checked (errors as read_checkpoint_file;
/// a missing or damaged index.json is kNotFound / kCorruption naming it). With a replica and no
/// local index.json, restores `dir` from the replica first.
SLUICE_EXPORT std::vector<LoadedPart> load_checkpoint(const std::filesystem::path& dir,
                                                      const CheckpointOptions& options = {});

}  // namespace sluice
