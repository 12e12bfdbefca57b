#include "read/record_reader.h"

#include "common/errors.h"
#include "format/layout.h"
#include "index/internals.h"

#include <algorithm>
#include <cerrno>
#include <limits>

namespace sluice::read {

using detail::fail;

namespace {
constexpr uint64_t kNotBound = std::numeric_limits<uint64_t>::max();  // add_to: dest given
}  // namespace

ReadPlan::ReadPlan(const Dataset& dataset, bool direct)
    : dataset_(dataset),
      direct_(direct),
      files_(dataset.format() == DatasetFormat::kFiles),
      align_(direct ? dataset.alignment() : 1) {}

void ReadPlan::clear() {
  ops_.clear();
  op_at_.clear();
  sample_index_.clear();
  sample_op_.clear();
  files_open_.clear();
  end_ = 0;
}

uint64_t ReadPlan::add(uint64_t index, const SampleExtent& x, bool merge) {
  const uint64_t start = x.offset / align_ * align_;
  const uint64_t end = format::align_up(x.offset + x.size, align_);
  sample_index_.push_back(index);
  if (files_) {  // one file per sample: its own descriptor, nothing to merge
    files_open_.emplace_back(index::open_sample(dataset_, index, direct_));
    merge = false;
  } else if (merge && !ops_.empty() && op_at_.back() != kNotBound) {
    io::ReadOp& last = ops_.back();
    const uint64_t last_end = last.offset + last.length;
    if (last.file == x.shard && start >= last.offset && start <= last_end &&
        end - last.offset <= kMaxRead) {
      if (end > last_end) {
        end_ += end - last_end;
        last.length = static_cast<uint32_t>(end - last.offset);
      }
      last.required =
          std::max(last.required, static_cast<uint32_t>(x.offset + x.size - last.offset));
      sample_op_.push_back(ops_.size() - 1);
      return op_at_.back() + (x.offset - last.offset);
    }
  }
  // The cover may run past the end of a file that is not block-aligned (npy, tokens, a files
  // tree's file); only the sample's own bytes are required.
  const uint64_t at = format::align_up(end_, align_);
  ops_.push_back({x.shard, start, static_cast<uint32_t>(end - start), nullptr,
                  static_cast<uint32_t>(x.offset + x.size - start),
                  files_ ? files_open_.back().get() : -1});
  op_at_.push_back(at);
  sample_op_.push_back(ops_.size() - 1);
  end_ = at + (end - start);
  return at + (x.offset - start);
}

void ReadPlan::add_to(uint64_t index, const SampleExtent& x, std::byte* dest) {
  sample_index_.push_back(index);
  if (!ops_.empty() && op_at_.back() == kNotBound) {
    io::ReadOp& last = ops_.back();
    if (last.file == x.shard && last.offset + last.length == x.offset &&
        last.dest + last.length == dest && last.length + x.size <= kMaxRead) {
      last.length += x.size;
      sample_op_.push_back(ops_.size() - 1);
      return;
    }
  }
  ops_.push_back({x.shard, x.offset, x.size, dest});
  op_at_.push_back(kNotBound);
  sample_op_.push_back(ops_.size() - 1);
}

uint64_t ReadPlan::reserve(uint64_t bytes, uint64_t alignment) {
  const uint64_t at = format::align_up(end_, alignment);
  end_ = at + bytes;
  return at;
}

void ReadPlan::bind(std::byte* base) {
  for (size_t k = 0; k < ops_.size(); ++k)
    if (op_at_[k] != kNotBound) ops_[k].dest = base + op_at_[k];
}

void ReadPlan::fail(const io::ReadFailure& f, uint32_t timeout_ms) const {
  if (f.op >= ops_.size())  // a failure of the engine itself, not of one read
    throw Error(
        ErrorCode::kIo,
        fmt::format("{}: io engine: {}", dataset_.path().string(), detail::errno_text(-f.error)),
        -f.error);
  const io::ReadOp& op = ops_[f.op];
  std::string path = dataset_.shards()[op.file].path.string();
  std::string samples;
  for (size_t i = 0, shown = 0; i < sample_index_.size() && shown < 4; ++i)
    if (sample_op_[i] == f.op) {
      if (files_)
        path = (dataset_.path() / index::sample_file(dataset_, sample_index_[i])).string();
      samples += fmt::format("{}{}", shown++ ? ", " : "", sample_index_[i]);
    }
  const std::string where =
      fmt::format("read {} [{}+{}] (sample {})", path, op.offset, op.length, samples);
  if (f.error == -ENODATA)
    detail::fail(ErrorCode::kCorruption, "{}: unexpected end of file (truncated?)", where);
  if (f.error == -ETIMEDOUT)
    detail::fail(ErrorCode::kIo, "{}: timed out after {} ms", where, timeout_ms);
  throw Error(ErrorCode::kIo, fmt::format("{}: {}", where, detail::errno_text(-f.error)), -f.error);
}

void check_record(const Dataset& dataset, uint64_t index, const SampleExtent& x,
                  std::span<const std::byte> record) {
  if (!dataset.packed()) return;  // read in place: no checksums to check
  if (auto checked = format::check_record(record, index, x.checksum); !checked)
    fail(ErrorCode::kCorruption, "{}: {}", dataset.shards()[x.shard].path.string(),
         checked.error());
}

}  // namespace sluice::read
