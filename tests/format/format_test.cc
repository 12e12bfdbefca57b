// Round trips through DatasetWriter and Dataset, record placement, and atomic publishing.

#include "format/layout.h"
#include "test_util.h"

#include <xxhash.h>  // the plain (portable) entry points: the reference for the format

#include <cstring>

namespace sluice {
namespace {

using testing::TempDir;

std::span<const std::byte> as_span(const std::vector<std::byte>& v) { return v; }

TEST(Format, RoundTripVariableAndFixedFields) {
  TempDir tmp;
  auto written = testing::write_dataset(tmp / "ds", 1000, 9000);
  auto ds = Dataset::open(tmp / "ds");
  ASSERT_EQ(ds->num_samples(), 1000u);
  EXPECT_GT(ds->shards().size(), 10u);
  EXPECT_EQ(ds->fields().size(), 2u);
  EXPECT_EQ(ds->fields()[0].name, "data");
  EXPECT_EQ(ds->fields()[1].dtype, DType::kInt64);
  uint64_t total = 0, first = 0;
  for (const auto& s : ds->shards()) {
    EXPECT_EQ(s.first_sample, first);
    first += s.num_samples;
  }
  EXPECT_EQ(first, 1000u);
  for (uint64_t i = 0; i < 1000; ++i) {
    auto record = ds->read_record(i);
    auto fields = ds->parse_record(i, record);
    ASSERT_EQ(fields.fields.size(), 2u);
    ASSERT_EQ(fields.fields[0].size(), written[i].size()) << "sample " << i;
    EXPECT_TRUE(std::equal(written[i].begin(), written[i].end(), fields.fields[0].begin()));
    int64_t label;
    std::memcpy(&label, fields.fields[1].data(), 8);
    EXPECT_EQ(label, static_cast<int64_t>(i % 10));
    total += record.size();
  }
  EXPECT_EQ(total, ds->total_bytes());
  EXPECT_TRUE(ds->verify().empty());
}

TEST(Format, ManyVariableFieldsKeepTheirLengths) {
  TempDir tmp;
  WriterOptions options;
  options.fields = {{"a", DType::kUInt8, {-1}},
                    {"b", DType::kFloat32, {2, 3}},
                    {"c", DType::kInt32, {-1}},
                    {"d", DType::kUInt16, {-1, 2}}};
  auto writer = DatasetWriter::create(tmp / "ds", options);
  std::vector<std::vector<std::vector<std::byte>>> samples;
  for (uint64_t i = 0; i < 200; ++i) {
    std::vector<std::vector<std::byte>> f = {
        testing::sample_bytes(i, 0, i % 17), testing::sample_bytes(i, 1, 24),
        testing::sample_bytes(i, 2, 4 * (i % 5)), testing::sample_bytes(i, 3, 4 * (i % 3))};
    std::vector<std::span<const std::byte>> spans(f.begin(), f.end());
    writer->add(spans);
    samples.push_back(std::move(f));
  }
  writer->finish();
  auto ds = Dataset::open(tmp / "ds");
  EXPECT_EQ(ds->fields(), options.fields);
  for (uint64_t i = 0; i < 200; ++i) {
    auto record = ds->read_record(i);
    auto fields = ds->parse_record(i, record).fields;
    ASSERT_EQ(fields.size(), 4u);
    for (size_t f = 0; f < 4; ++f) {
      ASSERT_EQ(fields[f].size(), samples[i][f].size()) << "sample " << i << " field " << f;
      EXPECT_TRUE(std::equal(fields[f].begin(), fields[f].end(), samples[i][f].begin()));
    }
  }
}

TEST(Format, WriterRejectsSamplesThatDoNotFitTheSchema) {
  TempDir tmp;
  WriterOptions options;
  options.fields = {{"x", DType::kFloat32, {4}}, {"y", DType::kInt32, {-1}}};
  auto writer = DatasetWriter::create(tmp / "ds", options);
  std::vector<std::byte> ok16(16), bad15(15), odd(3);
  std::span<const std::byte> wrong_fixed[] = {as_span(bad15), as_span(ok16)};
  try {
    writer->add(wrong_fixed);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("field \"x\""), std::string::npos) << e.what();
  }
  std::span<const std::byte> partial_element[] = {as_span(ok16), as_span(odd)};
  EXPECT_THROW(writer->add(partial_element), Error);
  std::span<const std::byte> too_few[] = {as_span(ok16)};
  EXPECT_THROW(writer->add(too_few), Error);
}

TEST(Format, BadSchemasAreRejected) {
  TempDir tmp;
  WriterOptions none;
  EXPECT_THROW(DatasetWriter::create(tmp / "a", none), Error);
  WriterOptions dup;
  dup.fields = {{"x", DType::kUInt8, {-1}}, {"x", DType::kUInt8, {-1}}};
  EXPECT_THROW(DatasetWriter::create(tmp / "b", dup), Error);
  WriterOptions align;
  align.fields = {{"x", DType::kUInt8, {-1}}};
  align.alignment = 3000;
  EXPECT_THROW(DatasetWriter::create(tmp / "c", align), Error);
}

TEST(Format, RecordsOccupyTheFewestAlignedBlocks) {
  for (uint32_t align : {512u, 4096u}) {
    TempDir tmp;
    testing::write_dataset(tmp / "ds", 3000, 3 * align, 1 << 20, align);
    auto ds = Dataset::open(tmp / "ds");
    uint64_t prev_end = 0;
    uint32_t prev_shard = 0;
    for (uint64_t i = 0; i < ds->num_samples(); ++i) {
      SampleExtent x = ds->extent(i);
      if (x.size == 0) continue;
      uint64_t first_block = x.offset / align, last_block = (x.offset + x.size - 1) / align;
      EXPECT_EQ(last_block - first_block + 1, (x.size + align - 1) / align)
          << "sample " << i << " at " << x.offset << "+" << x.size;
      if (x.shard == prev_shard) {
        EXPECT_GE(x.offset, prev_end) << "records overlap";
      }
      prev_end = x.offset + x.size;
      prev_shard = x.shard;
    }
  }
}

TEST(Format, PlaceRecordRule) {
  EXPECT_EQ(format::place_record(4096, 100, 4096), 4096u);
  EXPECT_EQ(format::place_record(4100, 4000, 4096), 4100u);
  EXPECT_EQ(format::place_record(4200, 4000, 4096), 8192u);  // would straddle
  EXPECT_EQ(format::place_record(4097, 4096, 4096), 8192u);  // exactly one block: align
  EXPECT_EQ(format::place_record(4097, 9000, 4096), 4097u);  // 3 blocks either way
  EXPECT_EQ(format::place_record(8000, 9000, 4096), 8192u);  // 4 blocks unless aligned
  EXPECT_EQ(format::place_record(5000, 0, 4096), 5000u);
}

TEST(Format, UnfinishedWriterLeavesNothing) {
  TempDir tmp;
  {
    WriterOptions options;
    options.fields = {{"data", DType::kUInt8, {-1}}};
    options.shard_bytes = 1024;
    auto writer = DatasetWriter::create(tmp / "ds", options);
    std::vector<std::byte> data(3000);
    std::span<const std::byte> fields[] = {as_span(data)};
    for (int i = 0; i < 10; ++i) writer->add(fields);
    // Before finish() only a hidden staging directory exists, and it has no manifest.
    EXPECT_FALSE(std::filesystem::exists(tmp / "ds"));
    int entries = 0;
    for (const auto& e : std::filesystem::directory_iterator(tmp.path())) {
      ++entries;
      EXPECT_TRUE(e.path().filename().string().starts_with(".ds.partial-"));
      EXPECT_FALSE(std::filesystem::exists(e.path() / "manifest.sluice"));
    }
    EXPECT_EQ(entries, 1);
  }
  EXPECT_TRUE(std::filesystem::is_empty(tmp.path()));
  EXPECT_THROW(Dataset::open(tmp / "ds"), Error);
}

TEST(Format, ExistingDestinationNeedsOverwrite) {
  TempDir tmp;
  testing::write_dataset(tmp / "ds", 10, 100);
  WriterOptions options;
  options.fields = {{"data", DType::kUInt8, {-1}}, {"label", DType::kInt64, {}}};
  EXPECT_THROW(DatasetWriter::create(tmp / "ds", options), Error);
  testing::write_dataset(tmp / "other", 5, 100);
  options.overwrite = true;
  auto writer = DatasetWriter::create(tmp / "ds", options);
  writer->finish();
  EXPECT_EQ(Dataset::open(tmp / "ds")->num_samples(), 0u);
  EXPECT_EQ(Dataset::open(tmp / "other")->num_samples(), 5u);
}

TEST(Format, EmptyAndZeroLengthSamples) {
  TempDir tmp;
  auto written = testing::write_dataset(tmp / "ds", 50, 0);  // every data field is empty
  auto ds = Dataset::open(tmp / "ds");
  for (uint64_t i = 0; i < 50; ++i) {
    auto record = ds->read_record(i);
    EXPECT_EQ(ds->parse_record(i, record).fields[0].size(), 0u);
  }
  EXPECT_TRUE(ds->verify().empty());
}

TEST(Format, ExtentOutOfRangeIsAnError) {
  TempDir tmp;
  testing::write_dataset(tmp / "ds", 10, 100);
  auto ds = Dataset::open(tmp / "ds");
  EXPECT_THROW(ds->extent(10), Error);
}

TEST(Format, ManifestRoundTrip) {
  format::Manifest m;
  m.alignment = 512;
  m.dataset_id = 0x1234;
  m.num_samples = 7;
  m.total_bytes = 99;
  m.fields = {{"img", DType::kUInt8, {3, -1, -1}}, {"y", DType::kInt64, {}}};
  m.classes = {"a", "b"};
  m.shards = {{"s0", 3, 5000}, {"s1", 4, 6000}};
  auto bytes = format::encode_manifest(m);
  auto back = format::decode_manifest(bytes, "m");
  EXPECT_EQ(back.fields, m.fields);
  EXPECT_EQ(back.classes, m.classes);
  ASSERT_EQ(back.shards.size(), 2u);
  EXPECT_EQ(back.shards[1].name, "s1");
  EXPECT_EQ(back.num_samples, 7u);
  // Any truncation is an error, never a crash.
  for (size_t n = 0; n < bytes.size(); ++n)
    EXPECT_THROW(format::decode_manifest(std::span(bytes).first(n), "m"), Error) << n;
}

// The stored checksums are XXH3-64 (low 32 bits for records, seeded with the global index):
// whatever SIMD path computes them must give the portable function's values, or datasets
// written on one machine would fail their checks on another.
TEST(Format, ChecksumsAreTheReferenceXXH3) {
  std::vector<std::byte> data((1 << 20) + 64);
  uint64_t x = 0x9e3779b97f4a7c15;
  for (auto& b : data) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    b = static_cast<std::byte>(x);
  }
  for (size_t size : {0, 1, 3, 16, 17, 128, 129, 240, 241, 1000, 4096, 65536, 1 << 20})
    for (size_t at : {0, 1, 7, 64}) {
      const std::byte* p = data.data() + at;
      for (uint64_t seed : {uint64_t{0}, uint64_t{12345678901}}) {
        ASSERT_EQ(format::checksum64(p, size, seed), XXH3_64bits_withSeed(p, size, seed))
            << size << " bytes at +" << at;
        ASSERT_EQ(format::record_checksum(p, size, seed),
                  static_cast<uint32_t>(XXH3_64bits_withSeed(p, size, seed)));
      }
    }
}

TEST(Format, DTypeNames) {
  for (int i = 0; i <= 12; ++i) {
    auto d = static_cast<DType>(i);
    EXPECT_EQ(dtype_from_name(dtype_name(d)), d);
    EXPECT_GT(dtype_size(d), 0u);
  }
  EXPECT_FALSE(dtype_from_name("complex64").has_value());
}

}  // namespace
}  // namespace sluice
