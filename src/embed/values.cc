#include "embed/values.h"

#include <sluice/error.h>

#include <fmt/format.h>

#include <charconv>
#include <cmath>
#include <cstring>
#include <numbers>
#include <string>

namespace sluice::embed {

namespace {

// splitmix64: a row's stream from (seed, row), one 64-bit draw per call.
struct Stream {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // In (0, 1): 53 random bits, never 0 (the logarithm below).
  double unit() { return (static_cast<double>(next() >> 11) + 0.5) / 9007199254740992.0; }
};

Stream row_stream(uint64_t seed, uint64_t row) {
  Stream s{seed};
  s.state = s.next() ^ (row * 0xd1b54a32d192ed03ull);
  s.next();
  return s;
}

void store(EmbeddingDtype dtype, float v, std::byte* out) {
  switch (dtype) {
    case EmbeddingDtype::kFloat32:
      std::memcpy(out, &v, 4);
      return;
    case EmbeddingDtype::kFloat16: {
      uint16_t h = to_half(v);
      std::memcpy(out, &h, 2);
      return;
    }
    case EmbeddingDtype::kBFloat16: {
      uint16_t b = to_bfloat16(v);
      std::memcpy(out, &b, 2);
      return;
    }
  }
}

}  // namespace

Init parse_init(std::string_view text) {
  if (text == "zeros") return {};
  auto bad = [&] {
    return Error(ErrorCode::kInvalidArgument,
                 fmt::format("embedding init \"{}\": expected zeros, normal:STD or uniform:A "
                             "(a number > 0)",
                             text));
  };
  const size_t colon = text.find(':');
  if (colon == std::string_view::npos) throw bad();
  const std::string_view kind = text.substr(0, colon), number = text.substr(colon + 1);
  double scale = 0;
  auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), scale);
  if (ec != std::errc() || end != number.data() + number.size() || !(scale > 0) ||
      !std::isfinite(scale))
    throw bad();
  if (kind == "normal") return {Init::kNormal, scale};
  if (kind == "uniform") return {Init::kUniform, scale};
  throw bad();
}

void fill_rows(const Init& init, uint64_t seed, EmbeddingDtype dtype, uint32_t dim, uint64_t first,
               uint64_t count, std::byte* out) {
  const size_t elem = element_bytes(dtype);
  if (init.kind == Init::kZeros) {
    std::memset(out, 0, count * dim * elem);
    return;
  }
  for (uint64_t r = 0; r < count; ++r) {
    Stream s = row_stream(seed, first + r);
    std::byte* row = out + r * dim * elem;
    for (uint32_t j = 0; j < dim; ++j) {
      double v;
      if (init.kind == Init::kUniform) {
        v = (2 * s.unit() - 1) * init.scale;
      } else {  // Box-Muller, one value per pair of draws: simple, and the same on every row
        v = std::sqrt(-2 * std::log(s.unit())) * std::cos(2 * std::numbers::pi * s.unit()) *
            init.scale;
      }
      store(dtype, static_cast<float>(v), row + j * elem);
    }
  }
}

uint16_t to_bfloat16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40);  // NaN
  x += 0x7fffu + ((x >> 16) & 1);
  return static_cast<uint16_t>(x >> 16);
}

uint16_t to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (x < 0x38800000u) {  // below half's smallest normal: a subnormal or zero
    // The float's value in units of 2^-24 (half's subnormal step), rounded to nearest even.
    float a;
    std::memcpy(&a, &x, 4);
    float scaled = a * 16777216.0f;          // exact: a power of two
    float rounded = std::nearbyint(scaled);  // the default rounding mode: to nearest even
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rounded));
  }
  // Normal: rebias the exponent (127 -> 15), round the 23-bit mantissa to 10 to nearest even.
  uint32_t h = x - (112u << 23);
  h += 0xfffu + ((h >> 13) & 1);
  return static_cast<uint16_t>(sign | (h >> 13));
}

}  // namespace sluice::embed
