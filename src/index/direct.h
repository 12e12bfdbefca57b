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
  std::string why_not;  // when off under `auto`: the probe's error
};

/// Opens `dataset`'s shards with O_DIRECT and probes one aligned read (for a files tree: of its
/// first file). kOff: off. kAuto: off with the reason when the probe fails. kOn: throws
/// Error(kUnsupported) "SETTING: true, but ..." when it fails.
DirectFiles open_direct(const Dataset& dataset, DirectIo mode, const std::string& setting);

}  // namespace sluice
