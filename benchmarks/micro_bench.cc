// Google Benchmark micro-benchmarks of the foundation: permutation lookups per second in each
// shuffle mode (goal: >= 50 M/s on one core for global), beside a materialised Fisher-Yates
// permutation (what torch.randperm-based samplers build), and dataset open time at 10^8
// samples (goal: < 1 s).
//
//   build/benchmarks/micro_bench                       # everything
//   SLUICE_BENCH_DIR=/path build/benchmarks/micro_bench --benchmark_filter=Open
//
// The 10^8-sample dataset (1.7 GB, mostly index) is written once under $SLUICE_BENCH_DIR
// (default /tmp/sluice-bench) and reused.

#include <sluice/sluice.h>

#include "sampler/epoch_order.h"
#include "sampler/permutation.h"

#include <benchmark/benchmark.h>

#include <algorithm>
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

BENCHMARK_MAIN();
