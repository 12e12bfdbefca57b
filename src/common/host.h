#pragma once

// What the host lends this process, each read in one place: the memory it may fill, the CPUs
// it may run on, and the integer environment variables a launcher sets (torchrun's RANK ...).

#include <cstdint>
#include <optional>
#include <string>

namespace sluice::detail {

/// The memory this process may fill with page cache: /proc/meminfo's MemAvailable, or less
/// when its memory cgroup (v1 or v2) allows less beside what the cgroup's processes hold.
/// Without MemAvailable (a sandbox's /proc): sysinfo's free memory and buffers.
struct MemoryRoom {
  uint64_t bytes = 0;
  std::string where;  // "MemAvailable", "memory cgroup /PATH" or "sysinfo: ..."
};
MemoryRoom memory_room();

/// The CPUs this process may keep busy: those in its CPU affinity (the online count when the
/// affinity cannot be read), fewer when its cgroup's CPU quota (v2 cpu.max, v1 cfs quota over
/// period, rounded up) allows fewer. At least 1.
struct CpuRoom {
  uint32_t cores = 1;
  std::string how;  // "N cores in this process's CPU affinity", "a cgroup CPU quota of N cores"
};
CpuRoom cpu_room();

/// The environment variable `name` as an integer: nullopt when unset or empty. Throws
/// Error(kConfig) `environment variable NAME="VALUE": expected an integer >= MIN` when it is
/// not a whole decimal number in [min, UINT32_MAX].
std::optional<uint32_t> env_uint(const char* name, uint64_t min);

}  // namespace sluice::detail
