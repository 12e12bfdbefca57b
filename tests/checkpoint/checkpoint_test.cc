// Checkpoint files and directories (include/sluice/checkpoint.h): bytes back as written, every
// damage named, a save that never finished invisible, a full disk refused up front, and the
// loader's reads first. tests/python/test_checkpoint.py runs the DCP Writer/Reader on top.

#include <sluice/checkpoint.h>

#include "checkpoint/files.h"
#include "common/partial_dir.h"
#include "io/priority.h"
#include "test_util.h"

#include <fmt/format.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <chrono>
#include <fstream>
#include <thread>

namespace sluice {
namespace {

namespace fs = std::filesystem;

std::vector<std::byte> bytes(size_t n, uint64_t seed) { return testing::sample_bytes(seed, 0, n); }

// Parts of awkward sizes: empty, under, at and over the alignment, over a chunk.
std::vector<std::vector<std::byte>> awkward_parts(uint64_t seed) {
  std::vector<std::vector<std::byte>> out;
  for (size_t n : {0ul, 1ul, 4095ul, 4096ul, 4097ul, (3ul << 20) + 3, 100ul})
    out.push_back(bytes(n, seed + n));
  return out;
}

std::vector<CheckpointPart> as_parts(const std::vector<std::vector<std::byte>>& data) {
  std::vector<CheckpointPart> parts;
  for (size_t i = 0; i < data.size(); ++i) parts.push_back({fmt::format("t{}", i), data[i]});
  return parts;
}

CheckpointOptions small_chunks(bool direct) {
  CheckpointOptions o;
  o.direct = direct;
  o.chunk_bytes = 1 << 20;  // several IOs per large part, parts sharing IOs
  o.queue_depth = 4;
  return o;
}

void expect_loaded(const fs::path& dir, const std::vector<std::vector<std::byte>>& want) {
  auto got = load_checkpoint(dir);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].name, fmt::format("t{}", i));
    EXPECT_TRUE(got[i].bytes == want[i]) << "part " << i;
  }
}

TEST(CheckpointTest, PartsComeBackAsWrittenWithAndWithoutDirectIo) {
  testing::TempDir tmp;
  for (bool direct : {true, false}) {
    auto data = awkward_parts(direct);
    auto parts = as_parts(data);
    fs::path file = tmp / fmt::format("f{}", direct);
    CheckpointWriteResult r = write_checkpoint_file(file, parts, small_chunks(direct));
    uint64_t total = 0;
    for (size_t i = 0; i < data.size(); ++i) {
      EXPECT_EQ(r.parts[i].offset, total);
      EXPECT_EQ(r.parts[i].length, data[i].size());
      total += data[i].size();
    }
    EXPECT_EQ(r.bytes, total);
    EXPECT_EQ(fs::file_size(file), total);  // the last IO's padding is cut off
    // Read back in another order than written, each into its own buffer.
    std::vector<std::vector<std::byte>> back(data.size());
    std::vector<CheckpointReadPart> reads;
    for (size_t i = data.size(); i-- > 0;) {
      back[i].resize(data[i].size());
      reads.push_back({parts[i].name, r.parts[i], back[i]});
    }
    read_checkpoint_file(file, reads, small_chunks(direct));
    for (size_t i = 0; i < data.size(); ++i) EXPECT_TRUE(back[i] == data[i]) << "part " << i;
  }
}

TEST(CheckpointTest, AFlippedByteFailsNamingFileAndPart) {
  testing::TempDir tmp;
  auto data = awkward_parts(7);
  save_checkpoint(tmp / "ckpt", as_parts(data), small_chunks(true));
  {
    int fd = ::open((tmp / "ckpt" / "data").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    char b = 0;
    const off_t at = 1 + 4095 + 4096 + 4097 + 12345;  // inside part t5
    ASSERT_EQ(pread(fd, &b, 1, at), 1);
    b ^= 0x20;
    ASSERT_EQ(pwrite(fd, &b, 1, at), 1);
    ::close(fd);
  }
  try {
    load_checkpoint(tmp / "ckpt");
    FAIL() << "a flipped byte went unnoticed";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCorruption);
    std::string what = e.what();
    EXPECT_NE(what.find((tmp / "ckpt" / "data").string()), std::string::npos) << what;
    EXPECT_NE(what.find("part t5 "), std::string::npos) << what;
    EXPECT_NE(what.find("checksum mismatch"), std::string::npos) << what;
  }
}

// index.json's numbers are integers in range: a float or a negative one is named, not
// converted (which would be undefined behaviour).
TEST(CheckpointTest, ADamagedIndexNumberIsNamed) {
  testing::TempDir tmp;
  auto data = awkward_parts(8);
  save_checkpoint(tmp / "ckpt", as_parts(data), small_chunks(true));
  const fs::path index = tmp / "ckpt" / "index.json";
  std::string text;
  {
    std::ifstream in(index);
    text.assign(std::istreambuf_iterator<char>(in), {});
  }
  for (const char* bad : {"1e30", "-5", "2.5"}) {
    std::string damaged = text;
    const size_t at = damaged.find("\"length\": ");
    ASSERT_NE(at, std::string::npos) << text;
    const size_t end = damaged.find_first_of(",\n}", at + 10);
    damaged.replace(at + 10, end - at - 10, bad);
    std::ofstream(index, std::ios::trunc) << damaged;
    try {
      load_checkpoint(tmp / "ckpt");
      FAIL() << bad << " went unnoticed";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kCorruption) << e.what();
      EXPECT_NE(std::string(e.what()).find("length: expected an integer from 0 to"),
                std::string::npos)
          << e.what();
    }
  }
}

TEST(CheckpointTest, ATruncatedFileFailsNamingThePartItCuts) {
  testing::TempDir tmp;
  auto data = awkward_parts(8);
  save_checkpoint(tmp / "ckpt", as_parts(data), small_chunks(true));
  fs::resize_file(tmp / "ckpt" / "data", 1 + 4095 + 4096 + 4097 + 1000);  // inside t5
  try {
    load_checkpoint(tmp / "ckpt");
    FAIL() << "a truncated file went unnoticed";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCorruption);
    std::string what = e.what();
    EXPECT_NE(what.find("part t5 "), std::string::npos) << what;
    EXPECT_NE(what.find("truncated"), std::string::npos) << what;
  }
}

size_t partials_beside(const fs::path& dir) {
  size_t n = 0;
  for (auto& e : fs::directory_iterator(dir.parent_path()))
    n += e.path().filename().string().starts_with(
        fmt::format(".{}.partial-", dir.filename().string()));
  return n;
}

TEST(CheckpointTest, ASaveKilledAtRandomPointsLeavesThePreviousOneLoadable) {
  testing::TempDir tmp;
  const fs::path dir = tmp / "ckpt";
  std::vector<std::vector<std::byte>> v1 = {bytes(5 << 20, 1), bytes(777, 2)};
  std::vector<std::vector<std::byte>> v2 = {bytes(5 << 20, 3), bytes(777, 4)};
  save_checkpoint(dir, as_parts(v1));
  std::mt19937 rng(11);
  bool saw_v2 = false;
  for (int round = 0; round < 6; ++round) {
    pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {  // saves v2 over and over until killed
      for (;;) save_checkpoint(dir, as_parts(v2));
    }
    std::this_thread::sleep_for(
        std::chrono::milliseconds(std::uniform_int_distribution(1, 60)(rng)));
    kill(child, SIGKILL);
    int status = 0;
    waitpid(child, &status, 0);
    // Whole v1 or whole v2, never a mix, never nothing.
    auto got = load_checkpoint(dir);
    ASSERT_EQ(got.size(), 2u);
    const bool is_v2 = got[0].bytes == v2[0];
    saw_v2 = saw_v2 || is_v2;
    const auto& want = is_v2 ? v2 : v1;
    ASSERT_TRUE(got[0].bytes == want[0] && got[1].bytes == want[1]) << "round " << round;
  }
  // The next save clears whatever the killed ones left beside the checkpoint.
  save_checkpoint(dir, as_parts(v1));
  EXPECT_EQ(partials_beside(dir), 0u);
  expect_loaded(dir, v1);
  std::cout << "killed saves: v2 published in some round: " << saw_v2 << "\n";
}

TEST(CheckpointTest, TheNextSaveClearsKilledSavesOfAnyNameButNotLiveOnesOrDatasets) {
  testing::TempDir tmp;
  const fs::path ck = tmp / "ck";
  std::vector<std::vector<std::byte>> v = {bytes(1 << 20, 7)};
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {  // a save of step-4 killed after making its staging directory
    detail::PartialDir staging = detail::make_partial_dir(ck / "step-4");
    raise(SIGKILL);
  }
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_EQ(partials_beside(ck / "step-4"), 1u);
  detail::PartialDir live = detail::make_partial_dir(ck / "step-5");  // still saving
  fs::create_directories(ck / ".data.partial-123-0badcafe");          // a DatasetWriter's staging
  const mode_t umask_was = ::umask(022);
  save_checkpoint(ck / "step-6", as_parts(v));
  ::umask(umask_was);
  EXPECT_EQ(partials_beside(ck / "step-4"), 0u) << "the killed save's staging was left";
  EXPECT_TRUE(fs::exists(live.path())) << "a live save's staging was removed";
  EXPECT_TRUE(fs::exists(ck / ".data.partial-123-0badcafe")) << "a dataset's staging was removed";
  EXPECT_EQ(fs::status(ck / "step-6").permissions(),
            fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                fs::perms::others_read | fs::perms::others_exec);
  live.release();  // now it is a killed save's, as far as the next save can tell
  save_checkpoint(ck / "step-7", as_parts(v));
  EXPECT_FALSE(fs::exists(live.path()));
  expect_loaded(ck / "step-7", v);
}

TEST(CheckpointTest, ASaveIntoAFullDiskFailsUpFrontAndKeepsThePreviousOne) {
  testing::TempDir tmp;
  const fs::path disk = tmp / "disk";
  if (std::string why = testing::mount_small_disk(disk, "4m"); !why.empty())
    GTEST_SKIP() << "no small file system to fill: " << why;
  std::vector<std::vector<std::byte>> small = {bytes(1 << 20, 5)};
  save_checkpoint(disk / "ckpt", as_parts({small}));
  std::vector<std::vector<std::byte>> big = {bytes(6 << 20, 6)};
  try {
    save_checkpoint(disk / "ckpt", as_parts(big));
    FAIL() << "6 MiB fit on a 4 MiB disk";
  } catch (const Error& e) {
    std::string what = e.what();
    EXPECT_EQ(e.sys_errno(), ENOSPC) << what;
    EXPECT_NE(what.find("6291456 bytes do not fit"), std::string::npos) << what;
  }
  expect_loaded(disk / "ckpt", small);
  umount2(disk.c_str(), MNT_DETACH);
}

TEST(CheckpointTest, WritesGiveWayWhileALoadersReadsWait) {
  testing::TempDir tmp;
  std::vector<std::vector<std::byte>> data = {bytes(16 << 20, 9)};
  CheckpointOptions o = small_chunks(true);
  o.queue_depth = 8;
  o.share = 0.25;
  // What a Loader reading a dataset in `tmp` holds: the traffic of its device.
  auto traffic = io::DeviceTraffic::for_path(tmp.path());
  CheckpointWriteResult free = write_checkpoint_file(tmp / "a", as_parts(data), o);
  EXPECT_EQ(free.held_seconds, 0) << "no reads waited, yet writes were held";
  uint64_t counted = traffic->held_ns.load();
  {
    io::DeviceTraffic::ReadsWaiting reading(*traffic);  // as a loader's batch in flight
    CheckpointWriteResult held = write_checkpoint_file(tmp / "b", as_parts(data), o);
    EXPECT_GT(held.held_seconds, 0);
    o.share = 1;  // no priority
    CheckpointWriteResult even = write_checkpoint_file(tmp / "c", as_parts(data), o);
    EXPECT_EQ(even.held_seconds, 0);
  }
  EXPECT_GT(traffic->held_ns.load(), counted);
  EXPECT_GE(traffic->written_bytes.load(), 3 * data[0].size());
}

TEST(CheckpointTest, WritesToAnotherDeviceDoNotWaitForTheReads) {
  testing::TempDir tmp;
  std::vector<std::vector<std::byte>> data = {bytes(8 << 20, 10)};
  CheckpointOptions o = small_chunks(true);
  o.share = 0.25;
  io::DeviceTraffic other;  // a loader's reads on some other disk
  io::DeviceTraffic::ReadsWaiting reading(other);
  CheckpointWriteResult r = write_checkpoint_file(tmp / "a", as_parts(data), o);
  EXPECT_EQ(r.held_seconds, 0);
  // The same object passed in as the file's device's: held.
  CheckpointWriteResult held = write_checkpoint_file(tmp / "b", as_parts(data), o, &other);
  EXPECT_GT(held.held_seconds, 0);
  EXPECT_EQ(other.written_bytes.load(), data[0].size());
}

}  // namespace
}  // namespace sluice
