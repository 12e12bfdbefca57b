// Properties of the sample order: a bijection per epoch, exactly-once across ranks, equal
// batches, marked padding, determinism, resume and elastic resume.

#include "sampler/epoch_order.h"
#include "sampler/permutation.h"
#include "test_util.h"

#include <fmt/format.h>

#include <cmath>
#include <map>
#include <numeric>
#include <set>

namespace sluice {
namespace {

using sampler::Permutation;

std::vector<uint64_t> shard_sizes_for(uint64_t n, uint64_t shard) {
  std::vector<uint64_t> sizes;
  for (uint64_t left = n; left > 0; left -= std::min(left, shard))
    sizes.push_back(std::min(left, shard));
  return sizes;
}

TEST(Permutation, IsABijectionAndInverts) {
  for (uint64_t n : {0ull, 1ull, 2ull, 3ull, 4ull, 5ull, 7ull, 8ull, 9ull, 100ull, 1000ull, 4097ull,
                     65535ull, 65536ull, 65537ull}) {
    Permutation p(n, 42 + n);
    std::vector<bool> seen(n);
    for (uint64_t i = 0; i < n; ++i) {
      uint64_t v = p(i);
      ASSERT_LT(v, n);
      ASSERT_FALSE(seen[v]) << "n=" << n << " collision at " << i;
      seen[v] = true;
      ASSERT_EQ(p.inverse(v), i);
    }
  }
}

TEST(Permutation, MapRangeMatchesSingleLookups) {
  for (uint64_t n : {0ull, 1ull, 2ull, 17ull, 257ull, 100003ull, (1ull << 40) + 3}) {
    Permutation p(n, 5);
    uint64_t count = std::min<uint64_t>(n, 1000);
    std::vector<uint64_t> out(count);
    uint64_t first = n > count ? n - count : 0;  // the end of the range, where walks happen
    p.map_range(first, count, out.data());
    for (uint64_t j = 0; j < count; ++j) ASSERT_EQ(out[j], p(first + j)) << n << " " << j;
  }
}

TEST(Permutation, HugeDomainsStayInRangeAndInvert) {
  for (uint64_t n : {(1ull << 40), (1ull << 40) + 12345, (1ull << 62)}) {
    Permutation p(n, 7);
    std::set<uint64_t> out;
    for (uint64_t i = 0; i < 20000; ++i) {
      uint64_t x = i * 0x9e3779b97f4a7c15ull % n;
      uint64_t v = p(x);
      ASSERT_LT(v, n);
      ASSERT_EQ(p.inverse(v), x);
      out.insert(v);
    }
    EXPECT_EQ(out.size(), 20000u);
  }
}

double chi_square(const std::vector<double>& counts, double expected) {
  double chi2 = 0;
  for (double c : counts) chi2 += (c - expected) * (c - expected) / expected;
  return chi2;
}

TEST(Permutation, PositionsAreUniform) {
  // Where does element 0 land, over many keys? Chi-square over n buckets.
  for (uint64_t n : {5ull, 37ull, 600ull}) {
    const uint64_t trials = n * 500;
    std::vector<double> count(n);
    for (uint64_t k = 0; k < trials; ++k) count[Permutation(n, k)(0)] += 1;
    double dof = double(n - 1);
    EXPECT_LT(chi_square(count, double(trials) / double(n)), dof + 6 * std::sqrt(2 * dof) + 10)
        << "n=" << n;
  }
}

TEST(Permutation, PairsAreUniform) {
  // Neighbouring inputs must not land at correlated places: the gap p(1) - p(0) mod n is
  // uniform on [1, n). (A cheaper round function or four rounds fail this at n = 600.)
  for (uint64_t n : {37ull, 600ull}) {
    const uint64_t trials = n * 500;
    std::vector<double> count(n - 1);
    for (uint64_t k = 0; k < trials; ++k) {
      Permutation p(n, k);
      count[(p(1) + n - p(0)) % n - 1] += 1;
    }
    double dof = double(n - 2);
    EXPECT_LT(chi_square(count, double(trials) / double(n - 1)), dof + 6 * std::sqrt(2 * dof) + 10)
        << "n=" << n;
  }
}

struct Case {
  uint64_t n;
  uint32_t world;
  uint64_t batch;
  ShuffleMode mode;
  bool drop_last;
};

std::string describe(const Case& c) {
  return fmt::format("n={} world={} batch={} mode={} drop_last={}", c.n, c.world, c.batch,
                     to_string(c.mode), c.drop_last);
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (uint64_t n : {0ull, 1ull, 7ull, 97ull, 1000ull, 4099ull})
    for (uint32_t world : {1u, 2u, 3u, 8u})
      for (uint64_t batch : {1ull, 5ull, 64ull})
        for (auto mode :
             {ShuffleMode::kGlobal, ShuffleMode::kBlock, ShuffleMode::kShard, ShuffleMode::kNone})
          for (bool drop : {true, false}) out.push_back({n, world, batch, mode, drop});
  return out;
}

SamplerOptions options_for(const Case& c) {
  SamplerOptions o;
  o.batch_size = c.batch;
  o.drop_last = c.drop_last;
  o.seed = 1234;
  o.shuffle.mode = c.mode;
  o.shuffle.block_size = 13;
  o.shuffle.buffer_size = 50;
  return o;
}

// All batches of all ranks for one epoch from `state`.
std::vector<std::vector<std::vector<SampleRef>>> run_epoch(const Sampler& s, SamplerState state,
                                                           uint32_t world) {
  std::vector<std::vector<std::vector<SampleRef>>> ranks(world);
  for (uint32_t r = 0; r < world; ++r) {
    RankPlan plan = s.plan(state, r, world);
    for (uint64_t b = 0; b < plan.num_batches(); ++b) {
      std::vector<SampleRef> batch;
      plan.batch(b, batch);
      EXPECT_EQ(batch.size(), plan.batch_samples(b));
      ranks[r].push_back(std::move(batch));
    }
  }
  return ranks;
}

TEST(Sampler, ExactlyOnceEqualBatchesMarkedPadding) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(describe(c));
    Sampler s(options_for(c), c.n, shard_sizes_for(c.n, 29));
    for (uint64_t epoch : {0, 3}) {
      auto ranks = run_epoch(s, {epoch, 0}, c.world);
      std::vector<int> delivered(c.n);
      uint64_t padding = 0;
      for (uint32_t r = 0; r < c.world; ++r) {
        ASSERT_EQ(ranks[r].size(), ranks[0].size()) << "ranks differ in batch count";
        for (size_t b = 0; b < ranks[r].size(); ++b) {
          ASSERT_EQ(ranks[r][b].size(), ranks[0][b].size()) << "batch " << b << " sizes differ";
          for (const auto& ref : ranks[r][b]) {
            ASSERT_LT(ref.index, c.n);
            if (ref.padding)
              ++padding;
            else
              ++delivered[ref.index];
          }
        }
      }
      uint64_t real = 0;
      for (int d : delivered) {
        ASSERT_LE(d, 1) << "a sample was delivered twice";
        real += d;
      }
      uint64_t global = c.batch * c.world;
      if (c.drop_last) {
        EXPECT_EQ(padding, 0u);
        EXPECT_EQ(real, c.n / global * global);
      } else {
        EXPECT_EQ(real, c.n) << "a sample was never delivered";
        EXPECT_LT(padding, c.world);
      }
      EXPECT_EQ(s.num_batches(c.world), ranks[0].size());
    }
  }
}

TEST(Sampler, EpochOrderIsABijectionInEveryMode) {
  for (auto mode :
       {ShuffleMode::kGlobal, ShuffleMode::kBlock, ShuffleMode::kShard, ShuffleMode::kNone}) {
    for (uint64_t n : {1ull, 13ull, 14ull, 1000ull, 10007ull}) {
      SamplerOptions o;
      o.shuffle.mode = mode;
      o.shuffle.block_size = 64;
      o.shuffle.buffer_size = 100;
      auto sizes = shard_sizes_for(n, 37);
      sizes.insert(sizes.begin() + 1, 0);  // an empty shard must not break kShard
      EpochOrder order(o, n, sizes, 5);
      std::vector<bool> seen(n);
      for (uint64_t p = 0; p < n; ++p) {
        uint64_t v = order(p);
        ASSERT_LT(v, n);
        ASSERT_FALSE(seen[v]) << to_string(mode) << " n=" << n;
        seen[v] = true;
      }
    }
  }
}

TEST(Sampler, EpochOrderRangesMatchSingleLookups) {
  for (auto mode :
       {ShuffleMode::kGlobal, ShuffleMode::kBlock, ShuffleMode::kShard, ShuffleMode::kNone}) {
    SamplerOptions o;
    o.shuffle.mode = mode;
    o.shuffle.block_size = 30;
    o.shuffle.buffer_size = 45;
    const uint64_t n = 1001;
    EpochOrder order(o, n, shard_sizes_for(n, 100), 2);
    for (uint64_t first : {0ull, 7ull, 29ull, 960ull}) {
      std::vector<uint64_t> out(n - first);
      order.map_range(first, out.size(), out.data());  // runs cross many blocks and windows
      for (uint64_t j = 0; j < out.size(); ++j) ASSERT_EQ(out[j], order(first + j));
    }
  }
}

TEST(Sampler, ModesKeepTheirLocality) {
  constexpr uint64_t n = 10000;
  SamplerOptions o;
  o.shuffle.block_size = 100;
  o.shuffle.buffer_size = 250;
  o.shuffle.mode = ShuffleMode::kBlock;
  EpochOrder block(o, n, {}, 1);
  for (uint64_t p = 0; p < n; p += 100) {
    uint64_t b = block(p) / 100;
    for (uint64_t q = p; q < p + 100; ++q) ASSERT_EQ(block(q) / 100, b) << "block broken at " << q;
  }
  o.shuffle.mode = ShuffleMode::kShard;
  auto sizes = shard_sizes_for(n, 1000);
  EpochOrder shard(o, n, sizes, 1);
  // Each window of 250 positions draws from at most 2 shards (windows do not span more).
  for (uint64_t w = 0; w < n; w += 250) {
    std::set<uint64_t> shards;
    for (uint64_t p = w; p < w + 250; ++p) shards.insert(shard(p) / 1000);
    EXPECT_LE(shards.size(), 2u);
  }
  o.shuffle.mode = ShuffleMode::kNone;
  EpochOrder none(o, n, {}, 1);
  for (uint64_t p = 0; p < n; ++p) ASSERT_EQ(none(p), p);
}

TEST(Sampler, DeterministicAndEpochsDiffer) {
  SamplerOptions o;
  o.seed = 7;
  o.batch_size = 10;
  Sampler a(o, 5000), b(o, 5000);
  auto e0 = run_epoch(a, {0, 0}, 4);
  EXPECT_EQ(e0, run_epoch(b, {0, 0}, 4));
  auto e1 = run_epoch(a, {1, 0}, 4);
  EXPECT_NE(e0, e1);
  o.seed = 8;
  EXPECT_NE(e0, run_epoch(Sampler(o, 5000), {0, 0}, 4));
  // The global order is not the identity and not a rotation of it.
  size_t fixed = 0;
  for (uint64_t p = 0; p < 5000; ++p) fixed += a.at(0, p) == p;
  EXPECT_LT(fixed, 20u);
}

// Runs `steps` batches at world size w1, then the rest of the epoch at w2, and checks that
// the two halves together deliver exactly what an uninterrupted epoch does.
void check_resume(const Case& c, uint32_t w2, uint64_t steps) {
  SCOPED_TRACE(describe(c) + fmt::format(" resume at step {} on world {}", steps, w2));
  Sampler s(options_for(c), c.n, shard_sizes_for(c.n, 29));
  RankPlan plan0 = s.plan({2, 0}, 0, c.world);
  steps = std::min(steps, plan0.num_batches());
  std::multiset<uint64_t> before, after;
  for (uint32_t r = 0; r < c.world; ++r) {
    RankPlan plan = s.plan({2, 0}, r, c.world);
    std::vector<SampleRef> batch;
    for (uint64_t b = 0; b < steps; ++b) {
      plan.batch(b, batch);
      for (auto& ref : batch)
        if (!ref.padding) before.insert(ref.index);
    }
    EXPECT_EQ(plan.state_after(steps), plan0.state_after(steps)) << "ranks disagree on state";
  }
  SamplerState state = plan0.state_after(steps);
  EXPECT_EQ(state.epoch, 2u);
  for (auto& rank : run_epoch(s, state, w2))
    for (auto& batch : rank)
      for (auto& ref : batch)
        if (!ref.padding) after.insert(ref.index);
  for (uint64_t i : after) ASSERT_EQ(before.count(i), 0u) << "sample " << i << " delivered twice";
  std::set<uint64_t> unique_after(after.begin(), after.end());
  ASSERT_EQ(unique_after.size(), after.size()) << "duplicate after resume";
  if (!c.drop_last) {
    EXPECT_EQ(before.size() + after.size(), c.n) << "a sample was lost across the resume";
  } else {
    // Everything not yet delivered is delivered, except a tail shorter than one global batch.
    EXPECT_LT(c.n - before.size() - after.size(), c.batch * w2);
  }
  // The delivered prefix is exactly the first `position` samples of the epoch order.
  std::set<uint64_t> prefix;
  for (uint64_t p = 0; p < state.position; ++p) prefix.insert(s.at(2, p));
  EXPECT_EQ(prefix, std::set<uint64_t>(before.begin(), before.end()));
}

TEST(Sampler, ResumeAndElasticResumeAreExact) {
  for (const Case& c : cases()) {
    if (c.n == 0) continue;
    for (uint32_t w2 : {1u, 3u, 5u})
      for (uint64_t steps : {0ull, 1ull, 3ull, 1000ull}) check_resume(c, w2, steps);
  }
}

TEST(Sampler, ResumeMidEpochGivesTheSameRestOnTheSameWorld) {
  SamplerOptions o;
  o.batch_size = 16;
  Sampler s(o, 1000);
  RankPlan full = s.plan({4, 0}, 1, 3);
  RankPlan resumed = s.plan(full.state_after(5), 1, 3);
  ASSERT_EQ(resumed.num_batches(), full.num_batches() - 5);
  std::vector<SampleRef> a, b;
  for (uint64_t i = 0; i < resumed.num_batches(); ++i) {
    full.batch(i + 5, a);
    resumed.batch(i, b);
    EXPECT_EQ(a, b);
  }
}

TEST(Sampler, LoaderThreadsSplitBatchesExactlyOnce) {
  for (uint64_t batches : {0ull, 1ull, 7ull, 100ull})
    for (uint32_t workers : {1u, 2u, 3u, 16u}) {
      uint64_t sum = 0;
      for (uint32_t w = 0; w < workers; ++w) {
        uint64_t mine = RankPlan::worker_batches(batches, w, workers);
        // Worker w takes steps w, w + workers, ...: count them directly.
        uint64_t direct = 0;
        for (uint64_t step = w; step < batches; step += workers) ++direct;
        EXPECT_EQ(mine, direct);
        sum += mine;
      }
      EXPECT_EQ(sum, batches);
    }
}

TEST(Sampler, BadArgumentsAreErrors) {
  SamplerOptions o;
  o.batch_size = 0;
  EXPECT_THROW(Sampler(o, 10), Error);
  o.batch_size = 4;
  Sampler s(o, 10);
  EXPECT_THROW(s.plan({0, 0}, 2, 2), Error);
  EXPECT_THROW(s.plan({0, 0}, 0, 0), Error);
  EXPECT_THROW(s.plan({0, 11}, 0, 1), Error);
  EXPECT_THROW(Sampler(o, 10, {3, 3}), Error);  // shard sizes must add up
  std::vector<SampleRef> batch;
  EXPECT_THROW(s.plan({0, 0}, 0, 1).batch(99, batch), Error);
}

}  // namespace
}  // namespace sluice
