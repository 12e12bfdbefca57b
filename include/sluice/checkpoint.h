#pragma once

/// Checkpoints written and read through sluice's IO engine: large aligned O_DIRECT writes from
/// reused staging buffers, a checksum per part, and directories that become visible only when
/// complete and durable. python/sluice/checkpoint.py builds torch.distributed.checkpoint's
/// StorageWriter and StorageReader on the file layer here.

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

/// The name a checkpoint directory's copy has on a peer unless CheckpointReplica::name says
/// otherwise: its name (outside [A-Za-z0-9._-] as '_') and 16 hex digits of XXH3 of its
/// absolute path ("step-100-3f2a..."), so that two jobs' "step-100" never share a copy while a
/// replaced node, mounting the same path, finds its own.
SLUICE_EXPORT std::string checkpoint_copy_name(const std::filesystem::path& dir);

/// How checkpoint files are written and read. Config `checkpoint` (Python: keyword arguments).
struct CheckpointOptions {
  bool direct = true;                 // O_DIRECT where the file system takes it (else the page
                                      // cache, one line says so)
  uint32_t queue_depth = 8;           // IOs in flight
  uint64_t chunk_bytes = 8ull << 20;  // bytes per IO, each from its own 4 KiB-aligned staging
                                      // buffer, reused
  bool durable = true;                // fsync the files and the directories that name them
  // While a Loader in this process has reads waiting, checkpoint writes take at most this share
  // of the device's time (one write of at most 1 MiB at a time, then a pause): the loader's
  // reads go first. 1: no priority for reads.
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

/// Writes `parts` one after another into a new file `path` (an existing one is truncated), a
/// checksum per part, and fsyncs it when options.durable. The file's space is reserved first,
/// so a full disk fails before any write: kIo with ENOSPC naming the path and the bytes needed.
/// Blocks until done; calls for different paths may run in parallel.
SLUICE_EXPORT CheckpointWriteResult write_checkpoint_file(const std::filesystem::path& path,
                                                          std::span<const CheckpointPart> parts,
                                                          const CheckpointOptions& options = {});

/// One part to read back: `extent` of the file into `dest` (of extent.length bytes).
struct CheckpointReadPart {
  std::string name;  // what errors call it
  PartExtent extent;
  std::span<std::byte> dest;
};

/// Reads each part into its dest and checks its checksum: kCorruption naming the file, the part
/// and its range for a mismatch or a file that ends inside the part; kNotFound / kIo as the
/// system says.
SLUICE_EXPORT void read_checkpoint_file(const std::filesystem::path& path,
                                        std::span<const CheckpointReadPart> parts,
                                        const CheckpointOptions& options = {});

/// Makes the complete, durable directory `staging` visible as `dir` in one step: renamed into
/// place, or exchanged with an existing `dir` (renameat2 RENAME_EXCHANGE), which is then
/// removed. The parent directory is fsynced when `durable`.
SLUICE_EXPORT void publish_checkpoint_dir(const std::filesystem::path& staging,
                                          const std::filesystem::path& dir, bool durable = true);

/// A save's staging directory, `.NAME.partial-XXXXXX` beside the checkpoint `NAME`, made with
/// the umask's permissions (as mkdir makes the checkpoint's parent). While this object lives it
/// holds an flock on the directory, so that remove_partial_checkpoints in any process leaves it
/// alone; publish it before letting go.
class SLUICE_EXPORT PartialCheckpointDir {
 public:
  PartialCheckpointDir(std::filesystem::path path, int lock_fd)
      : path_(std::move(path)), fd_(lock_fd) {}
  PartialCheckpointDir(PartialCheckpointDir&& other) noexcept;
  PartialCheckpointDir& operator=(PartialCheckpointDir&& other) noexcept;
  PartialCheckpointDir(const PartialCheckpointDir&) = delete;
  PartialCheckpointDir& operator=(const PartialCheckpointDir&) = delete;
  ~PartialCheckpointDir() { release(); }

  const std::filesystem::path& path() const { return path_; }
  operator const std::filesystem::path&() const { return path_; }
  /// Lets go of the lock (a published directory is no longer a partial one).
  void release();

 private:
  std::filesystem::path path_;
  int fd_ = -1;
};

/// A fresh staging directory for `dir`, locked (see PartialCheckpointDir).
SLUICE_EXPORT PartialCheckpointDir make_partial_checkpoint_dir(const std::filesystem::path& dir);

/// Removes the staging directories that saves which never finished (killed mid-save) left in
/// `dir`'s parent, under any checkpoint name: each one no process holds (its flock is free).
/// Where the file system has no flock, only `dir`'s own are removed, so call it when no save of
/// `dir` is running. Returns their names.
SLUICE_EXPORT std::vector<std::string> remove_partial_checkpoints(const std::filesystem::path& dir);

/// For C++ trainers: writes `parts` as the checkpoint directory `dir` (`data`: the parts one
/// after another; `index.json`: each part's name, offset, length and checksum). Written in a
/// staging directory and published as publish_checkpoint_dir does, so a crash at any point
/// leaves the previous `dir` as it was; staging left by earlier crashed saves is removed first.
/// With options.replica, then copies `dir` to the peer (named checkpoint_copy_name(dir) there)
/// and publishes it; a failed copy is `replica_error` (and one log line), not an exception.
SLUICE_EXPORT CheckpointWriteResult save_checkpoint(const std::filesystem::path& dir,
                                                    std::span<const CheckpointPart> parts,
                                                    const CheckpointOptions& options = {});

/// Copies the files `files` of the local checkpoint directory `dir` to the replica as
/// checkpoint `name` (8 MiB chunks, 4 in flight, each with its XXH3 checksum). A copied file is
/// durable on the peer but not visible until publish_checkpoint_copy names it. Throws
/// Error naming the peer, the checkpoint and the file: kConfig without a token, kIo when the
/// peer is down or fails, kInvalidArgument when it refuses (a bad name, no --checkpoint-dir).
SLUICE_EXPORT void copy_checkpoint_files(const CheckpointReplica& replica, const std::string& name,
                                         const std::filesystem::path& dir,
                                         std::span<const std::string> files);

/// Makes the copied `files` the replica's checkpoint `name` in one step (replacing an older
/// copy of it); every file must have been copied. Errors as copy_checkpoint_files.
SLUICE_EXPORT void publish_checkpoint_copy(const CheckpointReplica& replica,
                                           const std::string& name,
                                           std::span<const std::string> files);

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
