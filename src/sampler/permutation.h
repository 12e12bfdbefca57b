#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>

namespace sluice::sampler {

__extension__ typedef unsigned __int128 uint128_t;

/// splitmix64's finaliser: a bijective 64-bit mixer with full avalanche.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return x;
}

/// Derives an independent key from a key and a salt.
inline uint64_t derive_key(uint64_t key, uint64_t salt) {
  return mix64(key + 0x9e3779b97f4a7c15ull * (salt + 1));
}

/// A keyed pseudo-random permutation of [0, n) in O(1) memory: a 6-round generalised Feistel
/// network on Z_a x Z_b (a*b >= n, a ~ b ~ sqrt(n)) with mix64 as round function and
/// addition mod a or b as the combining step, with cycle walking back into [0, n). Because
/// a*b - n < a, walking almost never happens for large n, so a lookup costs one division and
/// six rounds. Domains are at least 16 x 16 (a Feistel network on a tiny domain reaches only
/// some permutations). n up to 2^62.
class Permutation {
 public:
  Permutation() = default;
  Permutation(uint64_t n, uint64_t key) : n_(n) {
    a_ = std::max<uint64_t>(16, isqrt(n_));
    if (a_ * a_ < n_) ++a_;
    b_ = std::max<uint64_t>(16, (n_ + a_ - 1) / a_);
    for (int i = 0; i < kRounds; ++i) keys_[i] = derive_key(key, static_cast<uint64_t>(i));
  }

  uint64_t size() const { return n_; }

  uint64_t operator()(uint64_t x) const {
    if (n_ <= 1) return x;
    do x = forward(x);
    while (x >= n_);
    return x;
  }

  /// out[j] = (*this)(first + j) for j < count. Eight lookups advance through the rounds
  /// together, so their dependency chains overlap: about twice the rate of single lookups.
  void map_range(uint64_t first, size_t count, uint64_t* out) const {
    constexpr size_t kLanes = 8;
    size_t j = 0;
    if (n_ > 1) {
      for (; j + kLanes <= count; j += kLanes) {
        uint64_t l[kLanes], r[kLanes];
        for (size_t k = 0; k < kLanes; ++k) {
          l[k] = (first + j + k) / b_;
          r[k] = (first + j + k) % b_;
        }
        uint64_t ml = a_, mr = b_;
        for (int i = 0; i < kRounds; ++i) {
          for (size_t k = 0; k < kLanes; ++k) {
            uint64_t next = l[k] + f(i, r[k], ml);
            next = next >= ml ? next - ml : next;
            l[k] = r[k];
            r[k] = next;
          }
          std::swap(ml, mr);
        }
        for (size_t k = 0; k < kLanes; ++k) {
          uint64_t x = l[k] * b_ + r[k];
          while (x >= n_) x = forward(x);  // rare: a*b - n < a
          out[j + k] = x;
        }
      }
    }
    for (; j < count; ++j) out[j] = (*this)(first + j);
  }

  uint64_t inverse(uint64_t y) const {
    if (n_ <= 1) return y;
    do y = backward(y);
    while (y >= n_);
    return y;
  }

 private:
  static constexpr int kRounds = 6;

  static uint64_t isqrt(uint64_t n) {
    auto r = static_cast<uint64_t>(__builtin_sqrt(static_cast<double>(n)));
    while (r * r > n) --r;
    while ((r + 1) * (r + 1) <= n) ++r;
    return r;
  }

  // mix64(v ^ key) reduced to [0, m) by a multiply-shift (Lemire), no division.
  uint64_t f(int i, uint64_t v, uint64_t m) const {
    return static_cast<uint64_t>((static_cast<uint128_t>(mix64(v ^ keys_[i])) * m) >> 64);
  }

  // The state is (l, r) in Z_a x Z_b, encoded l * b + r. Round i maps (l, r) to
  // (r, l + F(r) mod |l|): the two moduli swap every round and after an even number of
  // rounds are back where they started.
  uint64_t forward(uint64_t x) const {
    uint64_t l = x / b_, r = x % b_;
    uint64_t ml = a_, mr = b_;
    for (int i = 0; i < kRounds; ++i) {
      uint64_t next = l + f(i, r, ml);
      if (next >= ml) next -= ml;
      l = r;
      r = next;
      std::swap(ml, mr);
    }
    return l * b_ + r;
  }

  uint64_t backward(uint64_t y) const {
    uint64_t l = y / b_, r = y % b_;
    uint64_t ml = a_, mr = b_;  // moduli of (l, r) after an even number of rounds
    for (int i = kRounds - 1; i >= 0; --i) {
      // Before round i the state was (prev, l) with prev in Z_mr.
      uint64_t h = f(i, l, mr);
      uint64_t prev = r >= h ? r - h : r + mr - h;
      r = l;
      l = prev;
      std::swap(ml, mr);
    }
    return l * b_ + r;
  }

  uint64_t n_ = 0;
  uint64_t a_ = 16, b_ = 16;
  uint64_t keys_[kRounds] = {};
};

}  // namespace sluice::sampler
