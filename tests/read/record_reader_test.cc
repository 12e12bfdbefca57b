// read::ReadPlan, the one planner of the loader's and the shard server's reads: where records
// land, what is merged, and the one wording of a failed read and of a checksum mismatch.

#include "read/record_reader.h"

#include "index/internals.h"

#include "test_util.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>

#include <fmt/format.h>

namespace sluice {
namespace {

using testing::message_of;

using testing::TempDir;

// Executes the plan's reads with pread, as an engine would (a read may end early at end of
// file once its required bytes are in).
void run(const Dataset& ds, read::ReadPlan& plan) {
  for (const io::ReadOp& op : plan.ops()) {
    const int fd = op.fd >= 0 ? op.fd : index::shard_fd(ds, op.file);
    ssize_t got = ::pread(fd, op.dest, op.length, static_cast<off_t>(op.offset));
    ASSERT_GE(got, static_cast<ssize_t>(op.required ? op.required : op.length));
  }
}

class ReadPlanTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_ = testing::write_dataset(dir_.path() / "ds", kSamples, 6000, 256 << 10, 4096);
    ds_ = Dataset::open(dir_.path() / "ds");
  }
  static constexpr uint64_t kSamples = 300;
  TempDir dir_;
  std::vector<std::vector<std::byte>> data_;
  std::shared_ptr<Dataset> ds_;
};

TEST_F(ReadPlanTest, SortedNeighboursMergeIntoAlignedReadsAndEveryRecordLandsWhereSaid) {
  for (bool direct : {true, false}) {
    read::ReadPlan plan(*ds_, direct);
    std::vector<uint64_t> at(kSamples);
    for (uint64_t i = 0; i < kSamples; ++i) at[i] = plan.add(i, ds_->extent(i), true);
    // Under direct I/O the block covers of a shard's records abut: one read per shard (each is
    // under kMaxRead). Buffered, covers are exact and the padding between records splits them.
    if (direct)
      EXPECT_EQ(plan.ops().size(), ds_->shards().size());
    else
      EXPECT_LE(plan.ops().size(), kSamples);
    for (const io::ReadOp& op : plan.ops()) {
      EXPECT_LE(op.length, read::kMaxRead);
      if (direct) {
        EXPECT_EQ(op.offset % 4096, 0u);
        EXPECT_EQ(op.length % 4096, 0u);
      }
    }
    std::vector<std::byte> buffer(plan.bytes());
    plan.bind(buffer.data());
    run(*ds_, plan);
    for (uint64_t i = 0; i < kSamples; ++i) {
      const SampleExtent x = ds_->extent(i);
      std::span<const std::byte> record(buffer.data() + at[i], x.size);
      ASSERT_TRUE(std::equal(record.begin(), record.end(), ds_->read_record(i).begin()))
          << "sample " << i << " direct " << direct;
      read::check_record(*ds_, i, x, record);  // no throw
    }
  }
}

TEST_F(ReadPlanTest, OutOfOrderSamplesAreNotMergedBackwardsAndAReservedTableIsLeftAlone) {
  read::ReadPlan plan(*ds_, true);
  const std::vector<uint64_t> order = {40, 3, 41, 2, 299, 0};
  std::vector<uint64_t> at;
  for (uint64_t i : order) at.push_back(plan.add(i, ds_->extent(i), true));
  const uint64_t table = plan.reserve(100, 8);
  const uint64_t after = plan.add(150, ds_->extent(150), false);  // past the table
  EXPECT_GE(table, at.back());
  EXPECT_GE(after, table + 100);
  std::vector<std::byte> buffer(plan.bytes(), std::byte{0x5a});
  plan.bind(buffer.data());
  run(*ds_, plan);
  for (size_t k = 0; k < order.size(); ++k) {
    auto want = ds_->read_record(order[k]);
    EXPECT_EQ(std::memcmp(buffer.data() + at[k], want.data(), want.size()), 0) << order[k];
  }
  auto want = ds_->read_record(150);
  EXPECT_EQ(std::memcmp(buffer.data() + after, want.data(), want.size()), 0);
  EXPECT_EQ(buffer[table], std::byte{0x5a});  // no read wrote into the caller's table
  EXPECT_EQ(buffer[table + 99], std::byte{0x5a});
}

TEST_F(ReadPlanTest, AReadStraightToSlotsMergesOnlyWhenFileAndMemoryBothContinue) {
  read::ReadPlan plan(*ds_, false);
  std::vector<std::byte> slots(3 * 100);
  SampleExtent a{0, 8192, 100, 0}, b{0, 8292, 100, 0}, c{0, 9000, 100, 0};
  plan.add_to(7, a, slots.data());
  plan.add_to(8, b, slots.data() + 100);  // continues a on disk and in memory
  plan.add_to(9, c, slots.data() + 200);  // not on disk
  ASSERT_EQ(plan.ops().size(), 2u);
  EXPECT_EQ(plan.ops()[0].length, 200u);
  EXPECT_EQ(plan.ops()[1].dest, slots.data() + 200);
}

TEST_F(ReadPlanTest, AFailedReadIsWordedOnceNamingFileRangeSamplesAndCause) {
  read::ReadPlan plan(*ds_, true);
  for (uint64_t i = 0; i < 5; ++i) plan.add(i, ds_->extent(i), true);
  const io::ReadOp op = plan.ops()[0];
  const std::string where = fmt::format("read {} [{}+{}] (sample 0, 1, 2, 3)",
                                        ds_->shards()[0].path.string(), op.offset, op.length);
  ErrorCode code{};
  std::string what = message_of([&] { plan.fail({0, -EIO, false}, 100); }, &code);
  EXPECT_EQ(what, where + ": EIO (Input/output error)");
  EXPECT_EQ(code, ErrorCode::kIo);
  what = message_of([&] { plan.fail({0, -ENODATA, false}, 100); }, &code);
  EXPECT_EQ(what, where + ": unexpected end of file (truncated?)");
  EXPECT_EQ(code, ErrorCode::kCorruption);
  what = message_of([&] { plan.fail({0, -ETIMEDOUT, false}, 77); }, &code);
  EXPECT_EQ(what, where + ": timed out after 77 ms");
  what = message_of([&] { plan.fail({99, -EINVAL, false}, 100); }, &code);  // the engine's own
  EXPECT_NE(what.find(": io engine: EINVAL"), std::string::npos) << what;
}

TEST_F(ReadPlanTest, AFlippedByteIsTheOneChecksumMismatchMessage) {
  const SampleExtent x = ds_->extent(17);
  auto record = ds_->read_record(17);
  record[x.size / 2] ^= std::byte{1};
  ErrorCode code{};
  std::string what = message_of([&] { read::check_record(*ds_, 17, x, record); }, &code);
  EXPECT_EQ(code, ErrorCode::kCorruption);
  EXPECT_EQ(what.rfind(ds_->shards()[x.shard].path.string() + ": sample 17: checksum mismatch "
                                                              "(stored ",
                       0),
            0u)
      << what;
}

TEST(ReadPlanFilesTest, ATreesSamplesAreReadFromTheirOwnFilesAndNamedInErrors) {
  TempDir dir;
  const std::vector<std::string> names = {"a/x.bin", "b/y.bin", "b/z.bin"};
  for (size_t i = 0; i < names.size(); ++i) {
    std::filesystem::create_directories((dir.path() / names[i]).parent_path());
    std::ofstream(dir.path() / names[i])
        << std::string(1000 + i * 5000, static_cast<char>('p' + i));
  }
  DatasetOptions source;
  source.path = dir.path();
  auto ds = Dataset::open_source(source);
  read::ReadPlan plan(*ds, false);
  std::vector<uint64_t> at;
  for (uint64_t i = 0; i < 3; ++i) at.push_back(plan.add(i, ds->extent(i), true));
  ASSERT_EQ(plan.ops().size(), 3u);  // one read per file, never merged
  for (const io::ReadOp& op : plan.ops()) EXPECT_GE(op.fd, 0);
  std::vector<std::byte> buffer(plan.bytes());
  plan.bind(buffer.data());
  run(*ds, plan);
  for (uint64_t i = 0; i < 3; ++i)
    EXPECT_EQ(buffer[at[i] + ds->extent(i).size - 1], static_cast<std::byte>('p' + i));
  std::string what = message_of([&] { plan.fail({1, -EIO, false}, 100); });
  EXPECT_NE(what.find("read " + (ds->path() / "b/y.bin").string() + " [0+"), std::string::npos)
      << what;
  plan.close_files();
  EXPECT_NE(message_of([&] {
              plan.fail({2, -EIO, false}, 100);
            }).find("b/z.bin"),
            std::string::npos);
}

}  // namespace
}  // namespace sluice
