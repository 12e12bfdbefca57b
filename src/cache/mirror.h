#pragma once

// A local stand-in for a dataset that is not on this node. The mirror is a directory holding
// one sparse file per source object, of the object's size, so that everything downstream
// (Dataset, the read planner, io_uring, O_DIRECT, checksums) reads it as a local dataset. At
// open the dataset's metadata is filled in from the source (a packed manifest, each shard's
// header and index; the head of an .npy; every header of a WebDataset tar, found by walking it);
// the SampleCache fills in samples as they are needed and punches them out again when it evicts
// them.

#include <sluice/dataset.h>
#include <sluice/options.h>

#include "common/file.h"
#include "source/source.h"

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

namespace sluice::cache {

struct Mirror {
  std::filesystem::path dir;   // open the Dataset here (its path mirrors the source's root)
  std::filesystem::path path;  // dataset.path inside dir (dir itself, or the one object's file)
  detail::UniqueFd lock;       // held (shared) while this process uses the cache
  detail::UniqueFd open_lock;  // held (exclusive) from the metadata's check until the
                               // SampleCache has mapped the shared state; then released
  bool temporary = false;      // memory only: removed when the cache closes
  bool first_user = true;      // no other process had the cache open
  uint64_t identity = 0;       // a hash of the objects' keys, sizes and versions
  uint64_t room = 0;           // free bytes on the mirror's file system when it was opened
  std::vector<std::filesystem::path> files;  // each source object's file, in source order
};

/// Opens (or makes) the mirror of `source` for a dataset: under `options.dir`, shared by every
/// process of the node that reads the same source (cache/shared_state.h says what they share),
/// or in a fresh directory in memory (/dev/shm) of this process alone when no dir is given.
/// Fetches the metadata and compares it with what the mirror held: the first process to open
/// it drops what was cached of objects that changed; a later one, while others use the cache,
/// refuses them. Throws naming the object.
Mirror open_mirror(source::Source& source, const CacheOptions& options);

/// Removes a temporary mirror's directory (best effort).
void remove_mirror(const Mirror& mirror);

/// Copies every byte of every object into the mirror, `chunk` bytes per ranged read (what
/// `sluice verify` of a remote dataset checks). Throws naming the object.
void fill_mirror(source::Source& source, const Mirror& mirror, uint64_t chunk = 8 << 20);

/// A dataset not on this node (an s3:// path, or any path with cache.dir) opened on its
/// mirror, as the Loader and the command line open it. Errors name the source, not the mirror.
struct RemoteDataset {
  std::unique_ptr<source::Source> source;
  Mirror mirror;
  std::shared_ptr<Dataset> dataset;
};
RemoteDataset open_remote_dataset(const LoaderOptions& options,
                                  const DatasetOpenOptions& open = {});

/// `text` with the mirror's paths written as the source's URL.
std::string name_source(std::string text, const Mirror& mirror, const std::string& url);

}  // namespace sluice::cache
