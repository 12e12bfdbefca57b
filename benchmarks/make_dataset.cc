// Writes a packed dataset of N samples with one fixed-size uint8 field "data" of SIZE random
// bytes, for the IO benchmarks (a directory of millions of small files would take longer to
// make than to read).
//   make_dataset DIR N SIZE [SHARD_BYTES]

#include <sluice/sluice.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s DIR N SIZE [SHARD_BYTES]\n", argv[0]);
    return 2;
  }
  uint64_t n = std::stoull(argv[2]), size = std::stoull(argv[3]);
  sluice::WriterOptions o;
  o.fields = {{"data", sluice::DType::kUInt8, {static_cast<int64_t>(size)}}};
  o.shard_bytes = argc > 4 ? std::stoull(argv[4]) : 256ull << 20;
  o.overwrite = true;
  try {
    auto writer = sluice::DatasetWriter::create(argv[1], o);
    std::vector<uint64_t> words((size + 7) / 8);
    std::mt19937_64 rng(1);
    for (uint64_t i = 0; i < n; ++i) {
      for (auto& w : words) w = rng();
      std::span<const std::byte> fields[] = {std::as_bytes(std::span(words)).first(size)};
      writer->add(fields);
    }
    writer->finish();
  } catch (const sluice::Error& e) {
    std::fprintf(stderr, "make_dataset: %s\n", e.what());
    return 1;
  }
  return 0;
}
