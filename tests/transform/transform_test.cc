// Image transforms (src/transform) on images encoded here with libjpeg-turbo and libpng: exact
// pixels where the steps are lossless (a PNG cropped, mirrored, normalized, laid out CHW),
// JPEG's DCT-scaled decode against a full decode, damaged bytes refused, and a Loader over a
// files tree of JPEGs: the same bytes for a sample on 1 and 3 loader threads, a damaged file
// named by its path, or skipped and counted. tests/python/test_transforms.py compares with
// Pillow.

#include <sluice/loader.h>

#include "test_util.h"
#include "transform/image.h"

#include <fmt/format.h>
#include <png.h>
#include <turbojpeg.h>

#include <cmath>
#include <fstream>
#include <map>

namespace sluice {
namespace {

namespace fs = std::filesystem;
using testing::message_of;
using K = TransformStep::Kind;

// An RGB image of smooth gradients and waves, h x w, row-major.
std::vector<uint8_t> picture(int w, int h, int seed) {
  std::vector<uint8_t> p(static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      uint8_t* px = &p[(static_cast<size_t>(y) * w + x) * 3];
      px[0] = static_cast<uint8_t>(x * 255 / w);
      px[1] = static_cast<uint8_t>(y * 255 / h);
      px[2] = static_cast<uint8_t>(128 + 100 * std::sin(x / (9.0 + seed)) * std::cos(y / 13.0));
    }
  return p;
}

// TurboJPEG's encoding of `pixels` (TJPF_RGB: RGB; TJPF_CMYK: a YCCK JPEG, Adobe's way).
std::vector<std::byte> jpeg(const std::vector<uint8_t>& pixels, int w, int h,
                            TJPF format = TJPF_RGB, TJSAMP subsamp = TJSAMP_420) {
  tjhandle t = tjInitCompress();
  unsigned char* out = nullptr;
  unsigned long size = 0;
  EXPECT_EQ(tjCompress2(t, pixels.data(), w, 0, h, format, &out, &size, subsamp, 95, 0), 0);
  std::vector<std::byte> v(reinterpret_cast<std::byte*>(out),
                           reinterpret_cast<std::byte*>(out) + size);
  tjFree(out);
  tjDestroy(t);
  return v;
}

std::vector<std::byte> png(const std::vector<uint8_t>& rgb, int w, int h) {
  png_image img{};
  img.version = PNG_IMAGE_VERSION;
  img.width = static_cast<png_uint_32>(w);
  img.height = static_cast<png_uint_32>(h);
  img.format = PNG_FORMAT_RGB;
  png_alloc_size_t size = 0;
  EXPECT_TRUE(png_image_write_to_memory(&img, nullptr, &size, 0, rgb.data(), 0, nullptr));
  std::vector<std::byte> v(size);
  EXPECT_TRUE(png_image_write_to_memory(&img, v.data(), &size, 0, rgb.data(), 0, nullptr));
  v.resize(size);
  return v;
}

FieldTransform steps(std::vector<TransformStep> s) { return {"img", std::move(s)}; }
TransformStep decode() { return {}; }
TransformStep step(K kind, uint32_t h = 0, uint32_t w = 0) {
  TransformStep s;
  s.kind = kind;
  s.height = h;
  s.width = w;
  return s;
}

std::vector<std::byte> run(const transform::ImageTransform& t, std::span<const std::byte> in,
                           uint64_t key = 1) {
  std::vector<std::byte> out(t.output_bytes());
  t.apply(in, key, out);
  return out;
}

TEST(TransformTest, APngCroppedMirroredNormalizedAndLaidOutExactly) {
  const int w = 101, h = 77;
  auto rgb = picture(w, h, 0);
  auto encoded = png(rgb, w, h);
  // center_crop [40, 50]: rows 18.5 -> 18 (halves round to even), columns 25.5 -> 26.
  transform::ImageTransform crop(steps({decode(), step(K::kCenterCrop, 40, 50)}));
  EXPECT_EQ(crop.shape(), (std::vector<int64_t>{40, 50, 3}));
  EXPECT_EQ(crop.dtype(), DType::kUInt8);
  auto out = run(crop, encoded);
  auto at = [&](const std::vector<std::byte>& o, int y, int x, int c) {
    return static_cast<int>(o[(static_cast<size_t>(y) * 50 + x) * 3 + c]);
  };
  auto src = [&](int y, int x, int c) {
    return static_cast<int>(rgb[(static_cast<size_t>(y) * w + x) * 3 + c]);
  };
  for (int y = 0; y < 40; ++y)
    for (int x = 0; x < 50; ++x)
      for (int c = 0; c < 3; ++c)
        ASSERT_EQ(at(out, y, x, c), src(18 + y, 26 + x, c)) << y << "," << x;

  TransformStep flip = step(K::kFlip);
  flip.p = 1.0;
  // Mirrored first, then cropped: the crop is of the mirrored image.
  transform::ImageTransform flip_then_crop(steps({decode(), flip, step(K::kCenterCrop, 40, 50)}));
  auto mirrored = run(flip_then_crop, encoded);
  for (int y = 0; y < 40; ++y)
    for (int x = 0; x < 50; ++x)
      for (int c = 0; c < 3; ++c)
        ASSERT_EQ(at(mirrored, y, x, c), src(18 + y, w - 1 - (26 + x), c)) << y << "," << x;
  TransformStep norm = step(K::kNormalize);
  norm.mean = {0.5, 0.25, 0.0};
  norm.std = {0.5, 0.25, 1.0};
  TransformStep chw = step(K::kLayout);
  chw.chw = true;
  transform::ImageTransform all(steps({decode(), step(K::kCenterCrop, 40, 50), flip, norm, chw}));
  EXPECT_EQ(all.shape(), (std::vector<int64_t>{3, 40, 50}));
  EXPECT_EQ(all.dtype(), DType::kFloat32);
  auto f = run(all, encoded);
  const float* v = reinterpret_cast<const float*>(f.data());
  for (int c = 0; c < 3; ++c)
    for (int y = 0; y < 40; ++y)
      for (int x = 0; x < 50; ++x) {
        const double want = (src(18 + y, 26 + 49 - x, c) / 255.0 - norm.mean[c]) / norm.std[c];
        ASSERT_NEAR(v[(c * 40 + y) * 50 + x], want, 1e-5) << c << "," << y << "," << x;
      }
}

TEST(TransformTest, JpegDecodesScaledAsCloseAsAFullDecode) {
  const int w = 640, h = 480;
  auto encoded = jpeg(picture(w, h, 3), w, h);
  // Resized to 80 x 60: libjpeg-turbo decodes at 1/8 (80 x 60) straight away.
  transform::ImageTransform small(steps({decode(), step(K::kResize, 60, 80)}));
  auto scaled = run(small, encoded);
  // The same from a full decode: a crop of the whole image (no scaling possible), then resized.
  transform::ImageTransform full(
      steps({decode(), step(K::kCenterCrop, h, w), step(K::kResize, 60, 80)}));
  auto reference = run(full, encoded);
  ASSERT_EQ(scaled.size(), reference.size());
  double diff = 0;
  for (size_t i = 0; i < scaled.size(); ++i)
    diff += std::abs(static_cast<int>(scaled[i]) - static_cast<int>(reference[i]));
  EXPECT_LT(diff / static_cast<double>(scaled.size()), 2.0);
}

TEST(TransformTest, AYcckJpegDecodesToRgbAsPillowConvertsCmyk) {
  // TurboJPEG writes CMYK pixels as a YCCK JPEG with Adobe's marker (Photoshop's way: the
  // stored CMYK is inverted, 255 meaning no ink). What it decodes back, converted as Pillow
  // converts CMYK (R = (255 - C)(255 - K) / 255 of the ink), is what the transform must give.
  const int w = 96, h = 64;
  std::vector<uint8_t> cmyk(static_cast<size_t>(w) * h * 4);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      uint8_t* px = &cmyk[(static_cast<size_t>(y) * w + x) * 4];
      px[0] = static_cast<uint8_t>(x * 255 / w);
      px[1] = static_cast<uint8_t>(y * 255 / h);
      px[2] = static_cast<uint8_t>(128 + 100 * std::sin(x / 7.0));
      px[3] = static_cast<uint8_t>(200 + 50 * std::cos(y / 11.0));
    }
  auto encoded = jpeg(cmyk, w, h, TJPF_CMYK, TJSAMP_444);
  auto* bytes = reinterpret_cast<unsigned char*>(encoded.data());
  tjhandle d = tjInitDecompress();
  int hw = 0, hh = 0, subsamp = 0, colorspace = -1;
  ASSERT_EQ(tjDecompressHeader3(d, bytes, encoded.size(), &hw, &hh, &subsamp, &colorspace), 0);
  EXPECT_EQ(colorspace, TJCS_YCCK);
  std::vector<uint8_t> stored(cmyk.size());
  ASSERT_EQ(tjDecompress2(d, bytes, encoded.size(), stored.data(), w, 0, h, TJPF_CMYK, 0), 0);
  tjDestroy(d);
  transform::ImageTransform rgb(steps({decode(), step(K::kCenterCrop, h, w)}));
  auto got = run(rgb, encoded);
  ASSERT_EQ(got.size(), static_cast<size_t>(w) * h * 3);
  int worst = 0;
  for (size_t i = 0; i < static_cast<size_t>(w) * h; ++i)
    for (int c = 0; c < 3; ++c) {  // inverted storage: the ink is 255 - stored
      const int want = (stored[i * 4 + c] * stored[i * 4 + 3] + 127) / 255;
      worst = std::max(worst, std::abs(static_cast<int>(got[i * 3 + c]) - want));
    }
  EXPECT_LE(worst, 1);
}

TEST(TransformTest, DamagedBytesAreRefused) {
  const int w = 64, h = 48;
  auto good = jpeg(picture(w, h, 1), w, h);
  transform::ImageTransform t(steps({decode(), step(K::kCenterCrop, 32, 32)}));
  std::vector<std::byte> out(t.output_bytes());
  ErrorCode code{};
  auto cut = std::span(good).first(good.size() / 2);
  EXPECT_NE(message_of([&] { t.apply(cut, 1, out); }, &code).find("JPEG: "), std::string::npos);
  EXPECT_EQ(code, ErrorCode::kCorruption);
  std::vector<std::byte> garbage(100, std::byte{7});
  EXPECT_NE(message_of([&] { t.apply(garbage, 1, out); }).find("not a JPEG, PNG or WebP"),
            std::string::npos);
  EXPECT_NE(message_of([&] { t.apply({}, 1, out); }).find("empty"), std::string::npos);
}

void write_file(const fs::path& p, std::span<const std::byte> bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()),
             static_cast<std::streamsize>(bytes.size()));
}

LoaderOptions tree_options(const fs::path& root, uint32_t threads) {
  LoaderOptions o;
  o.dataset.path = root;
  o.batch_size = 4;
  o.seed = 11;
  o.io.threads = threads;
  TransformStep rrc = step(K::kRandomResizedCrop, 48, 64);
  TransformStep flip = step(K::kFlip);
  o.transforms = {steps({decode(), rrc, flip})};
  o.transforms[0].field = "data";
  return o;
}

std::map<uint64_t, std::vector<std::byte>> epoch(Loader& loader, uint64_t* skipped = nullptr) {
  std::map<uint64_t, std::vector<std::byte>> out;
  while (auto b = loader.next()) {
    FieldView f = b->field("data");
    EXPECT_EQ(f.shape, (std::vector<int64_t>{static_cast<int64_t>(b->size()), 48, 64, 3}));
    for (size_t i = 0; i < b->size(); ++i)
      if (!b->padding()[i]) out[b->indices()[i]].assign(f.sample(i).begin(), f.sample(i).end());
  }
  if (skipped) *skipped = loader.stats().transform_skipped;
  return out;
}

TEST(TransformTest, ALoaderTransformsInItsThreadsTheSameOnAnyThreadCount) {
  testing::TempDir tmp;
  const fs::path root = tmp / "tree";
  for (int i = 0; i < 16; ++i) {
    const int w = 120 + 7 * i, h = 90 + 5 * i;
    write_file(root / (i % 2 ? "cat" : "dog") / fmt::format("{:02d}.jpg", i),
               jpeg(picture(w, h, i), w, h));
  }
  auto one = Loader::open(tree_options(root, 1));
  auto three = Loader::open(tree_options(root, 3));
  auto a = epoch(*one), b = epoch(*three);
  ASSERT_EQ(a.size(), 16u);
  EXPECT_EQ(a, b);
  EXPECT_NE(epoch(*one), a);  // the next epoch crops anew

  // A damaged file: named, or (skip) zeros marked as padding and counted.
  write_file(root / "dog" / "04.jpg", std::vector<std::byte>(300, std::byte{0xFF}));
  std::string m = message_of([&] { epoch(*Loader::open(tree_options(root, 2))); });
  EXPECT_NE(m.find("dog/04.jpg: sample"), std::string::npos) << m;
  auto o = tree_options(root, 2);
  o.transform_errors = TransformErrors::kSkip;
  uint64_t skipped = 0;
  auto rest = epoch(*Loader::open(o), &skipped);
  EXPECT_EQ(rest.size(), 15u);
  EXPECT_EQ(skipped, 1u);
}

}  // namespace
}  // namespace sluice
