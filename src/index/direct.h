#pragma once

// O_DIRECT descriptors for a dataset, chosen once: the loader and the shard server both read
// through them when the file system takes O_DIRECT and an aligned read of the data works.

#include <sluice/dataset.h>
#include <sluice/options.h>

#include "common/file.h"

#include <string>
#include <vector>

namespace sluice {

struct DirectFiles {
  bool on = false;
  // Per shard: an O_DIRECT descriptor of each local shard (absent shards: none). Empty for a
  // `files` tree, whose readers open each sample with Dataset::open_sample(index, true).
  std::vector<detail::UniqueFd> fds;
  std::string why;  // under `auto`: why it chose what it chose (the probe's error when off)
};

/// The memory this process may fill with page cache: /proc/meminfo's MemAvailable, or less
/// when its memory cgroup (v1 or v2) allows less beside what the cgroup's processes hold.
struct MemoryRoom {
  uint64_t bytes = 0;
  std::string where;  // "MemAvailable" or "memory cgroup /PATH"
};
MemoryRoom memory_room();

/// Opens `dataset`'s shards with O_DIRECT and probes one aligned read (for a files tree: of its
/// first file). kOff: off. kOn: on; throws Error(kUnsupported) "SETTING: true, but ..." when
/// the probe fails. kAuto: what is fast: through the page cache when the local data fits in
/// `room` (it stays cached, and readahead brings neighbours an epoch soon needs), O_DIRECT when
/// it does not (the cache would thrash) and the probe works.
DirectFiles open_direct(const Dataset& dataset, DirectIo mode, const std::string& setting,
                        const MemoryRoom& room);

}  // namespace sluice
