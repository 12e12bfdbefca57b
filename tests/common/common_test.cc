// src/common: descriptors and whole reads and writes, directory replacement, the open-file
// limit, errno wording, Result, the rate-limited log, the host's memory, CPUs and environment.

#include "common/cpu_time.h"
#include "common/errors.h"
#include "common/file.h"
#include "common/host.h"
#include "common/log.h"
#include "common/result.h"
#include "test_util.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>

namespace sluice::detail {
namespace {

namespace fs = std::filesystem;

std::span<const std::byte> bytes(const std::string& s) { return std::as_bytes(std::span(s)); }

std::string read_text(const fs::path& p) {
  std::ifstream in(p);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(UniqueFdTest, ClosesOnResetAndDestructionAndMovesOwnership) {
  int raw = ::open("/dev/null", O_RDONLY);
  ASSERT_GE(raw, 0);
  {
    UniqueFd a(raw);
    UniqueFd b(std::move(a));
    EXPECT_FALSE(a);
    EXPECT_EQ(b.get(), raw);
    UniqueFd c;
    c = std::move(b);
    EXPECT_EQ(c.get(), raw);
    EXPECT_GE(::fcntl(raw, F_GETFD), 0) << "closed by a move";
  }
  EXPECT_EQ(::fcntl(raw, F_GETFD), -1) << "not closed when its owner went";
  int other = ::open("/dev/null", O_RDONLY);
  UniqueFd d(other);
  EXPECT_EQ(d.release(), other);
  EXPECT_FALSE(d);
  EXPECT_GE(::fcntl(other, F_GETFD), 0) << "release() closed it";
  ::close(other);
}

TEST(FileTest, OpenFailsNamingThePathAndIsCloseOnExec) {
  testing::TempDir tmp;
  try {
    open_file(tmp.path() / "missing", O_RDONLY);
    FAIL() << "opened a missing file";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
    EXPECT_EQ(e.sys_errno(), ENOENT);
    EXPECT_NE(std::string(e.what()).find((tmp.path() / "missing").string()), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("ENOENT"), std::string::npos) << e.what();
  }
  UniqueFd fd = open_file(tmp.path() / "made", O_RDWR | O_CREAT);
  EXPECT_EQ(::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
}

TEST(FileTest, WholeWritesAndReadsShortOnlyAtTheEnd) {
  testing::TempDir tmp;
  UniqueFd fd = open_file(tmp.path() / "f", O_RDWR | O_CREAT);
  write_full(fd.get(), bytes("hello "), "f");
  write_full(fd.get(), bytes("world"), "f");  // appends at the position
  write_full(fd.get(), bytes("W"), "f", 6);   // at an offset
  EXPECT_EQ(read_text(tmp.path() / "f"), "hello World");
  EXPECT_EQ(file_size(fd.get(), "f"), 11u);
  std::vector<std::byte> buf(8);
  EXPECT_EQ(pread_full(fd.get(), buf, 6, "f"), 5u) << "past the end: what is there";
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(buf.data()), 5), "World");
  EXPECT_EQ(pread_full(fd.get(), std::span(buf).first(4), 0, "f"), 4u);
  try {
    UniqueFd wo = open_file(tmp.path() / "f", O_WRONLY);
    pread_full(wo.get(), buf, 0, "the file f");
    FAIL() << "read a write-only descriptor";
  } catch (const Error& e) {
    EXPECT_EQ(e.sys_errno(), EBADF);
    EXPECT_NE(std::string(e.what()).find("read the file f [0+8]"), std::string::npos) << e.what();
  }
}

TEST(FileTest, ReplaceDirPutsTheNewOneInPlaceAndTheOldOneGoes) {
  testing::TempDir tmp;
  const fs::path dir = tmp.path() / "ckpt", staging = tmp.path() / "ckpt.partial";
  fs::create_directories(staging);
  std::ofstream(staging / "a") << "1";
  replace_dir(staging, dir, true);  // nothing there yet: a rename
  EXPECT_EQ(read_text(dir / "a"), "1");
  EXPECT_FALSE(fs::exists(staging));
  fs::create_directories(staging);
  std::ofstream(staging / "b") << "2";
  replace_dir(staging, dir, false);  // exchanged with the old one, which is removed
  EXPECT_EQ(read_text(dir / "b"), "2");
  EXPECT_FALSE(fs::exists(dir / "a"));
  EXPECT_FALSE(fs::exists(staging));
  EXPECT_THROW(replace_dir(tmp.path() / "nothing", tmp.path() / "new", false), Error);
}

TEST(FileTest, ReserveDescriptorsRaisesTheSoftLimitOrSaysWhatToRaise) {
  // In a child: the limits it lowers are the process's own.
  EXPECT_EXIT(
      {
        rlimit lim{};
        getrlimit(RLIMIT_NOFILE, &lim);
        lim.rlim_cur = 256;
        setrlimit(RLIMIT_NOFILE, &lim);
        reserve_descriptors(1000, "the test");
        getrlimit(RLIMIT_NOFILE, &lim);
        if (lim.rlim_cur < 1000) std::_Exit(1);
        lim.rlim_cur = lim.rlim_max = 300;
        setrlimit(RLIMIT_NOFILE, &lim);
        try {
          reserve_descriptors(1000, "the test");
        } catch (const Error& e) {
          std::fprintf(stderr, "%s\n", e.what());
          std::_Exit(0);
        }
        std::_Exit(2);
      },
      ::testing::ExitedWithCode(0), "the test needs about .* ulimit -n");
}

TEST(ErrorsTest, ErrnoIsNamedAndNotFoundIsItsOwnCode) {
  EXPECT_EQ(errno_text(EIO), "EIO (Input/output error)");
  try {
    fail_errno(ENOSPC, "write x");
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIo);
    EXPECT_EQ(e.sys_errno(), ENOSPC);
    EXPECT_EQ(std::string(e.what()), "write x: ENOSPC (No space left on device)");
  }
  try {
    fail_errno(ENOENT, "open y");
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
  }
}

TEST(ResultTest, HoldsTheValueOrWhyNot) {
  Result<int> ok = 7;
  ASSERT_TRUE(ok);
  EXPECT_EQ(*ok, 7);
  Result<std::string> bad = failure("the length field says 9, 4 bytes follow");
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error(), "the length field says 9, 4 bytes follow");
}

TEST(LogTest, RateLimitedLogSaysOnceAnIntervalAndCountsWhatItDropped) {
  const auto interval = std::chrono::milliseconds(200);
  RateLimitedLog log(interval);
  ::testing::internal::CaptureStderr();
  log.log("a flood");
  // The interval counts from the line said, which is at most this (under a sanitizer the first
  // line can take a while: counting from before it let "later" come too early).
  const auto said = std::chrono::steady_clock::now();
  for (int i = 0; i < 5; ++i) log.log("a flood");  // microseconds: all five dropped
  ASSERT_LT(std::chrono::steady_clock::now() - said, interval);
  while (std::chrono::steady_clock::now() - said <= interval) {
  }  // the interval is the behaviour under test: wait it out
  log.log("later");
  EXPECT_EQ(::testing::internal::GetCapturedStderr(),
            "sluice: a flood\nsluice: later (5 more like it not shown)\n");
}

TEST(CpuTimeTest, GrowsWithWork) {
  const double before = process_cpu_seconds();
  volatile uint64_t sink = 0;
  for (uint64_t i = 0; i < 200'000'000 && process_cpu_seconds() - before < 0.02; ++i)
    sink = sink + i;
  EXPECT_GT(process_cpu_seconds(), before);
}

// /proc/meminfo's MemAvailable in bytes, read here apart from the code under test; 0 without it.
uint64_t mem_available() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  uint64_t kb = 0;
  while (in >> key >> kb) {  // "MemTotal:  16318888 kB"; HugePages_Total: and others have no unit
    if (key == "MemAvailable:") return kb << 10;
    if (in.peek() != '\n') in >> unit;
  }
  return 0;
}

TEST(HostTest, MemoryRoomIsSomeMemoryAndNamesWhereItCameFrom) {
  const uint64_t before = mem_available();
  const MemoryRoom room = memory_room();
  const uint64_t after = mem_available();
  EXPECT_GT(room.bytes, 0u) << room.where;
  const bool named = room.where == "MemAvailable" || room.where.starts_with("memory cgroup /") ||
                     room.where.starts_with("sysinfo: ");
  EXPECT_TRUE(named) << "where: \"" << room.where << "\"";
  if (before > 0 && after > 0) {
    // Never more than the machine has free; exactly MemAvailable when it says so (other
    // processes move it between the reads: a slack of 256 MiB).
    constexpr uint64_t kSlack = 256 << 20;
    EXPECT_LE(room.bytes, std::max(before, after) + kSlack) << room.where;
    if (room.where == "MemAvailable") {
      EXPECT_GE(room.bytes + kSlack, std::min(before, after))
          << room.bytes << " bytes; MemAvailable " << before << " then " << after;
    }
  } else {
    EXPECT_NE(room.where, "MemAvailable") << "no MemAvailable in /proc/meminfo, yet named";
  }
}

TEST(HostTest, CpuRoomIsWithinTheAffinityAndSaysWhy) {
  const CpuRoom cpus = cpu_room();
  EXPECT_GE(cpus.cores, 1u);
  cpu_set_t set;
  ASSERT_EQ(::sched_getaffinity(0, sizeof set, &set), 0);
  EXPECT_LE(cpus.cores, static_cast<uint32_t>(CPU_COUNT(&set)));
  if (const unsigned hw = std::thread::hardware_concurrency(); hw > 0) {
    EXPECT_LE(cpus.cores, hw);
  }
  EXPECT_TRUE(cpus.how == fmt::format("{} cores in this process's CPU affinity", cpus.cores) ||
              cpus.how == fmt::format("a cgroup CPU quota of {} cores", cpus.cores))
      << cpus.how;
}

TEST(HostTest, EnvUintParsesWholeNumbersAndRejectsTheRest) {
  const char* name = "SLUICE_HOST_TEST_UINT";
  ::unsetenv(name);
  EXPECT_EQ(env_uint(name, 0), std::nullopt) << "unset";
  ::setenv(name, "", 1);
  EXPECT_EQ(env_uint(name, 0), std::nullopt) << "empty";
  ::setenv(name, "42", 1);
  EXPECT_EQ(env_uint(name, 1), 42u);
  ::setenv(name, "4294967295", 1);
  EXPECT_EQ(env_uint(name, 0), 4294967295u);
  ::setenv(name, "0", 1);
  EXPECT_EQ(env_uint(name, 0), 0u);
  for (const char* bad : {"two", "4x", "-1", " 4", "4294967296", "0"}) {
    ::setenv(name, bad, 1);
    try {
      const auto got = env_uint(name, 1);
      ADD_FAILURE() << "\"" << bad << "\" read as " << got.value_or(0);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kConfig);
      EXPECT_EQ(std::string(e.what()), fmt::format("environment variable SLUICE_HOST_TEST_UINT="
                                                   "\"{}\": expected an integer >= 1",
                                                   bad));
    }
  }
  ::unsetenv(name);
}

}  // namespace
}  // namespace sluice::detail
