// The YAML config: every bad document is a config error naming the key, never a crash.
#include <sluice/options.h>

#include "fuzz_common.h"

#include <string_view>

using namespace sluice;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  fuzz::expect_only_errors([&] {
    LoaderOptions o = LoaderOptions::from_yaml_string(text, "fuzz.yaml", "/data");
    LoaderOptions::from_yaml_string(o.to_yaml(), "fuzz-roundtrip.yaml", "/data");
  });
  return 0;
}
