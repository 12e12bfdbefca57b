#pragma once

// A local stand-in for a dataset that is not on this node. The mirror is a directory holding
// one sparse file per source object, of the object's size, so that everything downstream
// (Dataset, the read planner, io_uring, O_DIRECT, checksums) reads it as a local dataset. At
// open the dataset's metadata is filled in from the source (a packed manifest, each shard's
// header and index; the head of an .npy; every header of a WebDataset tar, found by walking it);
// the SampleCache fills in samples as they are needed and punches them out again when it evicts
// them.

#include <sluice/options.h>

#include "common/file.h"
#include "source/source.h"

#include <filesystem>
#include <string>

namespace sluice::cache {

struct Mirror {
  std::filesystem::path dir;   // open the Dataset here (its path mirrors the source's root)
  std::filesystem::path path;  // dataset.path inside dir (dir itself, or the one object's file)
  detail::UniqueFd lock;       // the slot's flock: one process per slot
  bool temporary = false;      // memory only: removed when the cache closes
  bool reused = false;         // found from an earlier run, with the same metadata
  uint64_t room = 0;           // free bytes on the mirror's file system when it was opened
};

/// Opens (or makes) the mirror of `source` for a dataset: under `options.dir` in the first free
/// slot directory (several processes on a node share one cache dir, each in its own slot,
/// which a restarted process finds again), or in a fresh directory in memory (/dev/shm) when
/// no dir is given. Fetches the metadata and compares it with what the slot held: an object
/// whose metadata changed loses what was cached of it. Throws naming the object.
Mirror open_mirror(source::Source& source, const CacheOptions& options);

/// Removes a temporary mirror's directory (best effort).
void remove_mirror(const Mirror& mirror);

}  // namespace sluice::cache
