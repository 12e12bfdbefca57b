#pragma once

// A field's image transform (config `transforms:`), compiled from its steps: encoded JPEG / PNG
// / WebP bytes in, one fixed-shape tensor out, written straight into the sample's batch slot.
//
// The geometry (resize, center_crop, random_resized_crop, flip) is planned first on the
// image's header alone: every step becomes one rectangle of the source image and the output
// size. A JPEG is then decoded with libjpeg-turbo's DCT scaling at the smallest scale that
// still gives the rectangle at least the output's pixels (a 500 px image cropped to 224 decodes
// at 1/2 or less), the rectangle is cut out and resized once with OpenCV (INTER_AREA when it
// shrinks: an antialiased box filter; INTER_LINEAR when it grows), flipped, then normalized
// and laid out. Random choices come from (seed, epoch, sample index) alone: a sample gets the
// same crop on any number of ranks or threads and after any resume.

#include <sluice/dataset.h>
#include <sluice/options.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace sluice::transform {

class ImageTransform {
 public:
  /// Takes steps that config parsing checked (decode first, a fixed output size).
  explicit ImageTransform(const FieldTransform& spec);
  ImageTransform(const ImageTransform&) = delete;  // points into its own steps
  ImageTransform& operator=(const ImageTransform&) = delete;

  DType dtype() const { return dtype_; }
  /// [h, w, c] or [c, h, w] (layout: chw).
  const std::vector<int64_t>& shape() const { return shape_; }
  size_t output_bytes() const { return bytes_; }

  /// Decodes and transforms one encoded image into `out` (output_bytes() long). `key`
  /// (sample_key) seeds its random choices. Throws Error(kCorruption) saying what is wrong with
  /// the bytes (not a JPEG, PNG or WebP; damaged; truncated; too large); the caller names the
  /// sample.
  void apply(std::span<const std::byte> encoded, uint64_t key, std::span<std::byte> out) const;

 private:
  std::vector<TransformStep> steps_;
  bool gray_ = false;
  uint32_t height_ = 0, width_ = 0;  // of the output image
  const TransformStep* normalize_ = nullptr;
  bool chw_ = false;
  DType dtype_ = DType::kUInt8;
  std::vector<int64_t> shape_;
  size_t bytes_ = 0;
};

/// The seed of one sample's random choices in one epoch.
uint64_t sample_key(uint64_t seed, uint64_t epoch, uint64_t index);

}  // namespace sluice::transform
