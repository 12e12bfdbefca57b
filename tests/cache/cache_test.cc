// The node cache through the Loader, with a plain directory as the source (cache.dir set): the
// same code path as s3:// (tests/python/test_s3.py runs that against moto) without a server.

#include <sluice/sluice.h>

#include "../io/fault_engine.h"
#include "pipeline/open.h"
#include "test_util.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <iostream>
#include <map>
#include <set>

namespace sluice {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kSamples = 2000;
constexpr uint64_t kBytes = 4096;  // one aligned block per sample: no gaps, exact byte counts

std::vector<std::byte> payload(uint64_t i) { return testing::sample_bytes(i, 0, kBytes); }

class CacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    WriterOptions w;
    w.fields = {{"data", DType::kUInt8, {static_cast<int64_t>(kBytes)}}};
    w.shard_bytes = 1 << 20;
    auto writer = DatasetWriter::create(src(), w);
    for (uint64_t i = 0; i < kSamples; ++i) {
      auto bytes = payload(i);
      std::span<const std::byte> fields[] = {bytes};
      writer->add(fields);
    }
    writer->finish();
  }

  fs::path src() const { return tmp_ / "src"; }
  fs::path cache() const { return tmp_ / "cache"; }

  LoaderOptions options(CachePolicy policy, uint64_t capacity_samples) const {
    LoaderOptions o;
    o.dataset.path = src();
    o.cache.dir = cache();
    o.cache.capacity = capacity_samples * kBytes;
    o.cache.policy = policy;
    o.cache.fetch_size = 0;  // sample by sample: fetches comparable with Belady's
    o.batch_size = 32;
    o.seed = 5;
    o.io.timeout_ms = 20000;
    o.distributed.rank = 0;
    o.distributed.world_size = 1;
    return o;
  }

  // One epoch: every sample once, each with its bytes.
  static void check_epoch(Loader& loader) {
    std::vector<uint64_t> seen;
    while (auto b = loader.next()) {
      FieldView data = b->field("data");
      for (size_t i = 0; i < b->size(); ++i) {
        uint64_t index = b->indices()[i];
        auto want = payload(index);
        auto got = data.sample(i);
        ASSERT_TRUE(std::equal(got.begin(), got.end(), want.begin(), want.end()))
            << "sample " << index;
        seen.push_back(index);
      }
    }
    std::sort(seen.begin(), seen.end());
    ASSERT_EQ(seen.size(), kSamples - kSamples % 32);
    ASSERT_TRUE(std::adjacent_find(seen.begin(), seen.end()) == seen.end());
  }

  // Fetches of Belady's MIN (demand paging, evicting the one needed furthest ahead, never
  // caching one needed later than all it would replace) for the loader's order over `epochs`.
  uint64_t belady_fetches(const LoaderOptions& o, uint64_t epochs, uint64_t capacity) const {
    Sampler sampler(o.sampler_options(), kSamples);
    std::vector<uint64_t> seq;
    std::vector<SampleRef> refs;
    for (uint64_t e = 0; e < epochs; ++e) {
      RankPlan plan = sampler.plan({e, 0}, 0, 1);
      for (uint64_t s = 0; s < plan.num_batches(); ++s) {
        plan.batch(s, refs);
        for (auto& r : refs) seq.push_back(r.index);
      }
    }
    const uint64_t never = UINT64_MAX;
    std::vector<uint64_t> next(seq.size()), last(kSamples, never);
    for (size_t t = seq.size(); t-- > 0;) {
      next[t] = last[seq[t]];
      last[seq[t]] = t;
    }
    std::map<uint64_t, uint64_t> by_next;  // next use -> sample (uses are distinct positions)
    std::vector<uint64_t> cached_next(kSamples, 0);
    std::vector<bool> cached(kSamples, false);
    uint64_t fetches = 0;
    for (size_t t = 0; t < seq.size(); ++t) {
      uint64_t s = seq[t];
      if (cached[s]) {
        by_next.erase(cached_next[s]);
      } else {
        ++fetches;
        if (by_next.size() + 1 > capacity) {
          auto far = std::prev(by_next.end());
          if (next[t] != never && far->first > next[t]) {
            cached[far->second] = false;
            by_next.erase(far);
          } else {
            continue;  // used once and then later than everything cached: not kept
          }
        }
        cached[s] = true;
      }
      if (next[t] == never) {  // never again: drop it
        cached[s] = false;
        continue;
      }
      cached_next[s] = next[t];
      by_next[next[t]] = s;
    }
    return fetches;
  }

  testing::TempDir tmp_;
};

TEST_F(CacheTest, EveryEpochDeliversEverySampleOnceWithItsBytes) {
  auto loader = Loader::open(options(CachePolicy::kClairvoyant, kSamples / 2));
  for (int e = 0; e < 3; ++e) ASSERT_NO_FATAL_FAILURE(check_epoch(*loader));
  LoaderStats s = loader->stats();
  EXPECT_EQ(s.cache_hits + s.cache_misses, s.samples);
  EXPECT_GT(s.source_bytes, kSamples * kBytes);  // more than one epoch's worth: half is cached
  EXPECT_GT(s.cache_hits, 0u);
}

TEST_F(CacheTest, ClairvoyantFetchesWithinFivePercentOfBeladyAndLessThanLru) {
  const uint64_t capacity = kSamples / 2;
  std::map<CachePolicy, uint64_t> fetched;
  for (auto policy : {CachePolicy::kClairvoyant, CachePolicy::kLru}) {
    fs::remove_all(cache());
    auto loader = Loader::open(options(policy, capacity));
    for (int e = 0; e < 3; ++e) ASSERT_NO_FATAL_FAILURE(check_epoch(*loader));
    fetched[policy] = loader->stats().source_bytes / kBytes;
  }
  // drop_last leaves the epoch's tail out of the order; the loader reads whole batches.
  const uint64_t optimum =
      belady_fetches(options(CachePolicy::kClairvoyant, capacity), 3, capacity);
  EXPECT_LE(fetched[CachePolicy::kClairvoyant], optimum * 105 / 100)
      << "clairvoyant " << fetched[CachePolicy::kClairvoyant] << ", Belady " << optimum;
  EXPECT_GE(fetched[CachePolicy::kClairvoyant], optimum);  // nothing beats the optimum
  std::cout << "clairvoyant " << fetched[CachePolicy::kClairvoyant] << ", lru "
            << fetched[CachePolicy::kLru] << ", Belady " << optimum << "\n";
  EXPECT_GT(fetched[CachePolicy::kLru], fetched[CachePolicy::kClairvoyant] * 5 / 4)
      << "lru " << fetched[CachePolicy::kLru];
}

TEST_F(CacheTest, ABlockFetchBringsTheNeighboursThePolicyKeepsInOneRead) {
  for (auto policy : {CachePolicy::kClairvoyant, CachePolicy::kLru}) {
    fs::remove_all(cache());
    LoaderOptions o = options(policy, kSamples / 2);
    o.cache.fetch_size = 16 * kBytes;
    auto loader = Loader::open(o);
    for (int e = 0; e < 3; ++e) ASSERT_NO_FATAL_FAILURE(check_epoch(*loader));
    LoaderStats s = loader->stats();
    EXPECT_EQ(s.cache_hits + s.cache_misses, s.samples);
    // A block's kept samples share a ranged read: several records per request.
    EXPECT_GT(s.source_bytes / kBytes, 2 * s.source_requests)
        << to_string(policy) << ": " << s.source_bytes << " bytes in " << s.source_requests
        << " requests";
    if (policy == CachePolicy::kClairvoyant) {
      EXPECT_GT(s.cache_hits, s.samples / 3);
    }
  }
}

TEST_F(CacheTest, AFullCacheDiskDegradesToReadingTheSourceWithOneLine) {
  // 1 MiB of disk for a cache of 4 MiB: the writes fail with ENOSPC a few hundred samples in.
  if (std::string why = testing::mount_small_disk(cache(), "1m"); !why.empty())
    GTEST_SKIP() << "no small file system to fill: " << why;
  ::testing::internal::CaptureStderr();
  {
    auto loader = Loader::open(options(CachePolicy::kClairvoyant, kSamples / 2));
    for (int e = 0; e < 3; ++e) ASSERT_NO_FATAL_FAILURE(check_epoch(*loader));
    LoaderStats s = loader->stats();
    EXPECT_GT(s.source_bytes, 2 * kSamples * kBytes) << "epochs 2 and 3 came from the cache?";
  }
  std::string log = ::testing::internal::GetCapturedStderr();
  umount2(cache().c_str(), MNT_DETACH);
  const std::string line = "directly from now on";
  ASSERT_NE(log.find(line), std::string::npos) << log;
  EXPECT_EQ(log.find(line), log.rfind(line)) << "said more than once:\n" << log;
  EXPECT_NE(log.find("No space left on device"), std::string::npos) << log;
}

TEST_F(CacheTest, AFailingCacheDiskIsReadFromTheSourceInstead) {
  // Every read of the mirror fails with EIO at the engine seam, as a dying disk's would.
  auto faults = std::make_shared<io::Faults>();
  faults->wrap_engine = [](std::unique_ptr<io::Engine> e) -> std::unique_ptr<io::Engine> {
    return std::make_unique<testing::FaultEngine>(
        std::move(e), [](const io::Request&) { return testing::Fault::kError; });
  };
  // Direct I/O reads through the IO service's one engine, buffered reads through each thread's.
  for (DirectIo direct : {DirectIo::kOn, DirectIo::kOff}) {
    fs::remove_all(cache());
    LoaderOptions o = options(CachePolicy::kClairvoyant, kSamples / 2);
    o.io.direct = direct;
    ::testing::internal::CaptureStderr();
    {
      auto loader = pipeline::open_loader(o, faults);
      for (int e = 0; e < 2; ++e) ASSERT_NO_FATAL_FAILURE(check_epoch(*loader));
    }
    std::string log = ::testing::internal::GetCapturedStderr();
    EXPECT_NE(log.find("a read of the cache failed: EIO"), std::string::npos) << log;
  }
}

TEST_F(CacheTest, ARestartReusesTheCacheAndRefetchesWhatIsDamaged) {
  {
    auto loader = Loader::open(options(CachePolicy::kClairvoyant, kSamples));
    ASSERT_NO_FATAL_FAILURE(check_epoch(*loader));
  }
  // Damage a cached sample in the slot's mirror: it must be found out and fetched again.
  fs::path shard;
  for (auto& e : fs::recursive_directory_iterator(cache()))
    if (e.path().filename() == "shard-00000.sluice") shard = e.path();
  ASSERT_FALSE(shard.empty());
  {
    int fd = ::open(shard.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    char junk[64] = {1, 2, 3};
    ASSERT_EQ(pwrite(fd, junk, sizeof junk, 4096 + 100), 64);
    ::close(fd);
  }
  auto loader = Loader::open(options(CachePolicy::kClairvoyant, kSamples));
  ASSERT_NO_FATAL_FAILURE(check_epoch(*loader));
  LoaderStats s = loader->stats();
  EXPECT_LE(s.source_bytes, 8 * kBytes) << "the first run's samples were fetched again";
  EXPECT_GE(s.source_bytes, kBytes) << "the damaged sample was not fetched again";
}

TEST_F(CacheTest, AnObjectChangedUnderTheLoaderFailsNamingObjectAndSample) {
  auto loader = Loader::open(options(CachePolicy::kClairvoyant, 64));
  // Sample 0 of shard 0 is rewritten at the source after the dataset was opened.
  {
    int fd = ::open((src() / "shard-00000.sluice").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    std::vector<char> junk(kBytes, 'x');
    ASSERT_EQ(pwrite(fd, junk.data(), junk.size(), 4096), static_cast<ssize_t>(kBytes));
    ::close(fd);
  }
  try {
    for (int e = 0; e < 2; ++e)
      while (loader->next()) {
      }
    FAIL() << "a changed object went unnoticed";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCorruption);
    std::string what = e.what();
    EXPECT_NE(what.find("shard-00000.sluice"), std::string::npos) << what;
    EXPECT_NE(what.find("(sample 0)"), std::string::npos) << what;
    EXPECT_NE(what.find("checksum mismatch"), std::string::npos) << what;
  }
}

// Ranks of one node: loaders of rank 0 and 1 of 2 over one cache.dir. Two loaders in one
// process share it as two processes do (the locks are per open file; test_s3.py runs processes).
class RanksTest : public CacheTest {
 protected:
  std::unique_ptr<Loader> rank(uint32_t r, uint64_t capacity_samples) const {
    auto o = options(CachePolicy::kClairvoyant, capacity_samples);
    o.distributed.rank = r;
    o.distributed.world_size = 2;
    return Loader::open(o);
  }
  // One epoch of the ranks still open, a batch of each in turn; every sample of the ranks once
  // with its bytes. `stop`: ranks[0] is closed after that many of its batches.
  static void epoch(std::vector<std::unique_ptr<Loader>>& ranks, std::vector<uint64_t>& seen,
                    int stop = -1) {
    for (int step = 0, more = 1; more; ++step) {
      more = 0;
      if (step == stop) ranks[0].reset();
      for (auto& l : ranks) {
        if (!l) continue;
        auto b = l->next();
        if (!b) continue;
        more = 1;
        FieldView data = b->field("data");
        for (size_t i = 0; i < b->size(); ++i) {
          auto want = payload(b->indices()[i]);
          auto got = data.sample(i);
          ASSERT_TRUE(std::equal(got.begin(), got.end(), want.begin(), want.end()))
              << "sample " << b->indices()[i];
          seen.push_back(b->indices()[i]);
        }
      }
    }
  }
};

TEST_F(RanksTest, EachSampleComesFromTheSourceOnceForAllRanks) {
  // The cache holds the dataset: two epochs fetch each sample once, whichever rank fetched it
  // (a cache per rank fetches what the other rank read in epoch 1 again: about 1.5x).
  std::vector<std::unique_ptr<Loader>> ranks;
  for (uint32_t r = 0; r < 2; ++r) ranks.push_back(rank(r, kSamples));
  for (int e = 0; e < 2; ++e) {
    std::vector<uint64_t> seen;
    ASSERT_NO_FATAL_FAILURE(epoch(ranks, seen));
    std::sort(seen.begin(), seen.end());
    ASSERT_EQ(seen.size(), kSamples - kSamples % 64);
    ASSERT_TRUE(std::adjacent_find(seen.begin(), seen.end()) == seen.end());
  }
  uint64_t bytes = 0, hits = 0;
  for (auto& l : ranks) {
    bytes += l->stats().source_bytes;
    hits += l->stats().cache_hits;
  }
  EXPECT_LE(bytes, kSamples * kBytes);
  EXPECT_GE(bytes, (kSamples - kSamples % 64) * kBytes);
  EXPECT_GT(hits, kSamples) << "the second epoch came from the source again";
}

TEST_F(RanksTest, ARankThatEndsHandsTheFetchingOver) {
  // The cache holds a quarter: whichever rank leads (fetches, evicts) ends in the middle of an
  // epoch in one of the two rounds, and the other goes on to deliver its samples.
  std::vector<std::unique_ptr<Loader>> ranks;
  for (uint32_t r = 0; r < 2; ++r) ranks.push_back(rank(r, kSamples / 4));
  for (int round = 0; round < 2; ++round) {
    std::vector<uint64_t> seen;
    ASSERT_NO_FATAL_FAILURE(epoch(ranks, seen, 5));
    ASSERT_FALSE(ranks[0]);
    EXPECT_EQ(seen.size(), 5 * 32 + (kSamples - kSamples % 64) / 2);
    // Round 2: rank 1 (in its second epoch) ends, a new rank 0 reads its first.
    std::swap(ranks[0], ranks[1]);
    ranks[1] = rank(0, kSamples / 4);
  }
}

TEST_F(CacheTest, ResumeMidEpochDeliversExactlyTheRest) {
  auto o = options(CachePolicy::kClairvoyant, kSamples / 4);
  std::vector<uint64_t> first;
  SamplerState state;
  {
    auto loader = Loader::open(o);
    for (int i = 0; i < 20; ++i) {
      auto b = loader->next();
      ASSERT_TRUE(b);
      first.insert(first.end(), b->indices().begin(), b->indices().end());
    }
    state = loader->state();
  }
  auto loader = Loader::open(o);
  loader->load_state(state);
  while (auto b = loader->next())
    first.insert(first.end(), b->indices().begin(), b->indices().end());
  std::sort(first.begin(), first.end());
  ASSERT_EQ(first.size(), kSamples - kSamples % 32);
  EXPECT_TRUE(std::adjacent_find(first.begin(), first.end()) == first.end());
}

}  // namespace
}  // namespace sluice
