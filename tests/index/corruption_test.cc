// Damage a packed dataset on disk and check that open, read and verify say what and where.

#include "format/layout.h"
#include "test_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>

namespace sluice {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

void flip_byte(const fs::path& file, uint64_t offset) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  ASSERT_TRUE(f) << file;
  f.seekg(static_cast<std::streamoff>(offset));
  char c;
  f.get(c);
  f.seekp(static_cast<std::streamoff>(offset));
  f.put(static_cast<char>(c ^ 0x5a));
}

std::string open_error(const fs::path& dir, ErrorCode expected) {
  try {
    Dataset::open(dir);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), expected) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "open succeeded";
  return {};
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

class Corruption : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::write_dataset(dir_, 300, 5000);
    auto ds = Dataset::open(dir_);
    shard1_ = ds->shards()[1];
    sample_ = shard1_.first_sample + 2;
    extent_ = ds->extent(sample_);
  }
  TempDir tmp_;
  fs::path dir_ = tmp_ / "ds";
  ShardInfo shard1_;
  uint64_t sample_ = 0;
  SampleExtent extent_;
};

TEST_F(Corruption, FlippedDataByteNamesShardAndSample) {
  flip_byte(shard1_.path, extent_.offset + extent_.size / 2);
  auto ds = Dataset::open(dir_);  // open touches no sample data
  try {
    ds->read_record(sample_);
    FAIL() << "read succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCorruption);
    EXPECT_TRUE(contains(e.what(), "shard-00001.sluice")) << e.what();
    EXPECT_TRUE(contains(e.what(), "sample " + std::to_string(sample_))) << e.what();
    EXPECT_TRUE(contains(e.what(), "checksum mismatch")) << e.what();
  }
  auto problems = ds->verify();
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_TRUE(contains(problems[0], "shard-00001.sluice: sample " + std::to_string(sample_)))
      << problems[0];
  // Its neighbours are intact.
  EXPECT_NO_THROW(ds->read_record(sample_ - 1));
  EXPECT_NO_THROW(ds->read_record(sample_ + 1));
}

TEST_F(Corruption, EveryFlippedRecordByteIsCaught) {
  auto ds = Dataset::open(dir_);
  for (uint64_t b = 0; b < extent_.size; b += std::max<uint64_t>(1, extent_.size / 64)) {
    flip_byte(shard1_.path, extent_.offset + b);
    EXPECT_THROW(ds->read_record(sample_), Error) << "byte " << b;
    flip_byte(shard1_.path, extent_.offset + b);  // restore
  }
  EXPECT_NO_THROW(ds->read_record(sample_));
}

TEST_F(Corruption, FlippedIndexByteIsCaughtByVerify) {
  format::ShardHeader h;
  {
    std::ifstream f(shard1_.path, std::ios::binary);
    f.read(reinterpret_cast<char*>(&h), sizeof(h));
  }
  flip_byte(shard1_.path, h.index_offset + 16 * 2 + 12);  // sample_'s stored checksum
  auto ds = Dataset::open(dir_);
  auto problems = ds->verify();
  ASSERT_GE(problems.size(), 2u);
  EXPECT_TRUE(contains(problems[0], "shard-00001.sluice: sample index checksum mismatch"))
      << problems[0];
  EXPECT_TRUE(contains(problems[1], "sample " + std::to_string(sample_))) << problems[1];
}

TEST_F(Corruption, IndexEntryPointingOutsideDataIsAnError) {
  format::ShardHeader h;
  {
    std::ifstream f(shard1_.path, std::ios::binary);
    f.read(reinterpret_cast<char*>(&h), sizeof(h));
  }
  flip_byte(shard1_.path, h.index_offset + 16 * 2 + 5);  // high byte of the offset
  auto ds = Dataset::open(dir_);
  try {
    ds->extent(sample_);
    FAIL() << "extent succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCorruption);
    EXPECT_TRUE(contains(e.what(), "outside the data region")) << e.what();
  }
  EXPECT_FALSE(ds->verify().empty());
}

TEST_F(Corruption, TruncatedShard) {
  fs::resize_file(shard1_.path, shard1_.file_bytes - 100);
  auto what = open_error(dir_, ErrorCode::kCorruption);
  EXPECT_TRUE(contains(what, "shard-00001.sluice: truncated")) << what;
  fs::resize_file(shard1_.path, 10);
  what = open_error(dir_, ErrorCode::kCorruption);
  EXPECT_TRUE(contains(what, "shard-00001.sluice: truncated")) << what;
}

TEST_F(Corruption, BadShardHeaders) {
  flip_byte(shard1_.path, 0);  // magic
  EXPECT_TRUE(contains(open_error(dir_, ErrorCode::kCorruption), "wrong magic"));
  flip_byte(shard1_.path, 0);
  flip_byte(shard1_.path, offsetof(format::ShardHeader, num_samples));
  EXPECT_TRUE(contains(open_error(dir_, ErrorCode::kCorruption), "header checksum mismatch"));
  flip_byte(shard1_.path, offsetof(format::ShardHeader, num_samples));

  // A future version, with a valid checksum, is refused by name.
  format::ShardHeader h;
  {
    std::ifstream f(shard1_.path, std::ios::binary);
    f.read(reinterpret_cast<char*>(&h), sizeof(h));
  }
  h.version = 99;
  h.header_checksum = format::checksum64(&h, offsetof(format::ShardHeader, header_checksum));
  {
    std::fstream f(shard1_.path, std::ios::in | std::ios::out | std::ios::binary);
    f.write(reinterpret_cast<const char*>(&h), sizeof(h));
  }
  auto what = open_error(dir_, ErrorCode::kCorruption);
  EXPECT_TRUE(contains(what, "shard-00001.sluice: bad header: unsupported format version 99"))
      << what;
}

TEST_F(Corruption, ShardFromAnotherDataset) {
  TempDir other;
  testing::write_dataset(other / "ds", 300, 5000);
  fs::copy_file(other / "ds" / "shard-00001.sluice", shard1_.path,
                fs::copy_options::overwrite_existing);
  auto what = open_error(dir_, ErrorCode::kCorruption);
  EXPECT_TRUE(contains(what, "does not match the manifest")) << what;
}

TEST_F(Corruption, MissingShard) {
  fs::remove(shard1_.path);
  auto what = open_error(dir_, ErrorCode::kNotFound);
  EXPECT_TRUE(contains(what, "shard-00001.sluice: shard 1 is missing")) << what;
}

TEST_F(Corruption, MissingOrDamagedManifest) {
  fs::path manifest = dir_ / "manifest.sluice";
  flip_byte(manifest, 100);
  EXPECT_TRUE(contains(open_error(dir_, ErrorCode::kCorruption), "body checksum mismatch"));
  flip_byte(manifest, 100);
  flip_byte(manifest, 20);
  EXPECT_TRUE(contains(open_error(dir_, ErrorCode::kCorruption), "header checksum mismatch"));
  flip_byte(manifest, 20);
  fs::resize_file(manifest, fs::file_size(manifest) - 1);
  EXPECT_TRUE(contains(open_error(dir_, ErrorCode::kCorruption), "truncated"));
  fs::remove(manifest);
  EXPECT_TRUE(contains(open_error(dir_, ErrorCode::kNotFound), "not a packed sluice dataset"));
  EXPECT_TRUE(contains(open_error(tmp_ / "nope", ErrorCode::kNotFound), "dataset not found"));
}

TEST_F(Corruption, AppendedBytesAreReported) {
  {
    std::ofstream f(shard1_.path, std::ios::app | std::ios::binary);
    f << "junk";
  }
  EXPECT_TRUE(contains(open_error(dir_, ErrorCode::kCorruption), "appended"));
}

}  // namespace
}  // namespace sluice
