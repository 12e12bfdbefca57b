#include "common/host.h"

#include "common/errors.h"

#include <sched.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string_view>

namespace sluice::detail {

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

// CPUs the cgroup's quota allows (cpu.max in v2, cfs_quota_us / cfs_period_us in v1), rounded
// up; nullopt when there is no quota or it cannot be read.
std::optional<uint32_t> cgroup_cpus() {
  auto ratio = [](double quota, double period) -> std::optional<uint32_t> {
    if (quota <= 0 || period <= 0) return std::nullopt;
    return static_cast<uint32_t>(std::ceil(quota / period));
  };
  std::ifstream v2("/sys/fs/cgroup/cpu.max");
  std::string quota;
  double period = 0;
  if (v2 >> quota >> period) return quota == "max" ? std::nullopt : ratio(std::stod(quota), period);
  std::ifstream q("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), p("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
  double v1_quota = 0;
  if (q >> v1_quota && p >> period) return ratio(v1_quota, period);
  return std::nullopt;
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

CpuRoom cpu_room() {
  CpuRoom r;
  cpu_set_t set;
  r.cores = ::sched_getaffinity(0, sizeof set, &set) == 0
                ? static_cast<uint32_t>(CPU_COUNT(&set))
                : static_cast<uint32_t>(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN)));
  r.how = fmt::format("{} cores in this process's CPU affinity", r.cores);
  if (auto quota = cgroup_cpus(); quota && *quota < r.cores) {
    r.cores = *quota;
    r.how = fmt::format("a cgroup CPU quota of {} cores", r.cores);
  }
  return r;
}

std::optional<uint32_t> env_uint(const char* name, uint64_t min) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  uint64_t value = 0;
  std::string_view s(v);
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end != s.data() + s.size() || value < min || value > UINT32_MAX)
    fail(ErrorCode::kConfig, "environment variable {}=\"{}\": expected an integer >= {}", name, s,
         min);
  return static_cast<uint32_t>(value);
}

}  // namespace sluice::detail
