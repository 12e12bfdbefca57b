#pragma once

#include <bit>
#include <cstdint>

namespace sluice::sampler {

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

/// A keyed pseudo-random permutation of [0, n) in O(1) memory: a 6-round (unbalanced) Feistel
/// network with mix64 as round function, on the smallest power-of-two domain >= max(n, 256),
/// with cycle walking back into [0, n). Fewer than 2 network evaluations per lookup on average
/// once n > 256; n up to 2^62. Four rounds, or a cheaper round function, fail the pairwise
/// uniformity test in tests/sampler on domains of a few hundred; the 256 floor keeps tiny
/// domains (a Feistel network only makes even permutations) close to uniform.
class Permutation {
 public:
  Permutation() = default;
  Permutation(uint64_t n, uint64_t key) : n_(n) {
    unsigned bits = n <= 256 ? 8 : static_cast<unsigned>(std::bit_width(n - 1));
    rbits_ = bits / 2;
    lbits_ = bits - rbits_;
    lmask_ = (uint64_t{1} << lbits_) - 1;
    rmask_ = (uint64_t{1} << rbits_) - 1;
    for (int i = 0; i < kRounds; ++i) keys_[i] = derive_key(key, static_cast<uint64_t>(i));
  }

  uint64_t size() const { return n_; }

  uint64_t operator()(uint64_t x) const {
    if (n_ <= 1) return x;
    do x = forward(x);
    while (x >= n_);
    return x;
  }

  uint64_t inverse(uint64_t y) const {
    if (n_ <= 1) return y;
    do y = backward(y);
    while (y >= n_);
    return y;
  }

 private:
  static constexpr int kRounds = 6;

  // Each round maps (L, R) -> (R, L ^ F(R)); the two halves' widths swap every round and,
  // after an even number of rounds, are back where they started.
  uint64_t forward(uint64_t x) const {
    uint64_t l = x >> rbits_, r = x & rmask_;
    for (int i = 0; i < kRounds; ++i) {
      uint64_t mask = i % 2 == 0 ? lmask_ : rmask_;
      uint64_t next = l ^ (mix64(r ^ keys_[i]) & mask);
      l = r;
      r = next;
    }
    return (l << rbits_) | r;
  }

  uint64_t backward(uint64_t y) const {
    uint64_t l = y >> rbits_, r = y & rmask_;
    for (int i = kRounds - 1; i >= 0; --i) {
      uint64_t mask = i % 2 == 0 ? lmask_ : rmask_;
      uint64_t prev = r ^ (mix64(l ^ keys_[i]) & mask);
      r = l;
      l = prev;
    }
    return (l << rbits_) | r;
  }

  uint64_t n_ = 0;
  unsigned lbits_ = 0, rbits_ = 0;
  uint64_t lmask_ = 0, rmask_ = 0;
  uint64_t keys_[kRounds] = {};
};

}  // namespace sluice::sampler
