#pragma once

// A new table's first values (EmbeddingSpec::init) and the element conversions they need.

#include <sluice/embedding.h>

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace sluice::embed {

struct Init {
  enum Kind { kZeros, kNormal, kUniform } kind = kZeros;
  double scale = 0;  // the normal's std, or the uniform's A
};

/// "zeros", "normal:STD", "uniform:A"; kInvalidArgument naming the value otherwise.
Init parse_init(std::string_view text);

/// Rows [first, first + count) as `init` makes them: row r's values come from a generator
/// seeded with (seed, r) alone.
void fill_rows(const Init& init, uint64_t seed, EmbeddingDtype dtype, uint32_t dim, uint64_t first,
               uint64_t count, std::byte* out);

/// IEEE half and bfloat16 from float, rounding to nearest even (NaN stays NaN).
uint16_t to_half(float f);
uint16_t to_bfloat16(float f);

}  // namespace sluice::embed
