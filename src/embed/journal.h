#pragma once

// The table's journal: each update() appends one record (its ids and rows, checksummed) with
// one write; flush() fsyncs it before the rows are written in place, so a crash at any point
// leaves either a complete record to replay or a torn tail that the checksum drops.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>

#include "common/file.h"

namespace sluice::embed {

class Journal {
 public:
  explicit Journal(const std::filesystem::path& file);
  void append(std::span<const int64_t> ids, std::span<const std::byte> rows);
  void sync();
  /// Empties it (the updates it held are in place and durable).
  void clear();
  uint64_t bytes() const { return bytes_; }

  /// Calls `apply(ids, rows)` for each complete record of `file` in order, stopping at the
  /// first torn or damaged one (a crash's tail). Returns the records applied.
  static uint64_t replay(
      const std::filesystem::path& file, size_t row_bytes,
      const std::function<void(std::span<const int64_t>, std::span<const std::byte>)>& apply);

 private:
  std::filesystem::path path_;
  detail::UniqueFd fd_;
  uint64_t bytes_ = 0;
  uint64_t seq_ = 0;
};

}  // namespace sluice::embed
