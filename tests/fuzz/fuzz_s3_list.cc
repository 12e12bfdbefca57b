// A ListObjectsV2 response page and an S3 error document: the bytes an S3 server sends.
#include "fuzz_common.h"
#include "source/detail/s3.h"
#include "source/source.h"

#include <string_view>

using namespace sluice;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view xml(reinterpret_cast<const char*>(data), size);
  auto page = source::parse_list_page(xml);
  if (page.ok()) {
    if (page->truncated && page->next_token.empty()) __builtin_trap();
    for (const source::Object& o : page->objects)
      if (o.key.empty()) __builtin_trap();
  } else if (page.error().empty()) {
    __builtin_trap();  // a failure says why
  }
  fuzz::expect_only_errors([&] { (void)source::detail::parse_error_body(xml); });
  return 0;
}
