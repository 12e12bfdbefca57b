// The peer/replica set without a Loader: which peer serves a sample, failover to replicas,
// dead peers shared across threads, records landing in their batch positions, and
// the errors that name the shard, the sample and every peer tried. (Records that land in batch
// slots: RemoteSlotsTest, through the Loader.)

#include "pipeline/peers.h"

#include <sluice/server.h>

#include "index/internals.h"
#include "test_util.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <numeric>
#include <random>

namespace sluice::pipeline {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kSamples = 400;

class PeersTest : public ::testing::Test {
 protected:
  void SetUp() override {
    written_ = testing::write_dataset(full(), kSamples, 20000, 128 << 10);
    auto ds = Dataset::open(full());
    ASSERT_GE(ds->shards().size(), 4u);
    fs::create_directories(partial());
    fs::copy_file(full() / "manifest.sluice", partial() / "manifest.sluice");
    for (size_t k = 0; k < ds->shards().size(); ++k)
      (k % 2 == 0 ? local_ : absent_).push_back(static_cast<uint32_t>(k));
    for (uint32_t k : local_)
      fs::copy_file(ds->shards()[k].path, partial() / ds->shards()[k].path.filename());
    ServerOptions so;
    so.token = "t0ken";
    for (int i = 0; i < 2; ++i) servers_.push_back(ShardServer::start(ds, so));
    DatasetOpenOptions open;
    open.allow_absent_shards = true;
    DatasetOptions where;
    where.path = partial();
    here_ = Dataset::open_source(where, open);
  }

  fs::path full() const { return tmp_ / "full"; }
  fs::path partial() const { return tmp_ / "partial"; }

  DistributedOptions peers(const std::vector<std::string>& addresses) const {
    DistributedOptions d;
    d.peer_timeout_ms = 2000;
    for (const auto& a : addresses) d.peers.push_back({a, absent_});
    return d;
  }

  // Every sample of the absent shards, in a shuffled order: batch position = place in it.
  std::vector<RemoteSample> remote_samples() const {
    std::vector<RemoteSample> out;
    for (uint64_t i = 0; i < kSamples; ++i)
      if (std::count(absent_.begin(), absent_.end(), index::shard_of(*here_, i)))
        out.push_back({0, i});
    std::shuffle(out.begin(), out.end(), std::mt19937(7));
    for (size_t k = 0; k < out.size(); ++k) out[k].position = k;
    return out;
  }

  uint64_t absent_sample() const {
    for (uint64_t i = 0;; ++i)
      if (!here_->shards()[index::shard_of(*here_, i)].local) return i;
  }

  // Each record, split, holds the bytes written for its sample.
  void expect_records(const PeerReads& reads, const std::vector<RemoteSample>& samples) {
    std::vector<std::span<const std::byte>> parts;
    for (const RemoteSample& s : samples) {
      auto record = reads.record(s.position);
      ASSERT_TRUE(index::split_record(*here_, s.index, record, parts).ok()) << s.index;
      ASSERT_EQ(parts.size(), 2u);  // data, label
      EXPECT_TRUE(std::ranges::equal(parts[0], written_[s.index])) << "sample " << s.index;
    }
  }

  testing::TempDir tmp_;
  std::vector<std::vector<std::byte>> written_;
  std::vector<uint32_t> local_, absent_;
  std::vector<std::unique_ptr<ShardServer>> servers_;
  std::shared_ptr<Dataset> here_;
};

TEST_F(PeersTest, OnlySamplesOfAbsentShardsAreRemote) {
  PeerSet set(here_, peers({servers_[0]->address()}), "t0ken", true);
  for (uint64_t i = 0; i < kSamples; ++i)
    EXPECT_EQ(set.remote(i), !here_->shards()[index::shard_of(*here_, i)].local) << i;
  // Without peers nothing is remote (and every shard must be here).
  EXPECT_FALSE(PeerSet(Dataset::open(full()), {}, "", true).remote(absent_sample()));
}

TEST_F(PeersTest, EverySampleLandsInItsBatchPositionFromSeveralPeers) {
  // Each absent shard served by another peer, so one batch takes replies from both.
  DistributedOptions d = peers({});
  for (size_t k = 0; k < absent_.size(); ++k)
    d.peers.push_back({servers_[k % 2]->address(), {absent_[k]}});
  PeerSet set(here_, d, "t0ken", true);
  PeerReads reads(set);
  auto samples = remote_samples();
  for (int round = 0; round < 2; ++round) {  // the second on the same connections
    reads.start(samples, samples.size());
    reads.finish();
    expect_records(reads, samples);
  }
  EXPECT_GT(servers_[0]->stats().requests, 0u);
  EXPECT_GT(servers_[1]->stats().requests, 0u);
}

// Threads share the set's connections: one per peer, however many threads read at once.
TEST_F(PeersTest, ThreadsReadingAtOnceShareOneConnectionPerPeer) {
  PeerSet set(here_, peers({servers_[0]->address()}), "t0ken", true);
  auto samples = remote_samples();
  std::vector<std::thread> threads;
  std::atomic<int> rounds{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      PeerReads reads(set);
      for (int round = 0; round < 5; ++round) {
        reads.start(samples, samples.size());
        reads.finish();
        expect_records(reads, samples);
        ++rounds;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(rounds.load(), 20);
  EXPECT_EQ(servers_[0]->stats().connections, 1u);
  EXPECT_GE(servers_[0]->stats().requests, 20u);
}

// A batch given up on midway (its calls dropped unfinished) leaves the shared connection
// working for the next batch and for other threads.
TEST_F(PeersTest, ABatchGivenUpOnLeavesTheConnectionWorking) {
  PeerSet set(here_, peers({servers_[0]->address()}), "t0ken", true);
  auto samples = remote_samples();
  PeerReads reads(set);
  for (int round = 0; round < 3; ++round) {
    reads.start(samples, samples.size());
    reads.abandon();
  }
  reads.start(samples, samples.size());
  reads.finish();
  expect_records(reads, samples);
  EXPECT_FALSE(set.dead(0));
  EXPECT_EQ(servers_[0]->stats().connections, 1u);
}

TEST_F(PeersTest, ADeadPeerFailsOverAndStaysDeadForEveryThread) {
  const std::string nobody = testing::free_loopback_address();
  PeerSet set(here_, peers({nobody, servers_[1]->address()}), "t0ken", true);
  auto samples = remote_samples();
  PeerReads first(set);
  first.start(samples, samples.size());
  first.finish();
  expect_records(first, samples);
  EXPECT_TRUE(set.dead(0));
  EXPECT_FALSE(set.dead(1));
  // Another thread's reads skip the dead peer from the start.
  EXPECT_EQ(set.choose(absent_[0], 0), 1u);
  PeerReads second(set);
  second.start(samples, samples.size());
  second.finish();
  expect_records(second, samples);
}

TEST_F(PeersTest, APeerThatDiesBetweenBatchesFailsOver) {
  PeerSet set(here_, peers({servers_[0]->address(), servers_[1]->address()}), "t0ken", true);
  PeerReads reads(set);
  auto samples = remote_samples();
  reads.start(samples, samples.size());
  reads.finish();
  servers_[0].reset();
  reads.start(samples, samples.size());
  reads.finish();
  expect_records(reads, samples);
  EXPECT_TRUE(set.dead(0));
}

TEST_F(PeersTest, NoPeerLeftNamesTheShardTheSampleAndEveryPeerTried) {
  const std::string a = testing::free_loopback_address(), b = testing::free_loopback_address();
  PeerSet set(here_, peers({a, b}), "t0ken", true);
  PeerReads reads(set);
  auto samples = remote_samples();
  try {
    reads.start(samples, samples.size());
    reads.finish();
    FAIL() << "read from nobody";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_EQ(e.code(), ErrorCode::kIo);
    EXPECT_NE(m.find("no peer left that serves it"), std::string::npos) << m;
    EXPECT_NE(m.find("(shard "), std::string::npos) << m;
    EXPECT_NE(m.find("peer " + a), std::string::npos) << m;
    EXPECT_NE(m.find("peer " + b), std::string::npos) << m;
  }
}

TEST_F(PeersTest, AWrongTokenIsNotAFailoverButAnError) {
  PeerSet set(here_, peers({servers_[0]->address(), servers_[1]->address()}), "wrong", true);
  PeerReads reads(set);
  auto samples = remote_samples();
  try {
    reads.start(samples, samples.size());
    reads.finish();
    FAIL() << "read with a wrong token";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kConfig) << e.what();
  }
  EXPECT_FALSE(set.dead(0));  // a replica would not fix it: nobody is marked dead
}

TEST_F(PeersTest, ConfigErrorsNameTheShard) {
  DistributedOptions past = peers({servers_[0]->address()});
  past.peers[0].shards.push_back(1000);
  try {
    PeerSet(here_, past, "t0ken", true);
    FAIL() << "a shard past the dataset";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kConfig);
    EXPECT_NE(std::string(e.what()).find("shard 1000"), std::string::npos) << e.what();
  }
  DistributedOptions missing = peers({servers_[0]->address()});
  missing.peers[0].shards.pop_back();
  try {
    PeerSet(here_, missing, "t0ken", true);
    FAIL() << "an absent shard that nobody serves";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kConfig);
    EXPECT_NE(
        std::string(e.what()).find(fmt::format("shard {} is not on this node", absent_.back())),
        std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace sluice::pipeline
