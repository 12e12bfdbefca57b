#pragma once

// The parts of a Dataset that sluice's own layers use and users do not (private members of
// <sluice/dataset.h>, reached only from here): its descriptors, a sample's shard, a record
// split into reused storage, and a files tree's per-sample files.

#include <sluice/dataset.h>

#include "common/result.h"

#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace sluice {

namespace detail {
struct DatasetInternals {
  static int shard_fd(const Dataset& d, uint32_t shard) { return d.shard_fd(shard); }
  static uint32_t shard_of(const Dataset& d, uint64_t index) { return d.shard_of(index); }
  static std::string split_record(const Dataset& d, uint64_t index,
                                  std::span<const std::byte> record,
                                  std::vector<std::span<const std::byte>>& fields) {
    return d.split_record(index, record, fields);
  }
  static std::string_view sample_file(const Dataset& d, uint64_t index) {
    return d.sample_file(index);
  }
  static int open_sample(const Dataset& d, uint64_t index, bool direct) {
    return d.open_sample(index, direct);
  }
};
}  // namespace detail

namespace index {

/// File descriptor of shard `shard`, opened read-only and owned by the Dataset (-1: absent).
inline int shard_fd(const Dataset& d, uint32_t shard) {
  return detail::DatasetInternals::shard_fd(d, shard);
}
/// The shard that holds sample `index` (no I/O, also for shards not on this node).
inline uint32_t shard_of(const Dataset& d, uint64_t index) {
  return detail::DatasetInternals::shard_of(d, index);
}
/// Splits a record into its fields in reused storage; ok, or why it does not split.
inline Status split_record(const Dataset& d, uint64_t index, std::span<const std::byte> record,
                           std::vector<std::span<const std::byte>>& fields) {
  std::string why = detail::DatasetInternals::split_record(d, index, record, fields);
  if (!why.empty()) return failure(std::move(why));
  return {};
}
/// A files tree's sample `index`: its file relative to the root; empty for other formats.
inline std::string_view sample_file(const Dataset& d, uint64_t index) {
  return detail::DatasetInternals::sample_file(d, index);
}
/// A files tree's sample `index`, opened (O_DIRECT when `direct`) beneath the root; the caller
/// owns the descriptor. Throws naming the file and the sample.
inline int open_sample(const Dataset& d, uint64_t index, bool direct) {
  return detail::DatasetInternals::open_sample(d, index, direct);
}

}  // namespace index
}  // namespace sluice
