// The Loader end to end: bytes equal the dataset's, exactly once per epoch, epochs, resume,
// faults at the engine seam, fallbacks, shutdown and batch lifetime.

#include <sluice/loader.h>

#include "../io/fault_engine.h"
#include "io/engine.h"
#include "io/queue_stats.h"
#include "pipeline/open.h"
#include "test_util.h"

#include <dirent.h>
#include <fmt/format.h>
#include <sched.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <future>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

namespace sluice {
namespace {

namespace fs = std::filesystem;
using testing::Fault;
using testing::FaultEngine;

class LoaderTest : public ::testing::Test {
 protected:
  void SetUp() override { written_ = testing::write_dataset(dir(), kSamples, 9000, 48 << 10); }

  // This test's seams (io::Faults), given to the loaders it opens with open() from then on.
  void set_engine_wrapper(
      std::function<std::unique_ptr<io::Engine>(std::unique_ptr<io::Engine>)> f) {
    auto faults = std::make_shared<io::Faults>(faults_ ? *faults_ : io::Faults{});
    faults->wrap_engine = std::move(f);
    faults_ = faults;
  }
  void set_uring_setup_fault(int error) {
    auto faults = std::make_shared<io::Faults>(faults_ ? *faults_ : io::Faults{});
    faults->uring_setup = error;
    faults_ = faults;
  }
  std::unique_ptr<Loader> open(const LoaderOptions& o) const {
    return pipeline::open_loader(o, faults_);
  }
  std::shared_ptr<const io::Faults> faults_;

  fs::path dir() const { return tmp_ / "ds"; }

  LoaderOptions options(uint64_t batch = 16) const {
    LoaderOptions o;
    o.dataset.path = dir();
    o.batch_size = batch;
    o.drop_last = false;
    o.seed = 11;
    o.io.queue_depth = 8;
    o.io.timeout_ms = 5000;
    o.distributed.rank = 0;
    o.distributed.world_size = 1;
    return o;
  }

  // Checks a batch against what was written; returns its real (non-padding) indices.
  std::vector<uint64_t> check_batch(const Batch& b) {
    std::vector<uint64_t> real;
    FieldView data = b.field("data"), label = b.field("label");
    EXPECT_EQ(data.offsets.size(), b.size() + 1);
    EXPECT_EQ(label.shape, (std::vector<int64_t>{static_cast<int64_t>(b.size())}));
    EXPECT_EQ(label.dtype, DType::kInt64);
    for (size_t i = 0; i < b.size(); ++i) {
      uint64_t index = b.indices()[i];
      auto bytes = data.sample(i);
      const auto& expected = written_[index];
      EXPECT_EQ(bytes.size(), expected.size()) << "sample " << index;
      EXPECT_TRUE(std::equal(bytes.begin(), bytes.end(), expected.begin())) << "sample " << index;
      int64_t l;
      std::memcpy(&l, label.sample(i).data(), 8);
      EXPECT_EQ(l, static_cast<int64_t>(index % 10));
      if (!b.padding()[i]) real.push_back(index);
    }
    return real;
  }

  // Runs one epoch; returns every real index delivered.
  std::vector<uint64_t> epoch(Loader& loader, size_t* batches = nullptr) {
    std::vector<uint64_t> seen;
    size_t n = 0;
    while (auto b = loader.next()) {
      auto real = check_batch(*b);
      seen.insert(seen.end(), real.begin(), real.end());
      ++n;
    }
    if (batches) *batches = n;
    return seen;
  }

  static constexpr uint64_t kSamples = 1000;
  testing::TempDir tmp_;
  std::vector<std::vector<std::byte>> written_;
};

void expect_exactly_once(std::vector<uint64_t> seen, uint64_t n) {
  std::sort(seen.begin(), seen.end());
  ASSERT_EQ(seen.size(), n);
  for (uint64_t i = 0; i < n; ++i) ASSERT_EQ(seen[i], i);
}

// Each thread of this process named NAME: its scheduling policy (/proc/self/task/TID/stat,
// field 41).
std::vector<int> policies_of_threads_named(const std::string& name) {
  std::vector<int> out;
  for (const auto& task : fs::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string got;
    std::getline(comm, got);
    if (got != name) continue;
    std::ifstream stat(task.path() / "stat");
    std::string line;
    std::getline(stat, line);
    std::istringstream fields(line.substr(line.rfind(')') + 2));  // after "pid (comm) "
    std::string field;
    for (int k = 3; k <= 41 && fields >> field; ++k) {
    }
    out.push_back(std::stoi(field));
  }
  return out;
}

// Loader threads are SCHED_BATCH: woken by next(), they do not take the consumer's core
// (common/thread.h).
TEST_F(LoaderTest, LoaderThreadsAreNamedAndNeverPreemptTheConsumer) {
  LoaderOptions o = options();
  o.io.threads = 2;
  auto loader = open(o);
  ASSERT_NE(loader->next(), nullptr);
  for (const char* name : {"sluice-load0", "sluice-load1"}) {
    const std::vector<int> policies = policies_of_threads_named(name);
    ASSERT_EQ(policies.size(), 1u) << name;
    EXPECT_EQ(policies[0], SCHED_BATCH) << name;
  }
}

TEST_F(LoaderTest, EveryEngineAndModeDeliversTheDatasetExactlyOnce) {
  for (auto engine : {IoEngineKind::kUring, IoEngineKind::kThreads})
    for (auto direct : {testing::direct_where_possible(dir()), DirectIo::kOff})
      for (auto mode :
           {ShuffleMode::kGlobal, ShuffleMode::kBlock, ShuffleMode::kShard, ShuffleMode::kNone})
        for (uint32_t threads : {1u, 3u}) {
          SCOPED_TRACE(fmt::format("engine {} direct {} mode {} threads {}", int(engine),
                                   int(direct), to_string(mode), threads));
          auto o = options();
          o.io.engine = engine;
          o.io.direct = direct;
          o.io.threads = threads;
          o.shuffle.mode = mode;
          o.shuffle.block_size = 50;
          o.shuffle.buffer_size = 70;
          auto loader = Loader::open(o);
          size_t batches = 0;
          std::vector<uint64_t> got = epoch(*loader, &batches);
          expect_exactly_once(got, kSamples);
          EXPECT_EQ(batches, loader->num_batches());
          // The delivery order is the sampler's, whatever the engine and threads.
          Sampler sampler(o.sampler_options(), kSamples, Dataset::open(dir())->shard_sizes());
          RankPlan plan = sampler.plan({0, 0}, 0, 1);
          std::vector<uint64_t> want;
          std::vector<SampleRef> refs;
          for (uint64_t step = 0; step < plan.num_batches(); ++step) {
            plan.batch(step, refs);
            for (const SampleRef& r : refs)
              if (!r.padding) want.push_back(r.index);
          }
          EXPECT_EQ(got, want);
        }
}

// Every loader thread builds a batch at once, whatever `prefetch` says: with a window of
// prefetch batches, prefetch 4 left 12 of 16 decoding threads idle (issue 34, on an H200). Each
// thread's engine holds its first read until all four threads are reading, or 2 s.
TEST_F(LoaderTest, EveryLoaderThreadBuildsABatchAtOnceEvenWithPrefetchOne) {
  constexpr uint32_t kThreads = 4;
  struct Gate {
    std::mutex mu;
    std::condition_variable cv;
    uint32_t arrived = 0, timed_out = 0;
  };
  class GateEngine final : public io::Engine {
   public:
    GateEngine(std::unique_ptr<io::Engine> inner, std::shared_ptr<Gate> gate)
        : inner_(std::move(inner)), gate_(std::move(gate)) {}
    std::string describe() const override { return inner_->describe(); }
    uint32_t queue_depth() const override { return inner_->queue_depth(); }
    int submit(const io::Request& r) override { return inner_->submit(r); }
    int flush() override { return inner_->flush(); }
    int reap(std::span<io::Completion> out, std::chrono::milliseconds timeout) override {
      if (!waited_) {
        waited_ = true;
        std::unique_lock lock(gate_->mu);
        ++gate_->arrived;
        gate_->cv.notify_all();
        if (!gate_->cv.wait_for(lock, std::chrono::seconds(2),
                                [&] { return gate_->arrived >= kThreads; }))
          ++gate_->timed_out;
      }
      return inner_->reap(out, timeout);
    }

   private:
    std::unique_ptr<io::Engine> inner_;
    std::shared_ptr<Gate> gate_;
    bool waited_ = false;
  };
  auto gate = std::make_shared<Gate>();
  set_engine_wrapper([gate](std::unique_ptr<io::Engine> e) -> std::unique_ptr<io::Engine> {
    return std::make_unique<GateEngine>(std::move(e), gate);
  });
  LoaderOptions o = options();
  o.io.threads = kThreads;
  o.io.direct = DirectIo::kOff;  // an engine per loader thread
  o.prefetch = 1;
  auto loader = open(o);
  uint64_t samples = 0;
  while (auto b = loader->next()) samples += b->size();
  EXPECT_EQ(samples, kSamples);
  std::lock_guard lock(gate->mu);
  EXPECT_EQ(gate->arrived, kThreads);
  EXPECT_EQ(gate->timed_out, 0u) << "a loader thread waited for the window instead of reading";
}

// stats() says where the time went: reads in flight (through the one IO thread under O_DIRECT,
// the loader threads' own queues through the page cache), loader stages, process CPU.
TEST_F(LoaderTest, StatsAccountForReadsInFlightStagesAndCpu) {
  for (DirectIo direct : {testing::direct_where_possible(dir()), DirectIo::kOff}) {
    LoaderOptions o = options();
    o.io.direct = direct;
    o.io.threads = 2;
    auto loader = open(o);
    while (loader->next()) {
    }
    LoaderStats s = loader->stats();
    SCOPED_TRACE(s.direct_io ? "O_DIRECT" : "page cache");
    EXPECT_GE(s.io_completions, kSamples / 16);  // at least one read per batch
    ASSERT_EQ(s.io_inflight_hist.size(), io::QueueStats::kLevels);
    double sum = 0;
    for (double share : s.io_inflight_hist) sum += share;
    EXPECT_NEAR(sum, 1, 1e-9);
    EXPECT_DOUBLE_EQ(s.io_idle_fraction, s.io_inflight_hist[0]);
    EXPECT_GT(s.io_inflight_mean, 0);
    EXPECT_LE(s.io_inflight_mean, 2.0 * o.io.queue_depth);  // two queues at most
    EXPECT_GT(s.stage_seconds.read, 0);
    EXPECT_GT(s.stage_seconds.assemble, 0);
    EXPECT_EQ(s.stage_seconds.remote, 0);
    EXPECT_EQ(s.stage_seconds.device, 0);
    EXPECT_GT(s.cpu_seconds, 0);
  }
}

TEST_F(LoaderTest, OrderMatchesTheSampler) {
  auto o = options(10);
  o.io.threads = 2;
  auto loader = Loader::open(o);
  Sampler sampler(o.sampler_options(), kSamples, Dataset::open(dir())->shard_sizes());
  RankPlan plan = sampler.plan({0, 0}, 0, 1);
  std::vector<SampleRef> refs;
  uint64_t step = 0;
  while (auto b = loader->next()) {
    plan.batch(step, refs);
    ASSERT_EQ(b->size(), refs.size());
    for (size_t i = 0; i < refs.size(); ++i) EXPECT_EQ(b->indices()[i], refs[i].index);
    EXPECT_EQ(b->step(), step++);
  }
}

TEST_F(LoaderTest, EpochsAdvanceAndDiffer) {
  auto loader = Loader::open(options());
  std::vector<uint64_t> first;
  auto b0 = loader->next();
  first.assign(b0->indices().begin(), b0->indices().end());
  EXPECT_EQ(b0->epoch(), 0u);
  while (loader->next()) {
  }
  auto b1 = loader->next();  // the call after the end starts epoch 1
  ASSERT_TRUE(b1);
  EXPECT_EQ(b1->epoch(), 1u);
  EXPECT_NE(std::vector<uint64_t>(b1->indices().begin(), b1->indices().end()), first);
  loader->set_epoch(0);
  auto again = loader->next();
  EXPECT_EQ(std::vector<uint64_t>(again->indices().begin(), again->indices().end()), first);
}

TEST_F(LoaderTest, ManyEpochsWithResumeInTheMiddle) {
  for (uint64_t e = 0; e < 4; ++e) {
    auto o = options(24);
    auto loader = Loader::open(o);
    loader->set_epoch(e);
    std::vector<uint64_t> seen;
    for (uint64_t k = 0; k < 5 + e; ++k) {
      auto b = loader->next();
      auto real = check_batch(*b);
      seen.insert(seen.end(), real.begin(), real.end());
    }
    SamplerState state = loader->state();
    EXPECT_EQ(state.epoch, e);
    loader.reset();  // "the job dies"
    auto resumed = Loader::open(o);
    resumed->load_state(state);
    auto rest = epoch(*resumed);
    seen.insert(seen.end(), rest.begin(), rest.end());
    expect_exactly_once(seen, kSamples);
    EXPECT_EQ(resumed->state(), (SamplerState{e + 1, 0}));
  }
}

TEST_F(LoaderTest, ElasticResumeOnAnotherWorldSize) {
  auto o = options(8);
  std::vector<uint64_t> seen;
  SamplerState state;
  for (uint32_t r = 0; r < 4; ++r) {  // 4 ranks, 6 steps each
    o.distributed.rank = r;
    o.distributed.world_size = 4;
    auto loader = Loader::open(o);
    for (int k = 0; k < 6; ++k) {
      auto real = check_batch(*loader->next());
      seen.insert(seen.end(), real.begin(), real.end());
    }
    state = loader->state();
  }
  for (uint32_t r = 0; r < 3; ++r) {  // the rest on 3 ranks
    o.distributed.rank = r;
    o.distributed.world_size = 3;
    auto loader = Loader::open(o);
    loader->load_state(state);
    auto rest = epoch(*loader);
    seen.insert(seen.end(), rest.begin(), rest.end());
  }
  expect_exactly_once(seen, kSamples);
}

TEST_F(LoaderTest, EioAtTheEngineSeamNamesShardOffsetAndSample) {
  std::atomic<int> submits{0};
  set_engine_wrapper([&](std::unique_ptr<io::Engine> e) -> std::unique_ptr<io::Engine> {
    return std::make_unique<FaultEngine>(std::move(e), [&](const io::Request&) {
      return ++submits == 40 ? Fault::kError : Fault::kNone;
    });
  });
  auto loader = open(options());
  try {
    while (loader->next()) {
    }
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIo);
    EXPECT_EQ(e.sys_errno(), EIO);
    std::string what = e.what();
    EXPECT_NE(what.find("read " + dir().string() + "/shard-"), std::string::npos) << what;
    EXPECT_NE(what.find("(sample "), std::string::npos) << what;
    EXPECT_NE(what.find("EIO"), std::string::npos) << what;
  }
  EXPECT_THROW(loader->next(), Error);  // stays failed until restarted
  set_engine_wrapper({});
  loader->set_epoch(0);
  expect_exactly_once(epoch(*loader), kSamples);
}

// Faults at random points of an epoch: an EIO anywhere fails next() naming the sample, and
// resuming from the state the consumer had reached delivers exactly the rest, with short reads
// and EAGAIN sprinkled over every read. No sample is lost or delivered twice.
TEST_F(LoaderTest, EioAtRandomPointsThenResumeLosesNoSample) {
  std::mt19937 rng(20261124);
  for (int trial = 0; trial < 6; ++trial) {
    const int fail_at = 1 + static_cast<int>(rng() % 120);
    std::atomic<int> submits{0};
    set_engine_wrapper([&](std::unique_ptr<io::Engine> e) -> std::unique_ptr<io::Engine> {
      return std::make_unique<FaultEngine>(std::move(e), [&](const io::Request&) {
        int n = ++submits;
        return n == fail_at ? Fault::kError : n % 3 == 0 ? Fault::kShort : Fault::kNone;
      });
    });
    auto o = options();
    o.io.threads = 1 + trial % 3;
    auto loader = open(o);
    std::vector<uint64_t> seen;
    try {
      while (auto b = loader->next()) {
        auto real = check_batch(*b);
        seen.insert(seen.end(), real.begin(), real.end());
      }
      ADD_FAILURE() << "trial " << trial << ": no error from the EIO at submit " << fail_at;
    } catch (const Error& e) {
      EXPECT_EQ(e.sys_errno(), EIO) << e.what();
      EXPECT_NE(std::string(e.what()).find("(sample "), std::string::npos) << e.what();
    }
    SamplerState state = loader->state();
    set_engine_wrapper({});
    loader = open(o);
    loader->load_state(state);
    auto rest = epoch(*loader);
    seen.insert(seen.end(), rest.begin(), rest.end());
    expect_exactly_once(seen, kSamples);
  }
}

// A read that completes after its batch's deadline (the device answers late) is waited for
// before the batch's memory goes back to the pool: later batches, held until long after the
// late bytes came, are all intact. Without that drain the late bytes land in whichever batch
// reuses the buffer.
TEST_F(LoaderTest, AReadCompletingAfterItsDeadlineNeverLandsInAReusedBuffer) {
  for (DirectIo direct : {testing::direct_where_possible(dir()), DirectIo::kOff}) {
    std::atomic<int> submits{0};
    std::promise<void> late_written;
    std::future<void> written = late_written.get_future();
    set_engine_wrapper([&](std::unique_ptr<io::Engine> e) -> std::unique_ptr<io::Engine> {
      return std::make_unique<FaultEngine>(
          std::move(e),
          [&](const io::Request&) { return ++submits == 5 ? Fault::kLate : Fault::kNone; }, -EIO,
          std::chrono::milliseconds(600), [&] { late_written.set_value(); });
    });
    auto o = options();
    o.io.timeout_ms = 200;
    o.io.direct = direct;
    o.io.threads = 2;
    o.max_batches_held = 64;
    auto loader = open(o);
    try {
      while (auto b = loader->next()) check_batch(*b);
      ADD_FAILURE() << "no timeout";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("timed out"), std::string::npos) << e.what();
    }
    loader->set_epoch(1);
    std::vector<std::shared_ptr<const Batch>> kept;
    while (auto b = loader->next()) kept.push_back(b);
    ASSERT_EQ(written.wait_for(std::chrono::seconds(20)), std::future_status::ready)
        << "the late read never landed";
    std::vector<uint64_t> seen;
    for (const auto& b : kept) {
      auto real = check_batch(*b);
      seen.insert(seen.end(), real.begin(), real.end());
    }
    expect_exactly_once(seen, kSamples);
    loader.reset();
    set_engine_wrapper({});
  }
}

TEST_F(LoaderTest, ShortReadsAndEagainAreInvisible) {
  std::atomic<int> submits{0};
  set_engine_wrapper([&](std::unique_ptr<io::Engine> e) -> std::unique_ptr<io::Engine> {
    return std::make_unique<FaultEngine>(std::move(e), [&](const io::Request&) {
      int n = ++submits;
      return n % 2 ? Fault::kShort : n % 7 == 0 ? Fault::kAgain : Fault::kNone;
    });
  });
  for (auto engine : {IoEngineKind::kUring, IoEngineKind::kThreads}) {
    auto o = options();
    o.io.engine = engine;
    o.io.threads = 2;
    auto loader = open(o);
    expect_exactly_once(epoch(*loader), kSamples);
  }
}

TEST_F(LoaderTest, AHungReadTimesOutWithAnError) {
  set_engine_wrapper([](std::unique_ptr<io::Engine> e) -> std::unique_ptr<io::Engine> {
    return std::make_unique<FaultEngine>(std::move(e), [](const io::Request& r) {
      // Op 2 of every batch's reads (the tag's high half names the caller's slot in the
      // shared IO queue, which depends on thread timing).
      return (r.tag & 0xffffffffu) == 2 ? Fault::kHang : Fault::kNone;
    });
  });
  auto o = options();
  o.io.timeout_ms = 300;
  auto loader = open(o);
  auto t0 = std::chrono::steady_clock::now();
  try {
    loader->next();
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("timed out"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
}

TEST_F(LoaderTest, CorruptSampleIsNamed) {
  auto ds = Dataset::open(dir());
  SampleExtent x = ds->extent(123);
  {
    std::fstream f(ds->shards()[x.shard].path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(x.offset));
    f.put('\x7f');
    f.put('\x01');
  }
  auto o = options();
  o.io.direct = DirectIo::kOff;  // the write above went through the page cache
  auto loader = open(o);
  try {
    while (loader->next()) {
    }
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kCorruption);
    EXPECT_NE(std::string(e.what()).find("sample 123: checksum mismatch"), std::string::npos)
        << e.what();
  }
}

TEST_F(LoaderTest, FallsBackWhenIoUringIsDisabled) {
  set_uring_setup_fault(-EPERM);
  auto loader = open(options());
  expect_exactly_once(epoch(*loader), kSamples);
  EXPECT_NE(loader->stats().engine.find("pread thread pool"), std::string::npos)
      << loader->stats().engine;
  auto o = options();
  o.io.engine = IoEngineKind::kUring;
  auto strict = open(o);
  EXPECT_THROW(strict->next(), Error);
}

size_t thread_count() {
  size_t n = 0;
  for (const auto& e : fs::directory_iterator("/proc/self/task")) {
    (void)e;
    ++n;
  }
  return n;
}

TEST_F(LoaderTest, ShutdownMidEpochJoinsEverything) {
  Loader::open(options())->next();  // sanitizer runtimes start helper threads on first use
  size_t before = thread_count();
  for (int round = 0; round < 20; ++round) {
    auto o = options(4);
    o.io.threads = 3;
    o.io.engine = round % 2 ? IoEngineKind::kThreads : IoEngineKind::kUring;
    auto loader = Loader::open(o);
    for (int k = 0; k < round % 5; ++k) loader->next();
    auto t0 = std::chrono::steady_clock::now();
    loader.reset();
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  }
  // io_uring's kernel workers (iou-wrk) are threads of this process too and leave shortly
  // after their ring is gone; loader threads are joined before reset() returns.
  for (int i = 0; i < 200 && thread_count() > before; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(thread_count(), before);
}

TEST_F(LoaderTest, BatchesOutliveTheLoaderAndMayAllBeHeld) {
  LoaderOptions o = options();
  o.max_batches_held = 1000;
  auto loader = Loader::open(o);
  std::vector<std::shared_ptr<const Batch>> held;
  while (auto b = loader->next()) held.push_back(b);  // hold a whole epoch
  EXPECT_EQ(held.size(), loader->num_batches());
  loader.reset();
  std::vector<uint64_t> seen;
  for (const auto& b : held) {
    auto real = check_batch(*b);
    seen.insert(seen.end(), real.begin(), real.end());
  }
  expect_exactly_once(seen, kSamples);
}

TEST_F(LoaderTest, HoldingTooManyBatchesStopsTheLoaderWithAClearError) {
  LoaderOptions o = options();
  o.max_batches_held = 5;
  o.prefetch = 2;
  o.io.threads = 2;
  o.io.timeout_ms = 300;
  auto loader = Loader::open(o);
  std::vector<std::shared_ptr<const Batch>> held;
  try {
    while (auto b = loader->next()) held.push_back(b);
    FAIL() << "held " << held.size() << " batches without back-pressure";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("max_batches_held: 5"), std::string::npos) << e.what();
  }
  // Holding five, the consumer gets a sixth; asking for a seventh is refused at once (not after
  // the IO timeout).
  EXPECT_EQ(held.size(), 6u);
  EXPECT_EQ(loader->stats().batches_held, held.size());
  held.clear();
  EXPECT_EQ(loader->stats().batches_held, 0u);
}

TEST_F(LoaderTest, DroppingHeldBatchesLetsTheLoaderGoOn) {
  LoaderOptions o = options();
  o.max_batches_held = 3;
  auto loader = Loader::open(o);
  std::deque<std::shared_ptr<const Batch>> held;  // a consumer that keeps the last three
  std::vector<uint64_t> seen;
  while (auto b = loader->next()) {
    auto real = check_batch(*b);
    seen.insert(seen.end(), real.begin(), real.end());
    held.push_back(b);
    if (held.size() > 3) held.pop_front();
  }
  expect_exactly_once(seen, kSamples);
}

TEST_F(LoaderTest, WaitReturnsOnceNextWillNotBlock) {
  auto loader = Loader::open(options());
  EXPECT_EQ(loader->batches_per_epoch(), loader->num_batches());
  uint64_t batches = 0;
  while (true) {
    while (!loader->wait(std::chrono::milliseconds(1))) {
    }
    auto b = loader->next();
    if (!b) break;
    ++batches;
  }
  EXPECT_EQ(batches, loader->batches_per_epoch());
  // At the end of the epoch wait() starts the next one.
  EXPECT_TRUE(loader->wait(std::chrono::seconds(5)));
  EXPECT_EQ(loader->epoch(), 1u);
  loader->load_state({1, 100});
  EXPECT_EQ(loader->batches_per_epoch(), batches);
  EXPECT_LT(loader->num_batches(), batches);
}

TEST_F(LoaderTest, BatchesAreUsableFromAnotherThread) {
  auto loader = Loader::open(options());
  auto b = loader->next();
  std::vector<uint64_t> from_thread;
  std::thread t([&] { from_thread = check_batch(*b); });
  t.join();
  EXPECT_EQ(from_thread.size(), b->size());
}

TEST_F(LoaderTest, SingleFixedFieldIsReadStraightIntoTheBatch) {
  testing::TempDir t;
  WriterOptions w;
  w.fields = {{"data", DType::kUInt8, {8192}}};
  w.shard_bytes = 200 << 10;
  auto writer = DatasetWriter::create(t / "blocks", w);
  std::vector<std::vector<std::byte>> written;
  for (uint64_t i = 0; i < 300; ++i) {
    written.push_back(testing::sample_bytes(i, 9, 8192));
    std::span<const std::byte> f[] = {written.back()};
    writer->add(f);
  }
  writer->finish();
  for (auto mode : {ShuffleMode::kNone, ShuffleMode::kGlobal})
    for (auto engine : {IoEngineKind::kUring, IoEngineKind::kThreads})
      for (auto direct : {testing::direct_where_possible(dir()), DirectIo::kOff}) {
        LoaderOptions o;
        o.dataset.path = t / "blocks";
        o.batch_size = 32;
        o.drop_last = false;
        o.shuffle.mode = mode;
        o.io.engine = engine;
        o.io.direct = direct;
        o.distributed.rank = 0;
        o.distributed.world_size = 1;
        auto loader = Loader::open(o);
        std::vector<uint64_t> seen;
        while (auto b = loader->next()) {
          FieldView v = b->field("data");
          EXPECT_EQ(v.shape, (std::vector<int64_t>{static_cast<int64_t>(b->size()), 8192}));
          for (size_t i = 0; i < b->size(); ++i) {
            auto bytes = v.sample(i);
            const auto& expected = written[b->indices()[i]];
            ASSERT_TRUE(std::equal(bytes.begin(), bytes.end(), expected.begin()));
            if (!b->padding()[i]) seen.push_back(b->indices()[i]);
          }
        }
        expect_exactly_once(seen, 300);
      }
  // A flipped byte is still caught on this path.
  auto ds = Dataset::open(t / "blocks");
  SampleExtent x = ds->extent(77);
  {
    std::fstream f(ds->shards()[x.shard].path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(x.offset + 100));
    f.put('\x55');
    f.put('\x66');
  }
  LoaderOptions o;
  o.dataset.path = t / "blocks";
  o.batch_size = 32;
  o.io.direct = DirectIo::kOff;
  o.distributed.rank = 0;
  o.distributed.world_size = 1;
  auto loader = Loader::open(o);
  try {
    while (loader->next()) {
    }
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sample 77: checksum mismatch"), std::string::npos)
        << e.what();
  }
}

TEST_F(LoaderTest, FixedSizeFieldsAreDense) {
  testing::TempDir t;
  WriterOptions w;
  w.fields = {{"x", DType::kFloat32, {2, 3}}, {"y", DType::kInt64, {}}};
  auto writer = DatasetWriter::create(t / "fixed", w);
  for (int64_t i = 0; i < 50; ++i) {
    float x[6];
    for (int k = 0; k < 6; ++k) x[k] = static_cast<float>(i * 10 + k);
    std::span<const std::byte> f[] = {std::as_bytes(std::span(x)), std::as_bytes(std::span(&i, 1))};
    writer->add(f);
  }
  writer->finish();
  LoaderOptions o;
  o.dataset.path = t / "fixed";
  o.batch_size = 7;
  o.drop_last = true;
  o.distributed.rank = 0;
  o.distributed.world_size = 1;
  auto loader = Loader::open(o);
  size_t batches = 0;
  while (auto b = loader->next()) {
    ++batches;
    FieldView x = b->field("x");
    EXPECT_EQ(x.shape, (std::vector<int64_t>{7, 2, 3}));
    EXPECT_TRUE(x.offsets.empty());
    ASSERT_EQ(x.data.size(), 7u * 24);
    const float* v = reinterpret_cast<const float*>(x.data.data());
    for (size_t i = 0; i < 7; ++i) EXPECT_EQ(v[i * 6 + 5], float(b->indices()[i] * 10 + 5));
    EXPECT_THROW(b->field("nope"), Error);
  }
  EXPECT_EQ(batches, 7u);  // 50 / 7, tail dropped
}

}  // namespace
}  // namespace sluice
