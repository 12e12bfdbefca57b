#pragma once

// The parts of a Dataset that sluice's own layers use and users do not (its Impl, private in
// <sluice/dataset.h> and reached only from here): its descriptors, a sample's shard, a record
// split into reused storage, and a files tree's per-sample files.

#include <sluice/dataset.h>

#include "common/result.h"

#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sluice {

namespace detail {
struct DatasetInternals {
  using Impl = Dataset::Impl;  // defined in src/index/dataset_impl.h
  static const Dataset::Impl& impl(const Dataset& d) { return *d.impl_; }
  static std::shared_ptr<Dataset> make(std::unique_ptr<Impl> impl);  // dataset.cc
};
}  // namespace detail

namespace index {

/// File descriptor of shard `shard`, opened read-only and owned by the Dataset (-1: absent).
int shard_fd(const Dataset& d, uint32_t shard);
/// The shard that holds sample `index` (no I/O, also for shards not on this node).
uint32_t shard_of(const Dataset& d, uint64_t index);
/// Splits a record into its fields in reused storage; ok, or why it does not split.
Status split_record(const Dataset& d, uint64_t index, std::span<const std::byte> record,
                    std::vector<std::span<const std::byte>>& fields);
/// A files tree's sample `index`: its file relative to the root; empty for other formats.
std::string_view sample_file(const Dataset& d, uint64_t index);
/// A files tree's sample `index`, opened (O_DIRECT when `direct`) beneath the root; the caller
/// owns the descriptor. Throws naming the file and the sample.
int open_sample(const Dataset& d, uint64_t index, bool direct);

}  // namespace index
}  // namespace sluice
