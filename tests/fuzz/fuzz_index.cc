// The sample index of a packed shard: a valid dataset whose shard's index entries (and the
// first data bytes) come from the input. Opening, extents, reads, record splits and verify must
// reject bad entries with an error, never read outside the shard.
#include <sluice/dataset.h>

#include "fuzz_common.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

using namespace sluice;
namespace fs = std::filesystem;

namespace {

struct Base {
  fs::path dir, shard;
  std::vector<char> bytes;  // the shard file as written
  uint64_t index_offset = 0, index_bytes = 0, data_offset = 0;
};

const Base& base() {
  static const Base b = [] {
    Base b;
    char tmpl[] = "/tmp/sluice-fuzz-index-XXXXXX";
    static const fs::path root = mkdtemp(tmpl);
    std::atexit([] { fs::remove_all(root); });
    b.dir = root / "ds";
    WriterOptions o;
    o.fields = {{"data", DType::kUInt8, {-1}}, {"label", DType::kInt64, {}}};
    auto w = DatasetWriter::create(b.dir, o);
    for (int i = 0; i < 8; ++i) {
      std::vector<std::byte> data(static_cast<size_t>(i) * 100 + 1, std::byte{7});
      int64_t label = i;
      std::span<const std::byte> fields[] = {data, std::as_bytes(std::span(&label, 1))};
      w->add(fields);
    }
    w->finish();
    auto ds = Dataset::open(b.dir);
    b.shard = ds->shards()[0].path;
    std::ifstream f(b.shard, std::ios::binary);
    b.bytes.assign(std::istreambuf_iterator<char>(f), {});
    SampleExtent first = ds->extent(0);
    b.data_offset = first.offset;
    b.index_bytes = 8 * 16;
    b.index_offset = b.bytes.size() - b.index_bytes;
    return b;
  }();
  return b;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Base& b = base();
  std::vector<char> shard = b.bytes;
  // The input's first bytes become the index entries, the rest the start of the data region.
  size_t n = std::min<size_t>(size, b.index_bytes);
  std::memcpy(shard.data() + b.index_offset, data, n);
  size_t rest = std::min<size_t>(size - n, b.index_offset - b.data_offset);
  std::memcpy(shard.data() + b.data_offset, data + n, rest);
  {
    std::ofstream f(b.shard, std::ios::binary | std::ios::trunc);
    f.write(shard.data(), static_cast<std::streamsize>(shard.size()));
  }
  fuzz::expect_only_errors([&] {
    auto ds = Dataset::open(b.dir);
    for (uint64_t i = 0; i < ds->num_samples(); ++i)
      fuzz::expect_only_errors([&] {
        SampleExtent x = ds->extent(i);
        if (x.offset + x.size > shard.size()) __builtin_trap();  // never outside the file
        auto record = ds->read_record(i);
        ds->parse_record(i, record);
      });
    ds->verify();
  });
  return 0;
}
