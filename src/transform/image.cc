#include "transform/image.h"

#include <sluice/error.h>

#include "common/errors.h"

#include <png.h>
#include <turbojpeg.h>
#include <webp/decode.h>

#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>

namespace sluice::transform {

using detail::fail;
using K = TransformStep::Kind;

namespace {

// Images larger than this (after JPEG scaling) are refused: a few bytes can claim a huge image.
constexpr uint64_t kMaxPixels = uint64_t{1} << 28;

uint64_t mix(uint64_t x) {  // splitmix64's finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A sample's random stream: the same numbers on every machine and library version.
class Random {
 public:
  explicit Random(uint64_t key) : state_(key) {}
  double uniform(double lo, double hi) {  // [lo, hi)
    state_ = mix(state_);
    return lo + (hi - lo) * static_cast<double>(state_ >> 11) * 0x1p-53;
  }
  int64_t integer(int64_t lo, int64_t hi) {  // [lo, hi]
    state_ = mix(state_);
    return lo + static_cast<int64_t>(state_ % static_cast<uint64_t>(hi - lo + 1));
  }

 private:
  uint64_t state_;
};

enum class Format { kJpeg, kPng, kWebp };

Format sniff(std::span<const std::byte> b) {
  auto at = [&](size_t i) { return i < b.size() ? static_cast<uint8_t>(b[i]) : 0; };
  if (at(0) == 0xFF && at(1) == 0xD8 && at(2) == 0xFF) return Format::kJpeg;
  if (b.size() >= 8 && std::memcmp(b.data(), "\x89PNG\r\n\x1a\n", 8) == 0) return Format::kPng;
  if (b.size() >= 12 && std::memcmp(b.data(), "RIFF", 4) == 0 &&
      std::memcmp(b.data() + 8, "WEBP", 4) == 0)
    return Format::kWebp;
  fail(ErrorCode::kCorruption, "not a JPEG, PNG or WebP image ({} bytes{})", b.size(),
       b.empty() ? ": empty" : "");
}

struct TjDeleter {
  void operator()(void* h) const { tjDestroy(h); }
};

// This thread's decompressor.
tjhandle jpeg_handle() {
  thread_local std::unique_ptr<void, TjDeleter> handle(tjInitDecompress());
  if (!handle) fail(ErrorCode::kIo, "libjpeg-turbo: cannot make a decompressor");
  return handle.get();
}

std::string jpeg_error(tjhandle h) { return tjGetErrorStr2(h); }

struct Dims {
  int width = 0, height = 0;
  bool cmyk = false;  // a JPEG stored as CMYK or YCCK (print files, Photoshop's)
};

// Whether a JPEG carries Adobe's APP14 marker: Photoshop (and libjpeg, Pillow) store CMYK
// inverted under it (255: no ink), as Pillow reads it. Walks the marker segments up to the scan.
bool adobe_marker(std::span<const std::byte> b) {
  const auto* p = reinterpret_cast<const unsigned char*>(b.data());
  const size_t n = b.size();
  size_t at = 2;  // past SOI
  while (at + 4 <= n && p[at] == 0xFF) {
    const unsigned char marker = p[at + 1];
    if (marker == 0xFF) {  // fill byte
      ++at;
      continue;
    }
    if (marker == 0xDA || marker == 0xD9) break;  // start of scan, end of image
    const size_t length = (size_t{p[at + 2]} << 8) | p[at + 3];
    if (length < 2 || at + 2 + length > n) break;
    if (marker == 0xEE && length >= 2 + 5 && std::memcmp(p + at + 4, "Adobe", 5) == 0) return true;
    at += 2 + length;
  }
  return false;
}

// CMYK as libjpeg gives it to RGB as Pillow converts it: R = (255 - C)(255 - K) / 255, with
// C and K as ink (inverted first under Adobe's marker).
cv::Mat cmyk_to_rgb(const cv::Mat& cmyk, bool inverted) {
  cv::Mat rgb(cmyk.rows, cmyk.cols, CV_8UC3);
  auto mul255 = [](int a, int b) {  // a * b / 255, rounded
    const int t = a * b + 128;
    return static_cast<unsigned char>((t + (t >> 8)) >> 8);
  };
  for (int y = 0; y < cmyk.rows; ++y) {
    const unsigned char* in = cmyk.ptr<unsigned char>(y);
    unsigned char* out = rgb.ptr<unsigned char>(y);
    for (int x = 0; x < cmyk.cols; ++x, in += 4, out += 3) {
      const int k = inverted ? in[3] : 255 - in[3];  // 255 - ink
      for (int c = 0; c < 3; ++c) out[c] = mul255(inverted ? in[c] : 255 - in[c], k);
    }
  }
  return rgb;
}

Dims header(Format f, std::span<const std::byte> b) {
  Dims d;
  const auto* p = reinterpret_cast<const unsigned char*>(b.data());
  switch (f) {
    case Format::kJpeg: {
      int subsamp = 0, colorspace = 0;
      if (tjDecompressHeader3(jpeg_handle(), p, b.size(), &d.width, &d.height, &subsamp,
                              &colorspace) != 0)
        fail(ErrorCode::kCorruption, "JPEG: {}", jpeg_error(jpeg_handle()));
      d.cmyk = colorspace == TJCS_CMYK || colorspace == TJCS_YCCK;
      break;
    }
    case Format::kPng: {
      png_image img{};
      img.version = PNG_IMAGE_VERSION;
      if (!png_image_begin_read_from_memory(&img, p, b.size()))
        fail(ErrorCode::kCorruption, "PNG: {}", img.message);
      d = {static_cast<int>(img.width), static_cast<int>(img.height)};
      png_image_free(&img);
      break;
    }
    case Format::kWebp:
      if (!WebPGetInfo(p, b.size(), &d.width, &d.height))
        fail(ErrorCode::kCorruption, "WebP: not a valid header");
      break;
  }
  if (d.width <= 0 || d.height <= 0)
    fail(ErrorCode::kCorruption, "image of {}x{} pixels", d.width, d.height);
  return d;
}

// Decodes at (about) `scale` of the full size where the codec can (JPEG's DCT scaling: n/8),
// else at full size.
cv::Mat decode(Format f, std::span<const std::byte> b, Dims full, bool gray, double scale) {
  const auto* p = reinterpret_cast<const unsigned char*>(b.data());
  switch (f) {
    case Format::kJpeg: {
      int n = 0;
      tjscalingfactor* factors = tjGetScalingFactors(&n);
      tjscalingfactor best{1, 1};
      for (int i = 0; i < n; ++i) {  // the smallest factor >= scale, at most 1
        const tjscalingfactor s = factors[i];
        const double v = static_cast<double>(s.num) / s.denom;
        if (v <= 1.0 && v >= scale && v < static_cast<double>(best.num) / best.denom) best = s;
      }
      const int w = TJSCALED(full.width, best), h = TJSCALED(full.height, best);
      if (static_cast<uint64_t>(w) * static_cast<uint64_t>(h) > kMaxPixels)
        fail(ErrorCode::kCorruption, "JPEG of {}x{} pixels is too large", full.width, full.height);
      // libjpeg-turbo gives CMYK and YCCK files only as CMYK; the conversion is ours.
      cv::Mat m(h, w, full.cmyk ? CV_8UC4 : gray ? CV_8UC1 : CV_8UC3);
      const TJPF pixels = full.cmyk ? TJPF_CMYK : gray ? TJPF_GRAY : TJPF_RGB;
      // A damaged or truncated stream is an error, not a grey patch.
      if (tjDecompress2(jpeg_handle(), p, b.size(), m.data, w, static_cast<int>(m.step), h, pixels,
                        TJFLAG_STOPONWARNING) != 0)
        fail(ErrorCode::kCorruption, "JPEG: {}", jpeg_error(jpeg_handle()));
      if (!full.cmyk) return m;
      cv::Mat rgb = cmyk_to_rgb(m, adobe_marker(b));
      if (!gray) return rgb;
      cv::Mat g;
      cv::cvtColor(rgb, g, cv::COLOR_RGB2GRAY);
      return g;
    }
    case Format::kPng: {
      png_image img{};
      img.version = PNG_IMAGE_VERSION;
      if (!png_image_begin_read_from_memory(&img, p, b.size()))
        fail(ErrorCode::kCorruption, "PNG: {}", img.message);
      if (static_cast<uint64_t>(img.width) * img.height > kMaxPixels) {
        png_image_free(&img);
        fail(ErrorCode::kCorruption, "PNG of {}x{} pixels is too large", img.width, img.height);
      }
      // RGB (alpha composited onto black), then gray as Pillow and JPEG make it (0.299 R +
      // 0.587 G + 0.114 B of the stored values; libpng's own gray is of linear light).
      img.format = PNG_FORMAT_RGB;
      cv::Mat m(static_cast<int>(img.height), static_cast<int>(img.width), CV_8UC3);
      if (!png_image_finish_read(&img, nullptr, m.data, static_cast<png_int_32>(m.step), nullptr))
        fail(ErrorCode::kCorruption, "PNG: {}", img.message);
      if (!gray) return m;
      cv::Mat g;
      cv::cvtColor(m, g, cv::COLOR_RGB2GRAY);
      return g;
    }
    case Format::kWebp: {
      if (static_cast<uint64_t>(full.width) * static_cast<uint64_t>(full.height) > kMaxPixels)
        fail(ErrorCode::kCorruption, "WebP of {}x{} pixels is too large", full.width, full.height);
      cv::Mat rgb(full.height, full.width, CV_8UC3);
      if (!WebPDecodeRGBInto(p, b.size(), rgb.data, rgb.total() * 3, static_cast<int>(rgb.step)))
        fail(ErrorCode::kCorruption, "WebP: damaged or truncated");
      if (!gray) return rgb;
      cv::Mat g;
      cv::cvtColor(rgb, g, cv::COLOR_RGB2GRAY);
      return g;
    }
  }
  return {};
}

// The geometry of all steps at once: the output's pixels come from `rect` of the full-size
// source (which may reach outside it: a crop larger than the image pads with zeros), resized
// to width x height, then mirrored when `flip`.
struct Plan {
  double x0 = 0, y0 = 0, x1 = 0, y1 = 0;
  int width = 0, height = 0;
  bool flip = false;
};

// torchvision's RandomResizedCrop.get_params on a cur_w x cur_h image: (left, top, w, h).
std::array<int64_t, 4> random_crop(const TransformStep& s, int64_t W, int64_t H, Random& rnd) {
  const double area = static_cast<double>(W) * static_cast<double>(H);
  const double lr0 = std::log(s.ratio[0]), lr1 = std::log(s.ratio[1]);
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double target = area * rnd.uniform(s.scale[0], s.scale[1]);
    const double aspect = std::exp(rnd.uniform(lr0, lr1));
    const auto w = static_cast<int64_t>(std::lround(std::sqrt(target * aspect)));
    const auto h = static_cast<int64_t>(std::lround(std::sqrt(target / aspect)));
    if (w > 0 && w <= W && h > 0 && h <= H)
      return {rnd.integer(0, W - w), rnd.integer(0, H - h), w, h};
  }
  const double in_ratio = static_cast<double>(W) / static_cast<double>(H);
  int64_t w = W, h = H;
  if (in_ratio < s.ratio[0])
    h = std::lround(static_cast<double>(W) / s.ratio[0]);
  else if (in_ratio > s.ratio[1])
    w = std::lround(static_cast<double>(H) * s.ratio[1]);
  return {(W - w) / 2, (H - h) / 2, w, h};
}

Plan plan(const std::vector<TransformStep>& steps, Dims full, Random& rnd) {
  // The current image is cur_w x cur_h; its pixel (x, y) is source (ox + x * kx, oy + y * ky)
  // before mirroring (flipped: its x counts from the right).
  double ox = 0, oy = 0, kx = 1, ky = 1;
  int64_t cur_w = full.width, cur_h = full.height;
  bool flipped = false;
  auto crop = [&](int64_t left, int64_t top, int64_t w, int64_t h) {
    if (flipped) left = cur_w - left - w;
    ox += static_cast<double>(left) * kx;
    oy += static_cast<double>(top) * ky;
    cur_w = w;
    cur_h = h;
  };
  auto resize = [&](int64_t w, int64_t h) {
    kx *= static_cast<double>(cur_w) / static_cast<double>(w);
    ky *= static_cast<double>(cur_h) / static_cast<double>(h);
    cur_w = w;
    cur_h = h;
  };
  for (const TransformStep& s : steps) {
    switch (s.kind) {
      case K::kResize:
        if (s.width != 0) {
          resize(s.width, s.height);
        } else {  // the shorter side to s.height, as torchvision: the longer one truncated
          const int64_t S = s.height;
          if (cur_w <= cur_h)
            resize(S, std::max<int64_t>(1, S * cur_h / cur_w));
          else
            resize(std::max<int64_t>(1, S * cur_w / cur_h), S);
        }
        break;
      case K::kCenterCrop: {
        const int64_t w = s.width, h = s.height;
        // Halves round to even, as torchvision's center_crop (Python's round) does.
        crop(static_cast<int64_t>(std::nearbyint(static_cast<double>(cur_w - w) / 2.0)),
             static_cast<int64_t>(std::nearbyint(static_cast<double>(cur_h - h) / 2.0)), w, h);
        break;
      }
      case K::kRandomResizedCrop: {
        auto [left, top, w, h] = random_crop(s, cur_w, cur_h, rnd);
        crop(left, top, w, h);
        resize(s.width, s.height);
        break;
      }
      case K::kFlip:
        if (rnd.uniform(0, 1) < s.p) flipped = !flipped;
        break;
      default:
        break;
    }
  }
  Plan p;
  p.x0 = ox;
  p.y0 = oy;
  p.x1 = ox + static_cast<double>(cur_w) * kx;
  p.y1 = oy + static_cast<double>(cur_h) * ky;
  p.width = static_cast<int>(cur_w);
  p.height = static_cast<int>(cur_h);
  p.flip = flipped;
  return p;
}

std::once_flag opencv_threads;

}  // namespace

uint64_t sample_key(uint64_t seed, uint64_t epoch, uint64_t index) {
  return mix(mix(mix(seed) ^ epoch) ^ index);
}

ImageTransform::ImageTransform(const FieldTransform& spec) : steps_(spec.steps) {
  Dims probe{1 << 12, 1 << 12};  // any image: the output size does not depend on it
  Random rnd(0);
  Plan p = plan(steps_, probe, rnd);
  width_ = static_cast<uint32_t>(p.width);
  height_ = static_cast<uint32_t>(p.height);
  for (const TransformStep& s : steps_) {
    if (s.kind == K::kDecode) gray_ = s.gray;
    if (s.kind == K::kNormalize) normalize_ = &s;
    if (s.kind == K::kLayout) chw_ = s.chw;
  }
  const int64_t c = gray_ ? 1 : 3;
  dtype_ = !normalize_ ? DType::kUInt8 : normalize_->half ? DType::kFloat16 : DType::kFloat32;
  shape_ =
      chw_ ? std::vector<int64_t>{c, height_, width_} : std::vector<int64_t>{height_, width_, c};
  bytes_ = static_cast<size_t>(c) * height_ * width_ * dtype_size(dtype_);
  // The loader threads are the parallelism: OpenCV's own pool would only oversubscribe them.
  std::call_once(opencv_threads, [] { cv::setNumThreads(0); });
}

void ImageTransform::apply(std::span<const std::byte> encoded, uint64_t key,
                           std::span<std::byte> out) const {
  if (out.size() != bytes_)
    fail(ErrorCode::kInvalidArgument, "transform output of {} bytes, expected {}", out.size(),
         bytes_);
  const Format format = sniff(encoded);
  const Dims full = header(format, encoded);
  Random rnd(key);
  const Plan p = plan(steps_, full, rnd);
  // Decode no more pixels than the output needs from the rectangle.
  const double need =
      std::max(p.width / std::max(p.x1 - p.x0, 1e-9), p.height / std::max(p.y1 - p.y0, 1e-9));
  cv::Mat img = decode(format, encoded, full, gray_, need);
  const double sx = static_cast<double>(img.cols) / full.width;
  const double sy = static_cast<double>(img.rows) / full.height;
  // The rectangle in decoded pixels, whole pixels; parts outside the image are zeros.
  const int x0 = static_cast<int>(std::lround(p.x0 * sx)),
            y0 = static_cast<int>(std::lround(p.y0 * sy));
  const int x1 = std::max(x0 + 1, static_cast<int>(std::lround(p.x1 * sx)));
  const int y1 = std::max(y0 + 1, static_cast<int>(std::lround(p.y1 * sy)));
  cv::Mat roi;
  const cv::Rect want(x0, y0, x1 - x0, y1 - y0);
  const cv::Rect inside = want & cv::Rect(0, 0, img.cols, img.rows);
  if (inside == want) {
    roi = img(want);
  } else {
    roi = cv::Mat::zeros(want.height, want.width, img.type());
    if (inside.area() > 0) img(inside).copyTo(roi(inside - want.tl()));
  }
  // Shrinking by more than 2x (what DCT scaling left, or a PNG / WebP): INTER_AREA, an
  // antialiased box filter. Otherwise bilinear: after DCT scaling the rest is at most 2x, where
  // bilinear is about as close to Pillow's antialiased resize (a mean difference of 3.3 levels
  // against INTER_AREA's 3.2 on textured photos) and much faster (RESULTS.md, issue 22).
  const bool area = roi.cols > 2 * p.width || roi.rows > 2 * p.height;
  const int c = gray_ ? 1 : 3;
  const int type8 = gray_ ? CV_8UC1 : CV_8UC3;
  // uint8 HWC straight into `out` when nothing follows; else into a scratch image.
  const bool direct = !normalize_ && !chw_;
  thread_local cv::Mat scratch;
  cv::Mat sized = direct ? cv::Mat(p.height, p.width, type8, out.data()) : scratch;
  if (roi.cols == p.width && roi.rows == p.height)
    roi.copyTo(sized);
  else
    cv::resize(roi, sized, cv::Size(p.width, p.height), 0, 0,
               area ? cv::INTER_AREA : cv::INTER_LINEAR);
  if (p.flip) cv::flip(sized, sized, 1);
  if (direct) return;
  scratch = sized;
  cv::Mat values = sized;
  if (normalize_) {
    cv::Mat f;
    sized.convertTo(f, CV_32F, 1.0 / 255.0);
    cv::Scalar mean, inv_std;
    for (int k = 0; k < c; ++k) {
      mean[k] = normalize_->mean[k];
      inv_std[k] = 1.0 / normalize_->std[k];
    }
    cv::subtract(f, mean, f);
    cv::multiply(f, inv_std, f);
    if (normalize_->half) {
      cv::Mat h;
      f.convertTo(h, CV_16F);
      values = h;
    } else {
      values = f;
    }
  }
  const size_t elem = values.elemSize1();
  if (!chw_) {
    std::memcpy(out.data(), values.data, bytes_);  // continuous: made here
    return;
  }
  std::vector<cv::Mat> planes;
  const size_t plane = static_cast<size_t>(p.width) * p.height * elem;
  for (int k = 0; k < c; ++k)
    planes.emplace_back(p.height, p.width, CV_MAKETYPE(values.depth(), 1), out.data() + k * plane);
  cv::split(values, planes);
}

}  // namespace sluice::transform
