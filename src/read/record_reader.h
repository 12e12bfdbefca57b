#pragma once

// Sample indices -> aligned reads -> checked record spans: the one read planner the loader and
// the shard server share. A ReadPlan lays the block-aligned cover of each sample's record into
// one destination buffer (neighbouring covers in a shard coalesced into one read of at most
// kMaxRead), opens a files tree's per-sample files, and after the reads says where each record
// is, checks it, or words the failure of a read the same way for every caller.

#include <sluice/dataset.h>

#include "common/file.h"
#include "io/engine.h"

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace sluice::read {

inline constexpr uint64_t kMaxRead = 4 << 20;  // the longest coalesced read

class ReadPlan {
 public:
  /// `direct`: reads go through O_DIRECT descriptors, so covers are aligned to the dataset's
  /// block (and a files tree's samples open with O_DIRECT); otherwise they are exact.
  ReadPlan(const Dataset& dataset, bool direct);

  /// Forgets every planned read and closes the files it opened.
  void clear();
  /// Plans the read of sample `index`, whose record is `x`, at the next free block-aligned place
  /// of the destination, or inside the previous read when `merge` and x's cover continues or
  /// overlaps it in the same shard (up to kMaxRead). Returns where the record lands.
  uint64_t add(uint64_t index, const SampleExtent& x, bool merge);
  /// Plans the read of sample `index` straight to `dest` (a batch slot, block-aligned, with no
  /// cover around it: the caller checked that x is aligned), merged with the previous read
  /// when both the file range and the memory continue it.
  void add_to(uint64_t index, const SampleExtent& x, std::byte* dest);
  /// Leaves `bytes` of the destination to the caller after what is planned (a reply's table);
  /// returns where they start. Reads planned after it go past them.
  uint64_t reserve(uint64_t bytes, uint64_t alignment);
  /// Bytes of destination the plan needs.
  uint64_t bytes() const { return end_; }
  /// Points every read of add() at `base` (at least bytes() long).
  void bind(std::byte* base);
  /// Closes a files tree's per-sample files once their reads are done (the plan stays valid for
  /// fail()), so that no descriptor is held per file between batches.
  void close_files() { files_open_.clear(); }

  std::vector<io::ReadOp>& ops() { return ops_; }
  bool empty() const { return ops_.empty(); }

  /// The error for read failure `f` of these ops, in the one wording every reader uses:
  /// "read PATH [OFFSET+LENGTH] (sample I, J): CAUSE", PATH being a files tree's own file;
  /// kCorruption for an early end of file, kIo naming `timeout_ms` for a deadline.
  [[noreturn]] void fail(const io::ReadFailure& f, uint32_t timeout_ms) const;

 private:
  const Dataset& dataset_;
  const bool direct_;
  const bool files_;  // a files tree: each sample read from its own file
  const uint64_t align_;
  std::vector<io::ReadOp> ops_;
  std::vector<uint64_t> op_at_;         // where each add() read goes in the destination
  std::vector<uint64_t> sample_index_;  // the samples planned, in order
  std::vector<size_t> sample_op_;       // and the read each is part of
  std::vector<detail::UniqueFd> files_open_;
  uint64_t end_ = 0;
};

/// Checks `record` of sample `index` against its stored checksum (packed datasets; a source
/// read in place has none); throws kCorruption naming the shard file and the sample.
void check_record(const Dataset& dataset, uint64_t index, const SampleExtent& x,
                  std::span<const std::byte> record);

}  // namespace sluice::read
