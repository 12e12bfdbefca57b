// Encoded images as a tar member or a file brings them: the decode transform's header reads
// (JPEG, PNG, WebP), its own walk of a JPEG's markers (Adobe's APP14 for CMYK), the decoders.
#include "fuzz_common.h"
#include "transform/image.h"

#include <vector>

using namespace sluice;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const transform::ImageTransform* t = [] {
    FieldTransform spec{"img", {}};
    TransformStep decode;  // the default step: decode to RGB
    TransformStep crop;
    crop.kind = TransformStep::Kind::kCenterCrop;
    crop.height = crop.width = 16;
    spec.steps = {decode, crop};
    return new transform::ImageTransform(spec);
  }();
  std::vector<std::byte> out(t->output_bytes());
  fuzz::expect_only_errors([&] { t->apply(fuzz::bytes(data, size), 1, out); });
  return 0;
}
