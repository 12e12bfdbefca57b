// The manifest, a shard header, and record splitting: the bytes of a packed dataset.
#include "format/layout.h"
#include "fuzz_common.h"

#include <cstring>

using namespace sluice;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto in = fuzz::bytes(data, size);
  fuzz::expect_only_errors([&] { format::decode_manifest(in, "fuzz/manifest.sluice"); });
  if (size >= sizeof(format::ShardHeader)) {
    format::ShardHeader h;
    std::memcpy(&h, data, sizeof h);
    fuzz::expect_only_errors([&] { format::validate_shard_header(h, "fuzz/shard"); });
    format::seal_shard_header(h);  // past the checksum: the consistency checks
    fuzz::expect_only_errors([&] { format::validate_shard_header(h, "fuzz/shard"); });
  }
  // A record of a schema with fixed and variable fields: split() must stay inside it.
  static const format::RecordLayout layout({{"a", DType::kUInt8, {-1}},
                                            {"b", DType::kInt64, {}},
                                            {"c", DType::kUInt8, {-1}},
                                            {"d", DType::kFloat32, {2, 3}}});
  std::vector<std::span<const std::byte>> fields;
  if (layout.split(in, fields).ok())
    for (auto f : fields)
      if (!f.empty() && (f.data() < in.data() || f.data() + f.size() > in.data() + in.size()))
        __builtin_trap();
  return 0;
}
