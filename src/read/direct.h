#pragma once

// O_DIRECT descriptors for a dataset, chosen once: the loader and the shard server both read
// through them when the file system takes O_DIRECT and an aligned read of the data works.

#include <sluice/dataset.h>
#include <sluice/options.h>

#include "common/file.h"
#include "common/host.h"

#include <atomic>
#include <string>
#include <vector>

namespace sluice {

struct DirectFiles {
  bool on = false;
  // Per shard: an O_DIRECT descriptor of each local shard (absent shards: none). Empty for a
  // `files` tree, whose readers open each sample with index::open_sample(dataset, index, true).
  std::vector<detail::UniqueFd> fds;
  std::string why;  // under `auto`: why it chose what it chose (the probe's error when off)
  // `auto` chose the page cache because the data fits: warm it (warm_page_cache) so that an
  // epoch starting cold soon reads from memory instead of paying a random read per sample.
  bool warm = false;
};

/// Opens `dataset`'s shards with O_DIRECT and probes one aligned read (for a files tree: of its
/// first file). kOff: off. kOn: on; throws Error(kUnsupported) "SETTING: true, but ..." when
/// the probe fails. kAuto: what is fast: through the page cache when the local data fits in
/// `room` (it stays cached, and readahead brings neighbours an epoch soon needs), O_DIRECT when
/// it does not (the cache would thrash) and the probe works.
DirectFiles open_direct(const Dataset& dataset, DirectIo mode, const std::string& setting,
                        const detail::MemoryRoom& room);

/// Asks the kernel to read `dataset`'s local shards into the page cache (POSIX_FADV_WILLNEED:
/// large sequential reads, in the background of the caller's own random ones), shard by shard
/// until done or `stop` is set. Pages already resident cost a lookup each.
void warm_page_cache(const Dataset& dataset, const std::atomic<bool>& stop);

}  // namespace sluice
