// The sources read in place (npy, tokens, a files tree, WebDataset tars), through the one
// entry point that tells formats apart (Dataset::open_source with format auto): what each
// yields, byte for byte, and what verify() says when a file changes under it.

#include "index/internals.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <fstream>

#include <fmt/format.h>

namespace sluice {
namespace {

namespace fs = std::filesystem;
using testing::sample_bytes;
using testing::TempDir;

void write_file(const fs::path& path, std::span<const std::byte> bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::shared_ptr<Dataset> open_auto(const fs::path& path, uint64_t seq_len = 0) {
  DatasetOptions source;
  source.path = path;
  source.seq_len = seq_len;
  return Dataset::open_source(source);
}

std::vector<std::byte> bytes_of(std::string_view s) {
  auto b = std::as_bytes(std::span(s));
  return {b.begin(), b.end()};
}

TEST(SourcesTest, NpyArrayIsOneFieldOfItsDtypeAndShape) {
  TempDir dir;
  constexpr uint64_t kRows = 37;
  // Version 1.0 header, padded so that the data starts on a 64-byte boundary, as numpy writes.
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (37, 3), }";
  header.resize(128 - 10 - 1, ' ');
  header += '\n';
  std::string file = std::string("\x93NUMPY\x01\x00", 8);
  file += static_cast<char>(header.size());
  file += '\0';
  file += header;
  std::vector<float> values(kRows * 3);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i) * 0.5f;
  file.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
  write_file(dir / "x.npy", bytes_of(file));

  auto ds = open_auto(dir / "x.npy");
  EXPECT_EQ(ds->format(), DatasetFormat::kNpy);
  EXPECT_FALSE(ds->packed());
  ASSERT_EQ(ds->num_samples(), kRows);
  ASSERT_EQ(ds->fields().size(), 1u);
  EXPECT_EQ(ds->fields()[0].dtype, DType::kFloat32);
  EXPECT_EQ(ds->fields()[0].shape, std::vector<int64_t>{3});
  for (uint64_t i : {uint64_t{0}, uint64_t{17}, kRows - 1}) {
    auto record = ds->read_record(i);
    ASSERT_EQ(record.size(), 12u);
    EXPECT_EQ(std::memcmp(record.data(), &values[i * 3], 12), 0) << "row " << i;
  }
  EXPECT_TRUE(ds->verify().empty());

  fs::resize_file(dir / "x.npy", fs::file_size(dir / "x.npy") - 4);  // one float short
  try {
    open_auto(dir / "x.npy");
    FAIL() << "a truncated .npy opened";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCorruption);
    EXPECT_NE(std::string(e.what()).find("x.npy: truncated"), std::string::npos) << e.what();
  }
}

TEST(SourcesTest, TokensAreWindowsOfSeqLenEveryStride) {
  TempDir dir;
  std::vector<uint16_t> tokens(1000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint16_t>(i * 3);
  write_file(dir / "train.bin", std::as_bytes(std::span(tokens)));

  DatasetOptions source;
  source.path = dir / "train.bin";
  source.seq_len = 64;
  source.stride = 16;
  auto ds = Dataset::open_source(source);  // auto: a file that is not .npy, with seq_len set
  EXPECT_EQ(ds->format(), DatasetFormat::kTokens);
  ASSERT_EQ(ds->num_samples(), (1000 - 64) / 16 + 1);
  EXPECT_EQ(ds->fields()[0].shape, std::vector<int64_t>{64});
  for (uint64_t i : {uint64_t{0}, uint64_t{5}, ds->num_samples() - 1}) {
    auto record = ds->read_record(i);
    ASSERT_EQ(record.size(), 128u);
    EXPECT_EQ(std::memcmp(record.data(), &tokens[i * 16], 128), 0) << "window " << i;
  }

  source.seq_len = 0;  // a file without seq_len: the error says what to set
  try {
    Dataset::open_source(source);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kConfig);
    EXPECT_NE(std::string(e.what()).find("dataset.seq_len"), std::string::npos) << e.what();
  }
}

TEST(SourcesTest, FilesTreeLabelsAreTheFirstDirectoryAndAChangedFileIsNamed) {
  TempDir dir;
  const fs::path root = dir / "tree";
  // Nested as ImageNet-style trees often are: the class is the first directory under the root.
  const std::vector<std::pair<std::string, size_t>> files = {
      {"cat/train/a.jpg", 100}, {"cat/val/b.jpg", 7}, {"dog/d.jpg", 0}, {"dog/train/c.jpg", 4096}};
  for (size_t i = 0; i < files.size(); ++i)
    write_file(root / files[i].first, sample_bytes(i, 0, files[i].second));

  auto ds = open_auto(root);
  EXPECT_EQ(ds->format(), DatasetFormat::kFiles);
  EXPECT_EQ(ds->classes(), (std::vector<std::string>{"cat", "dog"}));
  ASSERT_EQ(ds->num_samples(), files.size());
  std::vector<std::span<const std::byte>> fields;
  for (uint64_t i = 0; i < ds->num_samples(); ++i) {  // listed in sorted path order
    EXPECT_EQ(index::sample_file(*ds, i), files[i].first);
    EXPECT_EQ(ds->sample_key(i), files[i].first);
    auto record = ds->read_record(i);
    EXPECT_EQ(record, sample_bytes(i, 0, files[i].second)) << files[i].first;
    ASSERT_TRUE(index::split_record(*ds, i, record, fields).ok()) << i;
    int64_t label;
    std::memcpy(&label, fields[1].data(), sizeof label);
    EXPECT_EQ(label, i < 2 ? 0 : 1) << files[i].first;
  }
  EXPECT_TRUE(ds->verify().empty());

  write_file(root / "cat/val/b.jpg", sample_bytes(9, 0, 9));  // grew after the listing
  auto problems = ds->verify();
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_NE(problems[0].find("cat/val/b.jpg"), std::string::npos) << problems[0];
  EXPECT_NE(problems[0].find("size changed since the tree was listed"), std::string::npos)
      << problems[0];
}

TEST(SourcesTest, CompressedTarShardsAreNamedAsSuchNotAsDamage) {
  TempDir dir;
  const std::vector<std::byte> gzip = {std::byte{0x1f}, std::byte{0x8b}, std::byte{8},
                                       std::byte{0},    std::byte{0},    std::byte{0},
                                       std::byte{0},    std::byte{0},    std::byte{0}};
  write_file(dir / "shards" / "shard-000.tar.gz", gzip);
  for (const fs::path& p : {dir / "shards", dir / "shards" / "shard-000.tar.gz"}) {
    try {
      DatasetOptions source;
      source.path = p;
      source.format = p.extension() == ".gz" ? DatasetFormat::kTar : DatasetFormat::kAuto;
      Dataset::open_source(source);
      FAIL() << p;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kUnsupported) << e.what();
      EXPECT_NE(std::string(e.what()).find("compressed tar"), std::string::npos) << e.what();
    }
  }
  // Named .tar, but gzip inside.
  write_file(dir / "lying" / "shard-000.tar", gzip);
  try {
    open_auto(dir / "lying");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("a gzip-compressed tar"), std::string::npos) << e.what();
  }
}

TEST(SourcesTest, TarShardsFromGnuTarGroupMembersBySampleKey) {
  TempDir dir;
  const fs::path members = dir / "members", shards = dir / "shards";
  fs::create_directories(shards);
  constexpr int kSamples = 12;
  auto key_of = [](int i) { return fmt::format("s{:03d}", 100 + i); };
  for (int i = 0; i < kSamples; ++i) {
    write_file(members / (key_of(i) + ".bin"), sample_bytes(i, 0, 50 + 300 * i));
    write_file(members / (key_of(i) + ".cls"), bytes_of(std::to_string(i % 4)));
  }
  // Written by GNU tar, not by us: two shards of six samples, members sorted by name.
  for (int shard = 0; shard < 2; ++shard) {
    std::string cmd = fmt::format("tar -C '{}' --format=ustar -cf '{}'", members.string(),
                                  (shards / fmt::format("shard-{}.tar", shard)).string());
    for (int i = shard * 6; i < shard * 6 + 6; ++i)
      cmd += fmt::format(" {0}.bin {0}.cls", key_of(i));
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  }

  auto ds = open_auto(shards);
  EXPECT_EQ(ds->format(), DatasetFormat::kTar);
  ASSERT_EQ(ds->num_samples(), static_cast<uint64_t>(kSamples));
  ASSERT_EQ(ds->shards().size(), 2u);
  ASSERT_EQ(ds->fields().size(), 2u);
  EXPECT_EQ(ds->fields()[0].name, "bin");
  EXPECT_EQ(ds->fields()[1].name, "cls");
  EXPECT_EQ(ds->fields()[1].dtype, DType::kInt64);
  std::vector<std::span<const std::byte>> fields;
  for (uint64_t i = 0; i < ds->num_samples(); ++i) {
    auto record = ds->read_record(i);
    ASSERT_TRUE(index::split_record(*ds, i, record, fields).ok()) << i;
    auto want = sample_bytes(i, 0, 50 + 300 * i);
    EXPECT_TRUE(std::equal(fields[0].begin(), fields[0].end(), want.begin(), want.end()))
        << "sample " << i;
    int64_t label;
    std::memcpy(&label, fields[1].data(), sizeof label);
    EXPECT_EQ(label, static_cast<int64_t>(i % 4));
    EXPECT_EQ(ds->sample_key(i), key_of(static_cast<int>(i)));
  }
  // Opened again: from the cached index, keys included.
  auto cached = open_auto(shards);
  EXPECT_EQ(cached->sample_key(7), key_of(7));
  EXPECT_TRUE(ds->verify().empty());
  EXPECT_EQ(open_auto(shards / "shard-1.tar")->num_samples(), 6u);  // one .tar file

  // Cut the second shard inside its last member: verify names the shard and the sample.
  const fs::path cut = shards / "shard-1.tar";
  const auto last = ds->extent(kSamples - 1);
  fs::resize_file(cut, last.offset + 10);
  auto problems = ds->verify();
  ASSERT_FALSE(problems.empty());
  EXPECT_NE(problems[0].find("shard-1.tar"), std::string::npos) << problems[0];
  EXPECT_NE(problems[0].find("sample 11"), std::string::npos) << problems[0];
}

TEST(SourcesTest, AutoDetectionTellsEachFormatApart) {
  TempDir dir;
  testing::write_dataset(dir / "packed", 20, 100);
  EXPECT_EQ(open_auto(dir / "packed")->format(), DatasetFormat::kShards);
  EXPECT_TRUE(open_auto(dir / "packed")->packed());
  write_file(dir / "tree/a/x.bin", sample_bytes(0, 0, 10));
  EXPECT_EQ(open_auto(dir / "tree")->format(), DatasetFormat::kFiles);
  try {
    open_auto(dir / "nowhere");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound) << e.what();
  }
}

}  // namespace
}  // namespace sluice
