// Both IO engines against plain pread, read_all's handling of short reads, EAGAIN, errors,
// timeouts and io_uring being unavailable, and the shared IO service with many callers.

#include "io/engine.h"
#include "io/queue_stats.h"
#include "io/service.h"

#include "common/file.h"
#include "fault_engine.h"
#include "memory/aligned_buffer.h"
#include "test_util.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <random>
#include <thread>

namespace sluice {
namespace {

using testing::Fault;
using testing::FaultEngine;

class EngineTest : public ::testing::TestWithParam<io::EngineKind> {
 protected:
  void SetUp() override {
    contents_ = testing::sample_bytes(1, 2, 3 << 20);
    {
      std::ofstream f(tmp_ / "file", std::ios::binary);
      f.write(reinterpret_cast<const char*>(contents_.data()),
              static_cast<std::streamsize>(contents_.size()));
    }
    fd_ = detail::open_file(tmp_ / "file", O_RDONLY);
    fds_ = {fd_.get()};
  }

  std::unique_ptr<io::Engine> engine(uint32_t depth = 16) {
    io::EngineOptions o;
    o.kind = GetParam();
    o.queue_depth = depth;
    return io::make_engine(o, fds_, {});
  }

  // Random ops (unaligned, some empty) and where each lands in `buffer`.
  std::vector<io::ReadOp> random_ops(size_t count, std::vector<std::byte>& buffer) {
    std::mt19937_64 rng(7);
    std::vector<io::ReadOp> ops;
    std::vector<size_t> at;
    size_t total = 0;
    for (size_t i = 0; i < count; ++i) {
      uint32_t len = static_cast<uint32_t>(rng() % 20000);
      uint64_t off = rng() % (contents_.size() - len);
      ops.push_back({0, off, len, nullptr});
      at.push_back(total);
      total += len;
    }
    buffer.assign(total, std::byte{0});
    for (size_t i = 0; i < count; ++i) ops[i].dest = buffer.data() + at[i];
    return ops;
  }

  void expect_contents(const std::vector<io::ReadOp>& ops) {
    for (const auto& op : ops)
      ASSERT_TRUE(std::equal(op.dest, op.dest + op.length,
                             contents_.begin() + static_cast<ptrdiff_t>(op.offset)))
          << "op at " << op.offset << "+" << op.length;
  }

  static auto deadline(int ms = 10000) {
    return std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  }

  testing::TempDir tmp_;
  std::vector<std::byte> contents_;
  detail::UniqueFd fd_;
  std::vector<int> fds_;
};

TEST_P(EngineTest, SameBytesAsPread) {
  std::vector<std::byte> buffer;
  auto ops = random_ops(500, buffer);
  auto e = engine();
  ASSERT_EQ(io::read_all(*e, ops, deadline()).error, 0);
  expect_contents(ops);
}

// The queue's accounts of reads in flight: every completion counted, never more in flight than
// the queue holds, and the waits for completions at the level the queue was filled to (the
// queue fills to its depth before it waits). Times are not compared with anything.
TEST_P(EngineTest, ReadsInFlightAreAccountedAtTheLevelTheQueueHeld) {
  std::vector<std::byte> buffer;
  auto ops = random_ops(500, buffer);
  std::erase_if(ops, [](const io::ReadOp& op) { return op.length == 0; });
  constexpr uint32_t kDepth = 8;
  auto e = engine(kDepth);
  io::QueueStats stats;
  ASSERT_EQ(io::read_all(*e, ops, deadline(), nullptr, &stats).error, 0);
  expect_contents(ops);
  io::QueueStats::Snapshot s = stats.snapshot();
  EXPECT_EQ(s.completions, ops.size());  // a regular file: no short reads to continue
  const size_t full = io::QueueStats::level_of(kDepth);
  EXPECT_GT(s.seconds[full], 0) << "no time at the depth the queue was filled to";
  for (size_t level = full + 1; level < io::QueueStats::kLevels; ++level)
    EXPECT_EQ(s.seconds[level], 0)
        << "more than " << kDepth << " in flight (level " << level << ")";
  EXPECT_GT(s.read_seconds, 0);
  EXPECT_LE(s.read_seconds, kDepth * s.total_seconds() * (1 + 1e-9));
}

TEST(QueueStats, TimeGoesToTheLevelNotedBeforeIt) {
  using namespace std::chrono_literals;
  io::QueueStats stats;
  const auto t0 = std::chrono::steady_clock::time_point{} + 1h;
  stats.note(t0, 5);         // starts the clock only
  stats.note(t0 + 1s, 4);    // 1 s with 4 in flight: level 3 (4-7)
  stats.note(t0 + 3s, 0);    // 2 s with none: level 0
  stats.note(t0 + 4s, 300);  // 1 s with 300: the last level
  stats.note(t0 + 4s, 1);    // no time
  stats.add_completions(7);
  io::QueueStats::Snapshot s = stats.snapshot();
  EXPECT_DOUBLE_EQ(s.seconds[0], 2);
  EXPECT_DOUBLE_EQ(s.seconds[3], 1);
  EXPECT_DOUBLE_EQ(s.seconds[io::QueueStats::kLevels - 1], 1);
  EXPECT_DOUBLE_EQ(s.total_seconds(), 4);
  EXPECT_DOUBLE_EQ(s.read_seconds, 304);
  EXPECT_EQ(s.completions, 7u);
  EXPECT_EQ(io::QueueStats::level_of(0), 0u);
  EXPECT_EQ(io::QueueStats::level_of(1), 1u);
  EXPECT_EQ(io::QueueStats::level_of(3), 2u);
  EXPECT_EQ(io::QueueStats::level_of(128), 8u);
  EXPECT_EQ(io::QueueStats::level_of(255), 8u);
  EXPECT_EQ(io::QueueStats::level_of(256), 9u);
}

TEST_P(EngineTest, RegisteredBufferReadsTheSame) {
  std::vector<std::byte> unused;
  auto ops = random_ops(200, unused);
  memory::AlignedBuffer buffer;
  size_t total = 0;
  for (auto& op : ops) total += op.length;
  buffer.reserve(total);
  size_t at = 0;
  for (auto& op : ops) {
    op.dest = buffer.data() + at;
    at += op.length;
  }
  auto e = engine();
  bool registered = e->register_buffer({buffer.data(), buffer.capacity()});
  if (GetParam() == io::EngineKind::kUring) {
    EXPECT_TRUE(registered);
  }
  ASSERT_EQ(io::read_all(*e, ops, deadline()).error, 0);
  expect_contents(ops);
}

TEST_P(EngineTest, ShortReadsAreCompletedAndEagainRetried) {
  std::vector<std::byte> buffer;
  auto ops = random_ops(300, buffer);
  int calls = 0;
  FaultEngine e(engine(), [&](const io::Request&) {
    ++calls;
    return calls % 3 == 0 ? Fault::kShort : calls % 5 == 0 ? Fault::kAgain : Fault::kNone;
  });
  ASSERT_EQ(io::read_all(e, ops, deadline()).error, 0);
  expect_contents(ops);
  EXPECT_GT(calls, 300);  // the faults made it resubmit
}

// Checkpoint writes go through the same queue: cut short, refused with EAGAIN, continued.
TEST_P(EngineTest, ShortWritesAreContinuedAndEagainRetried) {
  const std::vector<std::byte> want = testing::sample_bytes(5, 6, 1 << 20);
  detail::UniqueFd out = detail::open_file(tmp_ / "written", O_RDWR | O_CREAT | O_TRUNC);
  const int files[1] = {out.get()};
  io::EngineOptions o;
  o.kind = GetParam();
  o.queue_depth = 8;
  int calls = 0;
  FaultEngine e(io::make_engine(o, files, {}), [&](const io::Request& r) {
    EXPECT_TRUE(r.write);
    ++calls;
    return calls % 3 == 0 ? Fault::kShort : calls % 5 == 0 ? Fault::kAgain : Fault::kNone;
  });
  std::vector<io::ReadOp> ops;
  for (uint32_t at = 0; at < want.size(); at += 64 << 10) {
    io::ReadOp op{0, at, 64 << 10, const_cast<std::byte*>(want.data()) + at};
    op.write = true;
    ops.push_back(op);
  }
  ASSERT_EQ(io::read_all(e, ops, deadline()).error, 0);
  EXPECT_GT(calls, static_cast<int>(ops.size()));  // the faults made it resubmit
  std::vector<std::byte> got(want.size());
  detail::pread_full(out.get(), got, 0, "written");
  EXPECT_TRUE(got == want);
  // A device that takes no bytes fails the write instead of being asked again forever.
  FaultEngine none(
      io::make_engine(o, files, {}),
      [&](const io::Request& r) { return r.tag == 2 ? Fault::kError : Fault::kNone; }, 0);
  io::ReadFailure f = io::read_all(none, ops, deadline());
  EXPECT_EQ(f.error, -EIO);
  EXPECT_EQ(f.op, 2u);
}

TEST_P(EngineTest, ErrorsNameTheOpAndDrain) {
  std::vector<std::byte> buffer;
  auto ops = random_ops(100, buffer);
  ops[37].length = std::max<uint32_t>(ops[37].length, 1);
  FaultEngine e(engine(),
                [&](const io::Request& r) { return r.tag == 37 ? Fault::kError : Fault::kNone; });
  io::ReadFailure f = io::read_all(e, ops, deadline());
  EXPECT_EQ(f.error, -EIO);
  EXPECT_EQ(f.op, 37u);
}

TEST_P(EngineTest, EagainForeverBecomesAnError) {
  std::vector<std::byte> buffer;
  auto ops = random_ops(10, buffer);
  for (auto& op : ops) op.length = std::max<uint32_t>(op.length, 1);
  FaultEngine e(engine(),
                [](const io::Request& r) { return r.tag == 4 ? Fault::kAgain : Fault::kNone; });
  io::ReadFailure f = io::read_all(e, ops, deadline());
  EXPECT_EQ(f.error, -EAGAIN);
  EXPECT_EQ(f.op, 4u);
}

TEST_P(EngineTest, ReadPastEndOfFileIsReported) {
  std::vector<std::byte> buffer(8192);
  std::vector<io::ReadOp> ops = {{0, contents_.size() - 100, 8192, buffer.data()}};
  auto e = engine();
  io::ReadFailure f = io::read_all(*e, ops, deadline());
  EXPECT_EQ(f.error, -ENODATA);
}

TEST_P(EngineTest, AReadThatNeverCompletesTimesOut) {
  std::vector<std::byte> buffer;
  auto ops = random_ops(20, buffer);
  for (auto& op : ops) op.length = std::max<uint32_t>(op.length, 1);
  FaultEngine e(engine(),
                [](const io::Request& r) { return r.tag == 3 ? Fault::kHang : Fault::kNone; });
  auto t0 = std::chrono::steady_clock::now();
  io::ReadFailure f = io::read_all(e, ops, deadline(300));
  EXPECT_EQ(f.error, -ETIMEDOUT);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
}

// A read that completes after the deadline is waited for (up to kDrainGrace) before read_all
// returns: its bytes never land in memory the caller has taken back.
TEST_P(EngineTest, AReadThatCompletesAfterTheDeadlineIsDrainedBeforeReturning) {
  std::vector<std::byte> buffer;
  auto ops = random_ops(20, buffer);
  for (auto& op : ops) op.length = std::max<uint32_t>(op.length, 1);
  FaultEngine e(engine(),
                [](const io::Request& r) { return r.tag == 3 ? Fault::kLate : Fault::kNone; });
  auto t0 = std::chrono::steady_clock::now();
  io::ReadFailure f = io::read_all(e, ops, deadline(200));
  EXPECT_EQ(f.error, -ETIMEDOUT);
  EXPECT_FALSE(f.in_flight);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(600));
  EXPECT_EQ(ops[3].dest[0], testing::kLateByte);  // landed before the return, not after
}

// One that is later still is reported in flight: the caller must leak that memory.
TEST_P(EngineTest, AReadLaterThanTheGraceIsReportedInFlight) {
  std::vector<std::byte> buffer;
  auto ops = random_ops(20, buffer);
  for (auto& op : ops) op.length = std::max<uint32_t>(op.length, 1);
  {
    FaultEngine e(
        engine(), [](const io::Request& r) { return r.tag == 3 ? Fault::kLate : Fault::kNone; },
        -EIO, io::kDrainGrace + std::chrono::milliseconds(500));
    io::ReadFailure f = io::read_all(e, ops, deadline(100));
    EXPECT_EQ(f.error, -ETIMEDOUT);
    EXPECT_TRUE(f.in_flight);
  }  // the engine (its late writer) goes before the buffer
}

// The IO service: one engine on its own thread, shared by several callers. Faults go in
// through the engine wrapper of the service's own options (io::Faults), which is how the
// service (like the loader) makes its engine.
class ServiceTest : public EngineTest {
 protected:
  std::unique_ptr<io::Service> service(std::function<Fault(const io::Request&)> decide = {}) {
    io::EngineOptions o;
    if (decide) {
      auto faults = std::make_shared<io::Faults>();
      faults->wrap_engine = [decide](std::unique_ptr<io::Engine> e) -> std::unique_ptr<io::Engine> {
        return std::make_unique<FaultEngine>(std::move(e), decide);
      };
      o.faults = faults;
    }
    o.kind = GetParam();
    o.queue_depth = 32;
    return std::make_unique<io::Service>(o, fds_, nullptr);
  }

  // Makes `op` the only read at its offset (and not empty), so a fault can pick it out.
  static uint64_t single_out(io::ReadOp& op, std::vector<io::ReadOp>& others) {
    op.length = std::max<uint32_t>(op.length, 1);
    for (auto& other : others)
      if (other.offset == op.offset) other.offset += 1;
    return op.offset;
  }
};

TEST_P(ServiceTest, ManyCallersGetTheirOwnBytes) {
  int calls = 0;  // the IO thread is the only caller of decide
  auto svc = service([&](const io::Request&) {
    ++calls;
    return calls % 4 == 0 ? Fault::kShort : calls % 7 == 0 ? Fault::kAgain : Fault::kNone;
  });
  std::vector<std::vector<std::byte>> buffers(4);
  std::vector<std::vector<io::ReadOp>> ops(4);
  for (size_t t = 0; t < 4; ++t) ops[t] = random_ops(300 + 50 * t, buffers[t]);
  std::vector<int> errors(4, -1);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round)
        if ((errors[t] = svc->read_all(ops[t], deadline()).error) != 0) break;
    });
  for (auto& th : threads) th.join();
  size_t reads = 0;
  for (size_t t = 0; t < 4; ++t) {
    EXPECT_EQ(errors[t], 0) << "caller " << t;
    expect_contents(ops[t]);
    reads += 3 * static_cast<size_t>(std::count_if(ops[t].begin(), ops[t].end(),
                                                   [](const io::ReadOp& op) { return op.length; }));
  }
  // One queue for every caller: each read completed at least once (short and EAGAIN ones
  // again), never more in flight than its depth of 32.
  io::QueueStats::Snapshot s = svc->stats().snapshot();
  EXPECT_GT(s.completions, reads);
  EXPECT_GT(s.seconds[io::QueueStats::level_of(32)], 0);
  for (size_t level = io::QueueStats::level_of(32) + 1; level < io::QueueStats::kLevels; ++level)
    EXPECT_EQ(s.seconds[level], 0) << "level " << level;
}

TEST_P(ServiceTest, OneCallersErrorIsItsOwn) {
  std::vector<std::byte> bad_buffer, good_buffer;
  auto bad = random_ops(50, bad_buffer);
  auto good = random_ops(400, good_buffer);
  const uint64_t poisoned = single_out(bad[17], good);
  auto svc = service(
      [&](const io::Request& r) { return r.offset == poisoned ? Fault::kError : Fault::kNone; });
  io::ReadFailure good_result;
  std::thread other([&] { good_result = svc->read_all(good, deadline()); });
  io::ReadFailure f = svc->read_all(bad, deadline());
  other.join();
  EXPECT_EQ(f.error, -EIO);
  EXPECT_EQ(f.op, 17u);
  EXPECT_EQ(good_result.error, 0);
  expect_contents(good);
}

TEST_P(ServiceTest, AHungReadTimesOutAndOthersGoOn) {
  std::vector<std::byte> hung_buffer, good_buffer;
  auto hung = random_ops(10, hung_buffer);
  auto good = random_ops(100, good_buffer);
  const uint64_t stuck = single_out(hung[3], good);
  auto svc = service(
      [&](const io::Request& r) { return r.offset == stuck ? Fault::kHang : Fault::kNone; });
  auto t0 = std::chrono::steady_clock::now();
  io::ReadFailure f = svc->read_all(hung, deadline(300));
  EXPECT_EQ(f.error, -ETIMEDOUT);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  EXPECT_EQ(svc->read_all(good, deadline()).error, 0);
  expect_contents(good);
  svc.reset();  // does not wait for the read that never completes
}

TEST_P(ServiceTest, ALateReadIsDrainedBeforeTheCallerGetsItsMemoryBack) {
  std::vector<std::byte> late_buffer, good_buffer;
  auto late = random_ops(10, late_buffer);
  auto good = random_ops(100, good_buffer);
  const uint64_t slow = single_out(late[3], good);
  auto svc =
      service([&](const io::Request& r) { return r.offset == slow ? Fault::kLate : Fault::kNone; });
  io::ReadFailure f = svc->read_all(late, deadline(200));
  EXPECT_EQ(f.error, -ETIMEDOUT);
  EXPECT_FALSE(f.in_flight);
  EXPECT_EQ(late[3].dest[0], testing::kLateByte);
  EXPECT_EQ(svc->read_all(good, deadline()).error, 0);
  expect_contents(good);
}

TEST_P(ServiceTest, CancelStopsNewReads) {
  std::vector<std::byte> buffer;
  auto ops = random_ops(200, buffer);
  std::atomic<bool> cancel{true};
  auto svc = service();
  EXPECT_EQ(svc->read_all(ops, deadline(), &cancel).error, -ECANCELED);
  cancel = false;
  EXPECT_EQ(svc->read_all(ops, deadline(), &cancel).error, 0);
  expect_contents(ops);
}

INSTANTIATE_TEST_SUITE_P(Engines, ServiceTest,
                         ::testing::Values(io::EngineKind::kUring, io::EngineKind::kThreads),
                         [](const ::testing::TestParamInfo<io::EngineKind>& p) {
                           return p.param == io::EngineKind::kUring ? "uring" : "threads";
                         });

INSTANTIATE_TEST_SUITE_P(Engines, EngineTest,
                         ::testing::Values(io::EngineKind::kUring, io::EngineKind::kThreads),
                         [](const ::testing::TestParamInfo<io::EngineKind>& p) {
                           return p.param == io::EngineKind::kUring ? "uring" : "threads";
                         });

TEST(EngineChoice, AutoFallsBackWhenIoUringIsBlocked) {
  io::EngineOptions o;
  std::vector<int> fds;
  auto faults = std::make_shared<io::Faults>();
  for (int err : {-EPERM, -ENOSYS, -ENOMEM}) {
    faults->uring_setup = err;
    o.faults = faults;
    std::string choice;
    auto e = io::make_engine(o, fds, [&](const std::string& s) { choice = s; });
    EXPECT_NE(e->describe().find("pread thread pool"), std::string::npos);
    EXPECT_NE(choice.find("io_uring unavailable"), std::string::npos) << choice;
    o.kind = io::EngineKind::kUring;
    try {
      io::make_engine(o, fds, {});
      ADD_FAILURE() << "io.engine: uring must not fall back";
    } catch (const Error& e2) {
      EXPECT_EQ(e2.code(), ErrorCode::kUnsupported);
      EXPECT_NE(std::string(e2.what()).find("io_uring is unavailable"), std::string::npos);
    }
    o.kind = io::EngineKind::kAuto;
  }
  o.faults = nullptr;
  std::string choice;
  auto e = io::make_engine(o, fds, [&](const std::string& s) { choice = s; });
  EXPECT_NE(choice.find("io_uring"), std::string::npos);
}

TEST(EngineChoice, MemlockTooLowForBuffersStillReads) {
  auto faults = std::make_shared<io::Faults>();
  faults->register_buffers = -ENOMEM;
  io::EngineOptions o;
  o.kind = io::EngineKind::kUring;
  o.faults = faults;
  std::vector<int> fds;
  auto e = io::make_engine(o, fds, {});
  memory::AlignedBuffer b;
  b.reserve(1 << 16);
  EXPECT_FALSE(e->register_buffer({b.data(), b.capacity()}));
  o.faults = nullptr;  // an engine without the fault, on the same buffer
  e = io::make_engine(o, fds, {});
  EXPECT_TRUE(e->register_buffer({b.data(), b.capacity()}));
}

}  // namespace
}  // namespace sluice
