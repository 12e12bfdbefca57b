#include "read/direct.h"

#include "common/errors.h"
#include "index/internals.h"

#include <fcntl.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string_view>

namespace sluice {

namespace {

// Bytes of /proc/meminfo's `key` (kB there), or 0 without the file or the line. Line by line:
// one line the parser does not expect must not hide the others.
uint64_t meminfo(std::string_view key) {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.size() <= key.size() || line.compare(0, key.size(), key) != 0 ||
        line[key.size()] != ':')
      continue;
    const char* p = line.data() + key.size() + 1;
    const char* end = line.data() + line.size();
    while (p < end && (*p == ' ' || *p == '\t')) ++p;
    uint64_t kb = 0;
    std::from_chars(p, end, kb);
    return kb << 10;
  }
  return 0;
}

uint64_t read_number(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::string s;
  if (!(in >> s) || s == "max") return UINT64_MAX;
  uint64_t v = UINT64_MAX;
  std::from_chars(s.data(), s.data() + s.size(), v);
  return v;
}

uint64_t stat_value(const std::filesystem::path& p, std::string_view key) {
  std::ifstream in(p);
  std::string name;
  uint64_t v = 0;
  while (in >> name >> v)
    if (name == key) return v;
  return 0;
}

// What this process's memory cgroup lets it hold besides the memory its processes use
// themselves (their page cache is what a dataset would live in); UINT64_MAX without a limit.
uint64_t cgroup_room(std::string* where) {
  std::ifstream in("/proc/self/cgroup");
  std::string line;
  while (std::getline(in, line)) {
    // v1: "4:memory:/path"; v2: "0::/path".
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    namespace fs = std::filesystem;
    if (controllers == "memory") {
      fs::path dir = fs::path("/sys/fs/cgroup/memory") / fs::path(path).relative_path();
      const uint64_t limit = stat_value(dir / "memory.stat", "hierarchical_memory_limit");
      if (limit == 0 || limit >= (uint64_t{1} << 60)) return UINT64_MAX;
      const uint64_t usage = read_number(dir / "memory.usage_in_bytes");
      const uint64_t file = stat_value(dir / "memory.stat", "total_active_file") +
                            stat_value(dir / "memory.stat", "total_inactive_file");
      const uint64_t own = usage > file ? usage - file : 0;
      *where = "memory cgroup " + path;
      return limit > own ? limit - own : 0;
    }
    if (controllers.empty() && a == 1 && line[0] == '0') {  // the v2 hierarchy
      uint64_t limit = UINT64_MAX;
      fs::path base("/sys/fs/cgroup");
      for (fs::path p = base / fs::path(path).relative_path();
           p.string().size() > base.string().size(); p = p.parent_path())
        limit = std::min(limit, read_number(p / "memory.max"));
      if (limit == UINT64_MAX) continue;
      fs::path dir = base / fs::path(path).relative_path();
      const uint64_t usage = read_number(dir / "memory.current");
      const uint64_t file = stat_value(dir / "memory.stat", "file");
      const uint64_t own = usage != UINT64_MAX && usage > file ? usage - file : 0;
      *where = "memory cgroup " + path;
      return limit > own ? limit - own : 0;
    }
  }
  return UINT64_MAX;
}

}  // namespace

MemoryRoom memory_room() {
  MemoryRoom r;
  r.bytes = meminfo("MemAvailable");
  r.where = "MemAvailable";
  if (struct sysinfo si; r.bytes == 0 && ::sysinfo(&si) == 0) {
    // No MemAvailable to read (a sandbox's /proc): free memory and buffers, which leaves out
    // the reclaimable page cache, so it errs towards direct I/O.
    r.bytes = (static_cast<uint64_t>(si.freeram) + si.bufferram) * si.mem_unit;
    r.where = "sysinfo: free memory, no MemAvailable in /proc/meminfo";
  }
  std::string where;
  if (uint64_t c = cgroup_room(&where); c < r.bytes) {
    r.bytes = c;
    r.where = where;
  }
  return r;
}

DirectFiles open_direct(const Dataset& dataset, DirectIo mode, const std::string& setting,
                        const MemoryRoom& room) {
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
