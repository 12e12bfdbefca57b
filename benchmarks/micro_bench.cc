// Google Benchmark micro-benchmarks of the foundation: permutation lookups per second in each
// shuffle mode (goal: >= 50 M/s on one core for global), beside a materialised Fisher-Yates
// permutation (what torch.randperm-based samplers build), dataset open time at 10^8 samples
// (goal: < 1 s), and the embedding table's clairvoyant cache bookkeeping per look-ahead batch.
//
//   build/benchmarks/micro_bench                       # everything
//   SLUICE_BENCH_DIR=/path build/benchmarks/micro_bench --benchmark_filter=Open
//
// The 10^8-sample dataset (1.7 GB, mostly index) is written once under $SLUICE_BENCH_DIR
// (default /tmp/sluice-bench) and reused.

#include <sluice/sluice.h>

#include "embed/row_cache.h"
#include "sampler/epoch_order.h"
#include "sampler/permutation.h"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <numeric>
#include <random>

namespace sluice {
namespace {

void BM_GlobalPermutation(benchmark::State& state) {
  const auto n = static_cast<uint64_t>(state.range(0));
  sampler::Permutation perm(n, 42);
  uint64_t p = 0, sum = 0;
  for (auto _ : state) {
    for (int i = 0; i < 1024; ++i) {
      sum += perm(p);
      if (++p == n) p = 0;
    }
  }
  benchmark::DoNotOptimize(sum);
  state.SetItemsProcessed(int64_t(state.iterations()) * 1024);
}
BENCHMARK(BM_GlobalPermutation)
    ->Arg(1'000'000)
    ->Arg(1'000'000'000)
    ->Arg(int64_t{1} << 40)
    ->Arg((int64_t{1} << 40) + 1);

// The same lookups through map_range, as RankPlan::batch makes them (consecutive positions).
void BM_GlobalPermutationRange(benchmark::State& state) {
  const auto n = static_cast<uint64_t>(state.range(0));
  sampler::Permutation perm(n, 42);
  uint64_t out[256];
  uint64_t p = 0;
  for (auto _ : state) {
    if (p + 1024 > n) p = 0;
    for (int i = 0; i < 4; ++i, p += 256) perm.map_range(p, 256, out);
    benchmark::DoNotOptimize(out);
  }
  state.SetItemsProcessed(int64_t(state.iterations()) * 1024);
}
BENCHMARK(BM_GlobalPermutationRange)
    ->Arg(1'000'000)
    ->Arg(1'000'000'000)
    ->Arg(int64_t{1} << 40)
    ->Arg((int64_t{1} << 40) + 1);

void BM_EpochOrder(benchmark::State& state) {
  const uint64_t n = 100'000'000;
  SamplerOptions o;
  o.shuffle.mode = static_cast<ShuffleMode>(state.range(0));
  std::vector<uint64_t> shards(1000, n / 1000);
  EpochOrder order(o, n, shards, 3);
  uint64_t p = 0, out[256];
  for (auto _ : state) {
    for (int i = 0; i < 4; ++i, p += 256) order.map_range(p, 256, out);
    benchmark::DoNotOptimize(out);
  }
  state.SetItemsProcessed(int64_t(state.iterations()) * 1024);
  state.SetLabel(std::string(to_string(o.shuffle.mode)));
}
BENCHMARK(BM_EpochOrder)->DenseRange(0, 3);

void BM_RankPlanBatch(benchmark::State& state) {
  SamplerOptions o;
  o.batch_size = 256;
  Sampler sampler(o, 100'000'000);
  RankPlan plan = sampler.plan({0, 0}, 3, 8);
  std::vector<SampleRef> batch;
  batch.reserve(256);
  uint64_t step = 0;
  for (auto _ : state) {
    plan.batch(step++ % plan.num_batches(), batch);
    benchmark::DoNotOptimize(batch.data());
  }
  state.SetItemsProcessed(int64_t(state.iterations()) * 256);
}
BENCHMARK(BM_RankPlanBatch);

// The peer: a materialised permutation (N * 8 bytes), built per epoch with Fisher-Yates and
// read in order; items are samples, so the build cost is spread over the epoch.
void BM_MaterialisedPermutationPeer(benchmark::State& state) {
  const auto n = static_cast<uint64_t>(state.range(0));
  std::vector<uint64_t> perm(n);
  std::mt19937_64 rng(42);
  uint64_t sum = 0;
  for (auto _ : state) {
    std::iota(perm.begin(), perm.end(), uint64_t{0});
    std::shuffle(perm.begin(), perm.end(), rng);
    for (uint64_t v : perm) sum += v;
  }
  benchmark::DoNotOptimize(sum);
  state.SetItemsProcessed(int64_t(state.iterations()) * int64_t(n));
}
BENCHMARK(BM_MaterialisedPermutationPeer)
    ->Arg(1'000'000)
    ->Arg(100'000'000)
    ->Unit(benchmark::kMillisecond);

std::filesystem::path big_dataset() {
  const char* env = std::getenv("SLUICE_BENCH_DIR");
  std::filesystem::path dir = std::filesystem::path(env ? env : "/tmp/sluice-bench") / "open-1e8";
  if (std::filesystem::exists(dir / "manifest.sluice")) return dir;
  std::filesystem::create_directories(dir.parent_path());
  WriterOptions o;
  o.fields = {{"x", DType::kUInt8, {}}};
  o.shard_samples = 1 << 20;  // 96 shards
  auto writer = DatasetWriter::create(dir, o);
  std::byte b{7};
  std::span<const std::byte> one(&b, 1);
  std::span<const std::byte> fields[] = {one};
  for (uint64_t i = 0; i < 100'000'000; ++i) writer->add(fields);
  writer->finish();
  return dir;
}

void BM_OpenDataset1e8(benchmark::State& state) {
  auto dir = big_dataset();
  uint64_t n = 0;
  for (auto _ : state) {
    auto ds = Dataset::open(dir);
    n = ds->num_samples();
    benchmark::DoNotOptimize(ds->extent(n - 1));
  }
  state.counters["samples"] = double(n);
}
BENCHMARK(BM_OpenDataset1e8)->Unit(benchmark::kMillisecond)->Iterations(20);

}  // namespace
}  // namespace sluice

// The clairvoyant row cache as the Loader's look-ahead drives it, per batch: feed a batch 4
// ahead, consume the current one, find its rows and offer the misses. Zipf(1.2) ids over 10^6
// rows (batches of 16,384 draws, about 3,500 unique), a cache of 10^5 rows; items are ids.
void BM_ClairvoyantCacheBatch(benchmark::State& state) {
  constexpr uint64_t kRows = 1'000'000;
  constexpr size_t kBatches = 64, kAhead = 4;
  std::mt19937_64 rng(1);
  std::vector<double> cdf(kRows);
  double sum = 0;
  for (uint64_t i = 0; i < kRows; ++i) cdf[i] = sum += std::pow(static_cast<double>(i + 1), -1.2);
  std::vector<std::vector<int64_t>> batches(kBatches);
  size_t ids = 0;
  for (auto& b : batches) {
    for (int k = 0; k < 16384; ++k) {
      const double u = std::uniform_real_distribution<double>(0, sum)(rng);
      const auto rank =
          static_cast<uint64_t>(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin());
      b.push_back(static_cast<int64_t>(rank * 2654435761u % kRows));  // hot ids spread out
    }
    std::sort(b.begin(), b.end());
    b.erase(std::unique(b.begin(), b.end()), b.end());
    ids += b.size();
  }
  sluice::embed::RowCache cache(100'000, 64, sluice::CachePolicy::kClairvoyant);
  std::vector<std::byte> row(64);
  for (size_t i = 0; i < kAhead; ++i) cache.feed(batches[i]);
  size_t i = 0;
  for (auto _ : state) {
    cache.feed(batches[(i + kAhead) % kBatches]);
    const auto& b = batches[i % kBatches];
    cache.consume(b);
    for (int64_t id : b)
      if (!cache.find(id)) cache.offer(id, row.data());
    ++i;
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * (ids / kBatches)));
}
BENCHMARK(BM_ClairvoyantCacheBatch)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
