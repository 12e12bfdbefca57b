// The Loader with shards on other nodes: some shard files here, the rest read from shard
// servers over UCX (loopback), replicas, a peer that dies mid-epoch, and a loader that serves
// its own shards to another.

#include <sluice/loader.h>
#include <sluice/server.h>

#include "common/file.h"
#include "net/server.h"
#include "test_util.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <future>
#include <set>

namespace sluice {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kSamples = 600;

class RemoteLoaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    written_ = testing::write_dataset(full(), kSamples, 20000, 256 << 10);
    auto ds = Dataset::open(full());
    num_shards_ = ds->shards().size();
    ASSERT_GE(num_shards_, 4u);
    // This node has the manifest and the even shards; the odd ones are elsewhere.
    fs::create_directories(partial());
    fs::copy_file(full() / "manifest.sluice", partial() / "manifest.sluice");
    for (size_t k = 0; k < num_shards_; k += 2)
      fs::copy_file(ds->shards()[k].path, partial() / ds->shards()[k].path.filename());
    for (size_t k = 1; k < num_shards_; k += 2) odd_.push_back(static_cast<uint32_t>(k));
    ServerOptions so;
    so.token = "t0ken";
    for (size_t i = 0; i < 2; ++i) {
      net::ServerFaults faults;
      faults.reply = [this, i](net::ReplyHeader& h, std::span<std::byte> d,
                               std::chrono::milliseconds& delay) {
        std::lock_guard lock(fault_mu_);
        if (reply_faults_[i]) reply_faults_[i](h, d, delay);
      };
      servers_.push_back(net::start_server(ds, so, std::move(faults)));
    }
  }

  // Faults for the replies of server `which` (its own seam: net::ServerFaults).
  void fault_on(size_t which, net::ReplyFault f) {
    std::lock_guard lock(fault_mu_);
    reply_faults_[which] = std::move(f);
  }

  fs::path full() const { return tmp_ / "full"; }
  fs::path partial() const { return tmp_ / "partial"; }

  LoaderOptions options(std::vector<size_t> server_numbers) const {
    LoaderOptions o;
    o.dataset.path = partial();
    o.batch_size = 20;
    o.drop_last = false;
    o.seed = 3;
    o.io.threads = 2;
    o.io.timeout_ms = 5000;
    o.distributed.rank = 0;
    o.distributed.world_size = 1;
    o.distributed.token = "t0ken";
    o.distributed.peer_timeout_ms = 2000;
    for (size_t s : server_numbers) o.distributed.peers.push_back({servers_[s]->address(), odd_});
    return o;
  }

  // One epoch; checks every sample's bytes; returns the real indices delivered.
  std::vector<uint64_t> epoch(Loader& loader, const std::function<void(size_t)>& after = {}) {
    std::vector<uint64_t> seen;
    size_t batches = 0;
    while (auto b = loader.next()) {
      FieldView data = b->field("data");
      for (size_t i = 0; i < b->size(); ++i) {
        uint64_t index = b->indices()[i];
        auto bytes = data.sample(i);
        EXPECT_EQ(bytes.size(), written_[index].size()) << "sample " << index;
        EXPECT_TRUE(std::equal(bytes.begin(), bytes.end(), written_[index].begin())) << index;
        if (!b->padding()[i]) seen.push_back(index);
      }
      if (after) after(++batches);
    }
    return seen;
  }

  static void expect_exactly_once(std::vector<uint64_t> seen) {
    std::sort(seen.begin(), seen.end());
    ASSERT_EQ(seen.size(), kSamples);
    for (uint64_t i = 0; i < kSamples; ++i) ASSERT_EQ(seen[i], i);
  }

  testing::TempDir tmp_;
  std::vector<std::vector<std::byte>> written_;
  size_t num_shards_ = 0;
  std::vector<uint32_t> odd_;
  std::mutex fault_mu_;
  net::ReplyFault reply_faults_[2];
  std::vector<std::unique_ptr<ShardServer>> servers_;  // last: they call reply_faults_
};

TEST_F(RemoteLoaderTest, LocalAndRemoteSamplesMakeOneEpochExactlyOnce) {
  auto loader = Loader::open(options({0}));
  expect_exactly_once(epoch(*loader));
  const uint64_t connections = servers_[0]->stats().connections;
  EXPECT_EQ(connections, 1u);           // one for the loader, whatever its threads
  expect_exactly_once(epoch(*loader));  // and the next epoch, on the same connections
  EXPECT_EQ(servers_[0]->stats().connections, connections);
  EXPECT_GT(servers_[0]->stats().requests, 0u);
}

TEST_F(RemoteLoaderTest, OneBatchFromSeveralPeers) {
  // Each odd shard served by a different peer, so a batch mixes replies of both.
  LoaderOptions o = options({});
  for (size_t k = 0; k < odd_.size(); ++k)
    o.distributed.peers.push_back({servers_[k % 2]->address(), {odd_[k]}});
  auto loader = Loader::open(o);
  expect_exactly_once(epoch(*loader));
  EXPECT_GT(servers_[0]->stats().requests, 0u);
  EXPECT_GT(servers_[1]->stats().requests, 0u);
}

TEST_F(RemoteLoaderTest, APeerThatDiesMidEpochFailsOverToItsReplica) {
  auto loader = Loader::open(options({0, 1}));
  auto seen = epoch(*loader, [&](size_t batches) {
    if (batches == 5) servers_[0].reset();  // the first replica goes away
  });
  expect_exactly_once(seen);
  EXPECT_GT(servers_[1]->stats().requests, 0u);
}

TEST_F(RemoteLoaderTest, WithoutAReplicaTheEpochFailsNamingThePeer) {
  auto loader = Loader::open(options({0}));
  std::string address = servers_[0]->address();
  std::string message;
  auto t0 = std::chrono::steady_clock::now();
  try {
    epoch(*loader, [&](size_t batches) {
      if (batches == 3) servers_[0].reset();
    });
  } catch (const Error& e) {
    message = e.what();
  }
  EXPECT_NE(message.find("peer " + address), std::string::npos) << message;
  EXPECT_NE(message.find("no peer left"), std::string::npos) << message;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(20));
}

TEST_F(RemoteLoaderTest, ASlowPeerWithinTheTimeoutIsOnlySlow) {
  fault_on(0, [](net::ReplyHeader&, std::span<std::byte>, std::chrono::milliseconds& delay) {
    delay = std::chrono::milliseconds(30);
  });
  auto loader = Loader::open(options({0}));
  expect_exactly_once(epoch(*loader));
}

TEST_F(RemoteLoaderTest, APeerSlowerThanTheTimeoutFailsOverToItsReplica) {
  fault_on(0, [](net::ReplyHeader&, std::span<std::byte>, std::chrono::milliseconds& delay) {
    delay = std::chrono::milliseconds(1500);
  });
  LoaderOptions o = options({0, 1});
  o.distributed.peer_timeout_ms = 300;
  auto loader = Loader::open(o);
  auto t0 = std::chrono::steady_clock::now();
  expect_exactly_once(epoch(*loader));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  EXPECT_GT(servers_[1]->stats().requests, 0u);
}

// A loader that stops (closed, or set_epoch / load_state) while a thread waits on a peer ends
// that wait at once, however long distributed.peer_timeout_ms: a silent peer (the kernel
// accepts, nobody answers the handshake) held a closing loader for the whole timeout.
TEST_F(RemoteLoaderTest, AStoppingLoaderDoesNotWaitOutASilentPeer) {
  detail::UniqueFd silent(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(silent.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(silent.get(), 16), 0);
  socklen_t n = sizeof a;
  ::getsockname(silent.get(), reinterpret_cast<sockaddr*>(&a), &n);
  LoaderOptions o = options({});
  o.distributed.peers.push_back({fmt::format("127.0.0.1:{}", ntohs(a.sin_port)), odd_});
  o.distributed.peer_timeout_ms = 60000;
  auto loader = Loader::open(o);
  loader->wait(std::chrono::milliseconds(300));  // its threads start and wait on the peer
  auto t0 = std::chrono::steady_clock::now();
  loader.reset();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10))
      << "closing the loader waited out the peer timeout";
}

// A wait cut short by set_epoch is not the peer's fault: it is not marked dead, and (without a
// replica) the next epoch reads from it.
TEST_F(RemoteLoaderTest, AReadCutShortBySetEpochLeavesThePeerAlive) {
  // The server holds its first reply for 3 s and says when it does.
  auto first = std::make_shared<std::atomic<bool>>(true);
  auto holding = std::make_shared<std::promise<void>>();
  std::future<void> held = holding->get_future();
  fault_on(0, [first, holding](net::ReplyHeader&, std::span<std::byte>,
                               std::chrono::milliseconds& delay) {
    if (!first->exchange(false)) return;
    delay = std::chrono::milliseconds(3000);
    holding->set_value();
  });
  LoaderOptions o = options({0});
  o.distributed.peer_timeout_ms = 60000;
  auto loader = Loader::open(o);
  loader->wait(std::chrono::milliseconds(0));  // starts its threads
  ASSERT_EQ(held.wait_for(std::chrono::seconds(20)), std::future_status::ready);
  auto t0 = std::chrono::steady_clock::now();
  loader->set_epoch(1);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2))
      << "set_epoch waited for the held reply";
  expect_exactly_once(epoch(*loader));
}

TEST_F(RemoteLoaderTest, APeerThatSendsGarbageFailsOverToItsReplica) {
  using Garbage = std::function<void(net::ReplyHeader&, std::span<std::byte>)>;
  const std::vector<std::pair<std::string, Garbage>> kinds = {
      {"flipped record byte",
       [](net::ReplyHeader& h, std::span<std::byte> d) {
         if (h.status == net::ReplyStatus::kOk && !d.empty()) d[0] ^= std::byte{1};
       }},
      {"bad magic", [](net::ReplyHeader& h, std::span<std::byte>) { h.magic = 0xdeadbeef; }},
      {"wrong record count", [](net::ReplyHeader& h, std::span<std::byte>) { h.count += 1; }},
  };
  for (const auto& [name, garbage] : kinds) {
    SCOPED_TRACE(name);
    fault_on(0, [garbage](net::ReplyHeader& h, std::span<std::byte> d, std::chrono::milliseconds&) {
      garbage(h, d);
    });
    auto loader = Loader::open(options({0, 1}));
    expect_exactly_once(epoch(*loader));
    // Without a replica the epoch fails, naming the peer.
    auto alone = Loader::open(options({0}));
    try {
      epoch(*alone);
      ADD_FAILURE() << "garbage from the only peer went unnoticed";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(servers_[0]->address()), std::string::npos) << e.what();
    }
  }
}

TEST_F(RemoteLoaderTest, AShardThatNobodyServesIsAConfigError) {
  LoaderOptions o = options({0});
  o.distributed.peers[0].shards = {1};  // shard 3 is neither here nor anywhere
  try {
    Loader::open(o);
    FAIL() << "opened";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kConfig);
    EXPECT_NE(std::string(e.what()).find("shard 3 is not on this node"), std::string::npos)
        << e.what();
  }
}

TEST_F(RemoteLoaderTest, AWrongTokenFailsNamingThePeer) {
  LoaderOptions o = options({0});
  o.distributed.token = "wrong";
  auto loader = Loader::open(o);
  try {
    epoch(*loader);
    FAIL() << "read with a wrong token";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("unauthorized"), std::string::npos) << e.what();
  }
}

// A loader that listens needs a token, or says it runs without one; a token file counts.
TEST_F(RemoteLoaderTest, ListeningWithoutATokenIsAnErrorUnlessSaid) {
  LoaderOptions o = options({});
  o.distributed.peers.clear();
  o.dataset.path = full();
  o.distributed.token.clear();
  o.distributed.listen = testing::free_loopback_address();
  ::unsetenv("SLUICE_TOKEN");
  try {
    Loader::open(o);
    FAIL() << "listened without a token";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kConfig);
    EXPECT_NE(std::string(e.what()).find("distributed.no_token"), std::string::npos) << e.what();
  }
  o.distributed.no_token = true;
  Loader::open(o);
  o.distributed.no_token = false;
  o.distributed.token_file = tmp_ / "token";
  std::ofstream(o.distributed.token_file) << "from-a-file\n";
  Loader::open(o);
}

TEST_F(RemoteLoaderTest, ALoaderServesItsOwnShardsToAnother) {
  // Node A holds the odd shards and serves them from inside its loader; node B (the even
  // shards) reads them from A.
  fs::path a = tmp_ / "a";
  fs::create_directories(a);
  fs::copy_file(full() / "manifest.sluice", a / "manifest.sluice");
  for (uint32_t k : odd_) {
    auto name = fmt::format("shard-{:05}.sluice", k);
    fs::copy_file(full() / name, a / name);
  }
  std::string listen = testing::free_loopback_address();

  LoaderOptions oa = options({});
  oa.dataset.path = a;
  oa.distributed.listen = listen;
  std::vector<uint32_t> even;
  for (uint32_t k = 0; k < num_shards_; k += 2) even.push_back(k);
  oa.distributed.peers = {{"127.0.0.1:1", even}};  // A never reads (it only serves here)
  auto loader_a = Loader::open(oa);

  LoaderOptions ob = options({});
  ob.distributed.peers = {{listen, odd_}};
  auto loader_b = Loader::open(ob);
  expect_exactly_once(epoch(*loader_b));
}

// A dataset of one fixed-size uint8 field, `count` samples of `bytes`, in shards of about
// `shard_bytes`; and a copy of it with only the manifest and shard 0, the rest left to peers.
std::shared_ptr<Dataset> write_fixed(const fs::path& dir, uint64_t count, size_t bytes,
                                     uint64_t shard_bytes) {
  WriterOptions w;
  w.fields = {{"x", DType::kUInt8, {static_cast<int64_t>(bytes)}}};
  w.shard_bytes = shard_bytes;
  auto writer = DatasetWriter::create(dir / "full", w);
  for (uint64_t i = 0; i < count; ++i) {
    auto record = testing::sample_bytes(i, 0, bytes);
    std::span<const std::byte> fields[] = {record};
    writer->add(fields);
  }
  writer->finish();
  auto ds = Dataset::open(dir / "full");
  fs::create_directories(dir / "partial");
  fs::copy_file(dir / "full" / "manifest.sluice", dir / "partial" / "manifest.sluice");
  fs::copy_file(ds->shards()[0].path, dir / "partial" / ds->shards()[0].path.filename());
  return ds;
}

// Reads an epoch; checks every sample's bytes and that each comes exactly once.
void expect_fixed_epoch(Loader& loader, uint64_t count, size_t bytes) {
  std::vector<uint64_t> seen;
  while (auto b = loader.next()) {
    FieldView x = b->field("x");
    for (size_t i = 0; i < b->size(); ++i) {
      auto want = testing::sample_bytes(b->indices()[i], 0, bytes);
      auto got = x.sample(i);
      ASSERT_EQ(got.size(), bytes);
      ASSERT_TRUE(std::equal(got.begin(), got.end(), want.begin())) << b->indices()[i];
      if (!b->padding()[i]) seen.push_back(b->indices()[i]);
    }
  }
  std::sort(seen.begin(), seen.end());
  ASSERT_EQ(seen.size(), count);
  for (uint64_t i = 0; i < count; ++i) ASSERT_EQ(seen[i], i);
}

LoaderOptions fixed_options(const fs::path& dir, size_t batch) {
  LoaderOptions o;
  o.dataset.path = dir / "partial";
  o.batch_size = batch;
  o.drop_last = false;
  o.io.threads = 2;
  o.distributed.token = "t";
  return o;
}

// Large records of a one-field, fixed-size dataset come in messages of their own and land
// straight in their batch slots; from a server reading through the page cache (sent from the
// shard's mapping) and from one with O_DIRECT (sent from its read buffer), one per shard.
TEST(RemoteSlotsTest, LargeFixedRecordsLandInTheirBatchSlotsFromBothKindsOfServer) {
  testing::TempDir tmp;
  constexpr size_t kBytes = 300 << 10;  // over the client's separate_bytes (256 KiB)
  constexpr uint64_t kCount = 40;
  auto ds = write_fixed(tmp.path(), kCount, kBytes, 2 << 20);
  ASSERT_GE(ds->shards().size(), 4u);
  std::vector<std::unique_ptr<ShardServer>> servers;
  for (DirectIo direct : {DirectIo::kOff, testing::direct_where_possible(tmp.path())}) {
    ServerOptions so;
    so.token = "t";
    so.io.direct = direct;
    servers.push_back(ShardServer::start(ds, so));
  }
  LoaderOptions o = fixed_options(tmp.path(), 6);
  for (uint32_t k = 1; k < ds->shards().size(); ++k)
    o.distributed.peers.push_back({servers[k % 2]->address(), {k}});
  auto loader = Loader::open(o);
  expect_fixed_epoch(*loader, kCount, kBytes);
  EXPECT_GT(servers[0]->stats().requests, 0u);
  EXPECT_GT(servers[1]->stats().requests, 0u);
}

// A batch of more record bytes than a server answers at once is asked for in several requests
// (sized from the manifest's shard sizes), not refused.
TEST(RemoteSlotsTest, ABatchLargerThanTheServersReplyLimitIsSplitIntoRequests) {
  testing::TempDir tmp;
  constexpr size_t kBytes = 300 << 10;
  constexpr uint64_t kCount = 250;  // 73 MiB in one batch
  auto ds = write_fixed(tmp.path(), kCount, kBytes, 1 << 20);
  ServerOptions so;
  so.token = "t";
  so.max_reply_bytes = 66 << 20;  // O_DIRECT reads count against it
  auto server = ShardServer::start(ds, so);
  LoaderOptions o = fixed_options(tmp.path(), kCount);
  std::vector<uint32_t> rest;
  for (uint32_t k = 1; k < ds->shards().size(); ++k) rest.push_back(k);
  o.distributed.peers.push_back({server->address(), rest});
  auto loader = Loader::open(o);
  expect_fixed_epoch(*loader, kCount, kBytes);
  EXPECT_GE(server->stats().requests, 2u);
  EXPECT_EQ(server->stats().rejected, 0u);
}

}  // namespace
}  // namespace sluice
