#pragma once

// The checkpoint file layer under save_checkpoint / load_checkpoint
// (include/sluice/checkpoint.h): files written and read through the IO engine, staging
// directories and their publication, and copies to a replica. sluice._C binds it for
// python/sluice/checkpoint.py (torch.distributed.checkpoint's StorageWriter and StorageReader);
// it is not part of the public C++ API.

#include <sluice/checkpoint.h>

#include "io/priority.h"

#include <filesystem>
#include <span>
#include <string>
#include <vector>

namespace sluice {

/// The name a checkpoint directory's copy has on a peer unless CheckpointReplica::name says
/// otherwise: its name (outside [A-Za-z0-9._-] as '_') and 16 hex digits of XXH3 of its
/// absolute path ("step-100-3f2a..."), so that two jobs' "step-100" never share a copy while a
/// replaced node, mounting the same path, finds its own.
std::string checkpoint_copy_name(const std::filesystem::path& dir);

/// Writes `parts` one after another into a new file `path` (an existing one is truncated), a
/// checksum per part, and fsyncs it when options.durable. The file's space is reserved first,
/// so a full disk fails before any write: kIo with ENOSPC naming the path and the bytes needed.
/// Blocks until done; calls for different paths may run in parallel. The writes give way to a
/// Loader's reads on the same device (`traffic`; null: the file's device's, found by
/// io::DeviceTraffic::for_fd).
CheckpointWriteResult write_checkpoint_file(const std::filesystem::path& path,
                                            std::span<const CheckpointPart> parts,
                                            const CheckpointOptions& options = {},
                                            io::DeviceTraffic* traffic = nullptr);

/// One part to read back: `extent` of the file into `dest` (of extent.length bytes).
struct CheckpointReadPart {
  std::string name;  // what errors call it
  PartExtent extent;
  std::span<std::byte> dest;
};

/// Reads each part into its dest and checks its checksum: kCorruption naming the file, the part
/// and its range for a mismatch or a file that ends inside the part; kNotFound / kIo as the
/// system says.
void read_checkpoint_file(const std::filesystem::path& path,
                          std::span<const CheckpointReadPart> parts,
                          const CheckpointOptions& options = {});

/// Makes the complete, durable directory `staging` visible as `dir` in one step: renamed into
/// place, or exchanged with an existing `dir` (renameat2 RENAME_EXCHANGE), which is then
/// removed. The parent directory is fsynced when `durable`.
void publish_checkpoint_dir(const std::filesystem::path& staging, const std::filesystem::path& dir,
                            bool durable = true);

/// Copies the files `files` of the local checkpoint directory `dir` to the replica as
/// checkpoint `name` (8 MiB chunks, 4 in flight, each with its XXH3 checksum). A copied file is
/// durable on the peer but not visible until publish_checkpoint_copy names it. Throws
/// Error naming the peer, the checkpoint and the file: kConfig without a token, kIo when the
/// peer is down or fails, kInvalidArgument when it refuses (a bad name, no --checkpoint-dir).
void copy_checkpoint_files(const CheckpointReplica& replica, const std::string& name,
                           const std::filesystem::path& dir, std::span<const std::string> files);

/// Makes the copied `files` the replica's checkpoint `name` in one step (replacing an older
/// copy of it); every file must have been copied. Errors as copy_checkpoint_files.
void publish_checkpoint_copy(const CheckpointReplica& replica, const std::string& name,
                             std::span<const std::string> files);

}  // namespace sluice
