#include "read/direct.h"

#include "common/errors.h"
#include "index/internals.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <memory>

namespace sluice {

DirectFiles open_direct(const Dataset& dataset, DirectIo mode, const std::string& setting,
                        const detail::MemoryRoom& room) {
  DirectFiles out;
  const auto& shards = dataset.shards();
  if (mode == DirectIo::kOff || shards.empty()) return out;
  if (mode == DirectIo::kAuto) {
    uint64_t local = 0;
    if (dataset.format() == DatasetFormat::kFiles) {
      local = dataset.total_bytes();
    } else {
      for (const auto& s : shards)
        if (s.local) local += s.file_bytes;
    }
    auto gb = [](uint64_t b) { return static_cast<double>(b) / 1e9; };
    if (local <= room.bytes) {
      out.warm =
          dataset.format() != DatasetFormat::kFiles;  // shard files (a files tree is not warmed)
      out.why = fmt::format(
          "the local data ({:.2f} GB) fits in the memory this process may use ({:.2f} GB, {}): "
          "it stays in the page cache",
          gb(local), gb(room.bytes), room.where);
      return out;
    }
    out.why = fmt::format(
        "the local data ({:.2f} GB) is larger than the memory this process "
        "may use ({:.2f} GB, {})",
        gb(local), gb(room.bytes), room.where);
  }
  try {
    const size_t align = dataset.alignment();
    std::unique_ptr<void, decltype(&std::free)> probe(std::aligned_alloc(align, align), &std::free);
    if (!probe) detail::fail_errno(ENOMEM, "O_DIRECT probe buffer");
    auto probe_read = [&](int fd, const std::string& name) {
      if (::pread(fd, probe.get(), align, 0) < 0)
        detail::fail_errno(errno, "O_DIRECT read of " + name);
    };
    if (dataset.format() == DatasetFormat::kFiles) {
      detail::UniqueFd first(index::open_sample(dataset, 0, true));
      probe_read(first.get(), std::string(index::sample_file(dataset, 0)));
    } else {
      detail::reserve_descriptors(
          shards.size(), fmt::format("{} with O_DIRECT ({} shards, a second descriptor each)",
                                     dataset.path().string(), shards.size()));
      for (const auto& s : shards)
        out.fds.push_back(s.local ? detail::open_file(s.path, O_RDONLY | O_DIRECT)
                                  : detail::UniqueFd{});
      for (size_t i = 0; i < shards.size(); ++i)
        if (shards[i].local) {
          probe_read(out.fds[i].get(), shards[i].path.string());
          break;
        }
    }
    out.on = true;
  } catch (const Error& e) {
    out.fds.clear();
    out.why = e.what();
    if (mode == DirectIo::kOn)
      detail::fail(ErrorCode::kUnsupported, "{}: true, but {}", setting, e.what());
  }
  return out;
}

void warm_page_cache(const Dataset& dataset, const std::atomic<bool>& stop) {
  const auto& shards = dataset.shards();
  for (uint32_t i = 0; i < shards.size() && !stop.load(std::memory_order_relaxed); ++i) {
    if (!shards[i].local || shards[i].file_bytes == 0) continue;
    const int fd = index::shard_fd(dataset, i);
    // The kernel reads at most one readahead window per call (force_page_cache_ra clamps the
    // length to max(read_ahead_kb, max_sectors_kb)), so ask 128 KiB at a time: the common
    // minimum of both. Each call only submits; the block queue's depth paces the loop, and
    // pages already resident (another rank on this node, an earlier run) cost a lookup.
    constexpr off_t kSlice = 128 << 10;
    for (off_t at = 0;
         at < static_cast<off_t>(shards[i].file_bytes) && !stop.load(std::memory_order_relaxed);
         at += kSlice)
      ::posix_fadvise(fd, at, kSlice, POSIX_FADV_WILLNEED);
  }
}

}  // namespace sluice
