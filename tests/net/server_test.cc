// The shard server and its client over UCX on loopback: bytes, refusals, malformed requests,
// dead and silent peers, a server process killed mid-read.

#include <sluice/server.h>

#include "io/fault_engine.h"
#include "net/client.h"
#include "net/server.h"
#include "net/wire.h"
#include "test_util.h"

#include <fmt/format.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

namespace sluice {
namespace {

namespace fs = std::filesystem;
using net::ClientOptions;
using net::PeerClient;
using net::ReadRequest;
using net::ReplyStatus;

constexpr uint64_t kSamples = 300;

// Every sample once, in the order i * step % kSamples (step coprime to 300: 1 is in order).
std::vector<uint64_t> every_sample(uint64_t step) {
  std::vector<uint64_t> all(kSamples);
  for (uint64_t i = 0; i < kSamples; ++i) all[i] = i * step % kSamples;
  return all;
}

// A request's destination: 8-byte-aligned storage that grows to the reply's size.
struct Buffer {
  std::vector<uint64_t> words;
  std::span<std::byte> operator()(size_t bytes) {
    words.resize((bytes + 7) / 8);
    return {reinterpret_cast<std::byte*>(words.data()), bytes};
  }
  const std::byte* data() const { return reinterpret_cast<const std::byte*>(words.data()); }
};

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

class ServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Records up to 96 KiB: replies of many of them go by rendezvous, small ones eagerly.
    testing::write_dataset(dir(), kSamples, 96 << 10, 1 << 20);
    dataset_ = Dataset::open(dir());
    restart(testing::direct_where_possible(dir()));
  }

  // Test seams of this test's server (net::ServerFaults): the engine wrapper takes effect at
  // the next restart(); the reply fault at once.
  void set_engine_wrapper(
      std::function<std::unique_ptr<io::Engine>(std::unique_ptr<io::Engine>)> f) {
    auto faults = std::make_shared<io::Faults>();
    faults->wrap_engine = std::move(f);
    io_faults_ = faults;
  }
  void set_reply_fault(net::ReplyFault f) {
    std::lock_guard lock(fault_mu_);
    reply_fault_ = std::move(f);
  }

  void restart(DirectIo direct) {
    server_.reset();
    ServerOptions o;
    o.token = "secret";
    o.io.direct = direct;
    net::ServerFaults faults;
    faults.io = io_faults_;
    faults.reply = [this](net::ReplyHeader& h, std::span<std::byte> d,
                          std::chrono::milliseconds& delay) {
      std::lock_guard lock(fault_mu_);
      if (reply_fault_) reply_fault_(h, d, delay);
    };
    server_ = net::start_server(dataset_, o, std::move(faults));
  }

  std::shared_ptr<const io::Faults> io_faults_;
  std::mutex fault_mu_;
  net::ReplyFault reply_fault_;

  fs::path dir() const { return tmp_ / "ds"; }

  std::unique_ptr<PeerClient> client(std::string token = "secret", uint32_t timeout_ms = 5000) {
    return PeerClient::connect(server_->address(), {token, timeout_ms});
  }

  // Reads `indices` in requests of `per_request`, all in flight at once; checks every record
  // against a local read.
  void read_and_check(PeerClient& c, const std::vector<uint64_t>& indices, size_t per_request) {
    std::vector<ReadRequest> requests;
    std::vector<Buffer> buffers((indices.size() + per_request - 1) / per_request);
    for (size_t k = 0; k * per_request < indices.size(); ++k) {
      ReadRequest r;
      auto first = indices.begin() + static_cast<ptrdiff_t>(k * per_request);
      r.indices.assign(first, first + static_cast<ptrdiff_t>(
                                          std::min(per_request, indices.size() - k * per_request)));
      r.destination = [&buffers, k](size_t bytes) { return buffers[k](bytes); };
      requests.push_back(std::move(r));
    }
    c.read(requests);
    for (size_t k = 0; k < requests.size(); ++k) {
      const ReadRequest& r = requests[k];
      ASSERT_EQ(r.records.size(), r.indices.size());
      for (size_t i = 0; i < r.indices.size(); ++i) {
        auto want = dataset_->read_record(r.indices[i]);
        ASSERT_EQ(r.records[i].size, want.size()) << "sample " << r.indices[i];
        ASSERT_EQ(0, std::memcmp(r.record_data[i].data(), want.data(), want.size()))
            << "sample " << r.indices[i];
      }
    }
  }

  testing::TempDir tmp_;
  std::shared_ptr<Dataset> dataset_;
  std::unique_ptr<ShardServer> server_;
};

TEST_F(ServerTest, EveryByteEqualsTheLocalRead) {
  auto c = client();
  const std::vector<uint64_t> all = every_sample(7);  // a shuffled order
  read_and_check(*c, all, 32);   // ten requests in flight, replies of ~1.5 MB (rendezvous)
  read_and_check(*c, {5}, 1);    // one small record (eager)
  read_and_check(*c, all, 300);  // one request for everything
  EXPECT_EQ(server_->stats().requests, 10u + 1u + 1u);
  EXPECT_EQ(server_->stats().rejected, 0u);
}

// Under direct I/O the server reads each record's block-aligned cover and the reply says where
// the record sits in it; through the page cache records go back to back. Both end equal.
TEST_F(ServerTest, EveryByteEqualsTheLocalReadThroughThePageCacheAndWithODirect) {
  const std::vector<uint64_t> all = every_sample(11);
  for (DirectIo direct : {DirectIo::kOff, testing::direct_where_possible(dir())}) {
    restart(direct);
    SCOPED_TRACE(server_->io_description());
    auto c = client();
    read_and_check(*c, all, 16);
  }
}

// io.direct: auto on data that fits in memory: the page cache, read in by a background warmer
// while the server answers (and stopped with it).
TEST_F(ServerTest, AutoOnDataThatFitsWarmsThePageCacheWhileServing) {
  restart(DirectIo::kAuto);
  const std::string io = server_->io_description();
  EXPECT_NE(io.find("reading through the page cache"), std::string::npos) << io;
  EXPECT_NE(io.find("warming it in the background"), std::string::npos) << io;
  read_and_check(*client(), every_sample(3), 16);
  server_.reset();  // joins the warmer
}

// Neighbours requested backwards and samples requested twice (padding repeats a sample) come
// back equal: the reply lays records out in request order, whatever shares a disk block.
TEST_F(ServerTest, NeighboursBackwardsAndRepeatedSamplesComeBackEqual) {
  const std::vector<uint64_t> order = {1, 0, 3, 2, 2, 5, 4, 4, 0, 1};
  for (DirectIo direct : {DirectIo::kOff, testing::direct_where_possible(dir())}) {
    restart(direct);
    SCOPED_TRACE(server_->io_description());
    auto c = client();
    read_and_check(*c, order, order.size());
  }
}

// Records of at least separate_bytes come in messages of their own, from the shard's mapping
// (page cache) or the server's read buffer (O_DIRECT), eager or by rendezvous, into the
// caller's record_destination where it gives one and into the client's own storage where not.
TEST_F(ServerTest, LargeRecordsComeApartIntoTheirOwnDestinations) {
  const std::vector<uint64_t> all = every_sample(13);
  for (DirectIo direct : {DirectIo::kOff, testing::direct_where_possible(dir())}) {
    restart(direct);
    SCOPED_TRACE(server_->io_description());
    for (uint32_t separate : {1u << 10, 40u << 10}) {
      auto c = PeerClient::connect(server_->address(), {"secret", 5000, true, separate});
      std::vector<ReadRequest> requests(all.size() / 30);
      std::vector<Buffer> buffers(requests.size());
      std::vector<std::vector<std::byte>> slots(all.size());
      for (size_t k = 0; k < requests.size(); ++k) {
        requests[k].indices.assign(all.begin() + static_cast<ptrdiff_t>(k * 30),
                                   all.begin() + static_cast<ptrdiff_t>(k * 30 + 30));
        requests[k].destination = [&buffers, k](size_t bytes) { return buffers[k](bytes); };
        if (k % 2 == 0)  // odd requests leave separate records to the client
          requests[k].record_destination = [&slots, k](size_t record, size_t bytes) {
            auto& slot = slots[k * 30 + record];
            slot.resize(bytes);
            return std::span<std::byte>(slot);
          };
      }
      c->read(requests);
      size_t apart = 0;
      for (size_t k = 0; k < requests.size(); ++k)
        for (size_t i = 0; i < 30; ++i) {
          const ReadRequest& r = requests[k];
          auto want = dataset_->read_record(r.indices[i]);
          ASSERT_EQ(r.record_data[i].size(), want.size()) << "sample " << r.indices[i];
          ASSERT_EQ(0, std::memcmp(r.record_data[i].data(), want.data(), want.size()))
              << "sample " << r.indices[i];
          if (r.records[i].offset != net::kSeparate) continue;
          ++apart;
          EXPECT_GE(want.size(), separate);
          if (k % 2 == 0) {
            EXPECT_EQ(r.record_data[i].data(), slots[k * 30 + i].data())
                << "sample " << r.indices[i];
          }
        }
      EXPECT_GT(apart, 0u);
    }
  }
}

// A reply whose table disagrees with the records sent apart is damage, reported at once (not
// a wait for records that never come).
TEST_F(ServerTest, ATableThatDisagreesWithTheRecordsSentApartIsCorruption) {
  set_reply_fault([](net::ReplyHeader& h, std::span<std::byte>, std::chrono::milliseconds&) {
    h.separate += 1;
  });
  auto c = PeerClient::connect(server_->address(), {"secret", 20000, true, 1u << 10});
  const std::vector<uint64_t> all = every_sample(1);
  auto t0 = std::chrono::steady_clock::now();
  std::string what = message_of([&] { read_and_check(*c, all, 50); });
  set_reply_fault({});
  EXPECT_NE(what.find("malformed reply"), std::string::npos) << what;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));  // not the timeout
  read_and_check(*client(), {1, 2, 3}, 3);                                     // the server goes on
}

TEST_F(ServerTest, AReadErrorOnTheServerNamesItsFileAndSample) {
  std::atomic<int> submits{0};
  set_engine_wrapper([&](std::unique_ptr<io::Engine> e) -> std::unique_ptr<io::Engine> {
    return std::make_unique<testing::FaultEngine>(std::move(e), [&](const io::Request&) {
      return ++submits == 3 ? testing::Fault::kError : testing::Fault::kNone;
    });
  });
  restart(testing::direct_where_possible(dir()));
  auto c = client();
  const std::vector<uint64_t> all = every_sample(1);
  std::string what = message_of([&] { read_and_check(*c, all, 100); });
  // The same words as a local read's failure (read::ReadPlan::fail), after the peer's name.
  EXPECT_NE(
      what.find("peer " + server_->address() + ": read error: read " + dir().string() + "/shard-"),
      std::string::npos)
      << what;
  EXPECT_NE(what.find("(sample "), std::string::npos) << what;
  EXPECT_NE(what.find("Input/output error"), std::string::npos) << what;
  // The server goes on: the next read succeeds.
  read_and_check(*client(), {1, 2, 3}, 3);
}

// A dataset read in place (a files tree: no stored checksums) served remotely: the server
// computes each record's checksum, so the client still checks the bytes end to end.
TEST(ServerFilesTest, AFilesTreeIsServedWithChecksumsComputedByTheServer) {
  testing::TempDir tmp;
  const fs::path root = tmp / "tree";
  for (int c = 0; c < 3; ++c) {
    fs::create_directories(root / fmt::format("class{}", c));
    for (int i = 0; i < 7; ++i) {
      std::ofstream out(root / fmt::format("class{}", c) / fmt::format("{}.bin", i),
                        std::ios::binary);
      std::string bytes(static_cast<size_t>(1000 + 517 * i + 4096 * c), static_cast<char>('a' + i));
      out << bytes;
    }
  }
  DatasetOptions d;
  d.path = root;
  auto dataset = Dataset::open_source(d);
  for (DirectIo direct : {DirectIo::kOff, testing::direct_where_possible(root)}) {
    ServerOptions o;
    o.token = "t";
    o.io.direct = direct;
    auto server = ShardServer::start(dataset, o);
    auto c = PeerClient::connect(server->address(), {"t", 5000});
    std::vector<ReadRequest> requests(1);
    Buffer buffer;
    for (uint64_t i = 0; i < dataset->num_samples(); ++i) requests[0].indices.push_back(i);
    requests[0].destination = [&](size_t bytes) { return buffer(bytes); };
    c->read(requests);
    for (uint64_t i = 0; i < dataset->num_samples(); ++i) {
      auto want = dataset->read_record(i);
      const net::RecordInfo& r = requests[0].records[i];
      ASSERT_EQ(r.size, want.size()) << server->io_description();
      ASSERT_EQ(0, std::memcmp(requests[0].record_data[i].data(), want.data(), want.size()))
          << "sample " << i << ", " << server->io_description();
    }
  }
}

// The token is proven before anything else: a client with another token (or none) is refused
// at connect, with a message that says so, and the server counts it.
TEST_F(ServerTest, AWrongTokenIsRefused) {
  for (std::string token : {"not the token", ""}) {
    std::string m = message_of([&] { client(token); });
    EXPECT_NE(m.find("unauthorized"), std::string::npos) << m;
    EXPECT_NE(m.find(server_->address()), std::string::npos) << m;
  }
  EXPECT_EQ(server_->stats().refused, 2u);
  EXPECT_EQ(server_->stats().connections, 0u);
  read_and_check(*client(), {1, 2}, 2);
}

// Without a token a server starts only when told to, and then serves only clients without one:
// a client holding a token will not read from a server that cannot prove it.
TEST_F(ServerTest, NoTokenIsAnErrorUnlessSaidAndThenBothSidesMustAgree) {
  ServerOptions o;
  std::string m = message_of([&] { ShardServer::start(dataset_, o); });
  EXPECT_NE(m.find("no token"), std::string::npos) << m;
  o.no_token = true;
  server_ = ShardServer::start(dataset_, o);
  read_and_check(*client(""), {4, 5}, 2);
  m = message_of([&] { client("secret"); });
  EXPECT_NE(m.find("without a token"), std::string::npos) << m;
}

TEST_F(ServerTest, AnOutOfRangeSampleIsRefusedByName) {
  auto c = client();
  std::string m = message_of([&] { read_and_check(*c, {3, kSamples + 7}, 2); });
  EXPECT_NE(m.find("sample 307 out of range"), std::string::npos) << m;
  read_and_check(*c, {3}, 1);  // the connection is still good
}

TEST_F(ServerTest, MalformedRequestsGetErrorRepliesAndTheServerSurvives) {
  auto c = client();
  net::RequestHeader good;
  good.count = 2;
  uint64_t two[2] = {1, 2};
  auto bytes = [](const auto& v) { return std::as_bytes(std::span(&v, 1)); };
  auto data = std::as_bytes(std::span(two));

  // Authenticated (the client signs them) but malformed: error replies, the connection stays.
  net::RequestHeader bad = good;
  bad.magic = 0xdeadbeef;
  EXPECT_EQ(c->send_raw(bytes(bad), data).first, ReplyStatus::kBadRequest);
  bad = good;
  bad.version = 99;
  auto [status, message] = c->send_raw(bytes(bad), data);
  EXPECT_EQ(status, ReplyStatus::kBadRequest);
  EXPECT_NE(message.find("version 99"), std::string::npos) << message;
  bad = good;
  bad.count = 5;  // claims 5 indices, carries 2
  EXPECT_EQ(c->send_raw(bytes(bad), data).first, ReplyStatus::kBadRequest);
  bad.count = 0;
  EXPECT_EQ(c->send_raw(bytes(bad), {}).first, ReplyStatus::kBadRequest);
  bad.count = 1u << 30;
  EXPECT_EQ(c->send_raw(bytes(bad), data).first, ReplyStatus::kBadRequest);
  std::vector<std::byte> noise(333, std::byte{0x5a});
  EXPECT_EQ(c->send_raw(noise, noise).first, ReplyStatus::kBadRequest);
  EXPECT_EQ(c->send_raw(bytes(good), data).first, ReplyStatus::kOk);
  EXPECT_EQ(server_->stats().rejected, 6u);
  read_and_check(*c, {0, 1, 2, 299}, 4);
}

// A request that does not prove itself is never parsed: too short to name a connection, it is
// dropped (no reply); naming one with a wrong MAC, it closes that connection. Others go on.
TEST_F(ServerTest, UnauthenticatedRequestsAreDroppedAndAForgedOneClosesItsConnection) {
  auto other = client();
  net::RequestHeader good;
  good.count = 2;
  uint64_t two[2] = {1, 2};
  auto data = std::as_bytes(std::span(two));
  auto header = std::as_bytes(std::span(&good, 1));
  auto quiet = client("secret", 500);
  std::string m = message_of([&] { quiet->send_raw(header.first(12), data, false); });
  EXPECT_NE(m.find("no reply within 500 ms"), std::string::npos) << m;
  auto forged = client();
  m = message_of([&] { forged->send_raw(header, data, /*sign=*/false); });
  EXPECT_NE(m.find("closed the connection"), std::string::npos) << m;
  EXPECT_EQ(server_->stats().rejected, 2u);
  EXPECT_EQ(server_->stats().requests, 0u);
  read_and_check(*other, every_sample(7), 32);
  EXPECT_EQ(server_->stats().open_connections, 1u);
}

// Back-pressure: past its share of outstanding requests a client is answered kBusy and sends
// them again later; with reply memory bounded too, every record still arrives, exactly once.
TEST_F(ServerTest, RequestsPastTheQueueLimitAreAnsweredBusyAndSentAgain) {
  ServerOptions o;
  o.token = "secret";
  o.max_queued_per_connection = 2;
  o.read_threads = 1;
  o.max_reply_memory = 1 << 20;
  server_ = ShardServer::start(dataset_, o);
  auto c = client();
  read_and_check(*c, every_sample(7), 10);  // 30 requests in flight at once
  EXPECT_GT(server_->stats().busy, 0u);
  EXPECT_EQ(server_->stats().requests, 30u);
  EXPECT_EQ(server_->stats().rejected, 0u);
}

// A token file that holds no token is an error, never an open server.
TEST(TokenFile, EmptyUnreadableOrADirectoryIsAnError) {
  testing::TempDir tmp;
  auto message = [](const fs::path& p) {
    try {
      read_token_file(p);
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kConfig);
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  std::ofstream(tmp.path() / "empty").close();
  std::ofstream(tmp.path() / "blank") << "  \n";
  std::ofstream(tmp.path() / "good") << " s3cret \nsecond line\n";
  EXPECT_NE(message(tmp.path() / "empty").find("empty"), std::string::npos);
  EXPECT_NE(message(tmp.path() / "blank").find("no token"), std::string::npos);
  EXPECT_NE(message(tmp.path()).find("directory"), std::string::npos);
  EXPECT_NE(message(tmp.path() / "missing").find("cannot read"), std::string::npos);
  EXPECT_EQ(read_token_file(tmp.path() / "good"), "s3cret");
}

TEST_F(ServerTest, NobodyListeningFailsToConnectNamingThePeer) {
  std::string address = testing::free_loopback_address();
  auto t0 = std::chrono::steady_clock::now();
  std::string m = message_of([&] { PeerClient::connect(address, {"secret", 2000}); });
  EXPECT_NE(m.find("peer " + address), std::string::npos) << m;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
}

TEST_F(ServerTest, APeerThatNeverAnswersTimesOut) {
  // A TCP listener that accepts (in the kernel's backlog) and never speaks UCX.
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  ASSERT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(s, 16), 0);
  ASSERT_EQ(::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len), 0);
  std::string address = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  auto t0 = std::chrono::steady_clock::now();
  std::string m = message_of([&] { PeerClient::connect(address, {"secret", 1000}); });
  EXPECT_NE(m.find("peer " + address), std::string::npos) << m;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  ::close(s);
}

TEST_F(ServerTest, AServerProcessKilledMidReadFailsTheClientInTime) {
  // `sluice serve` as a real process, killed with SIGKILL between two reads.
  int out[2];
  ASSERT_EQ(::pipe(out), 0);
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(out[1], 1);
    ::close(out[0]);
    ::setenv("SLUICE_TOKEN", "secret", 1);
    ::execl(SLUICE_CLI, SLUICE_CLI, "serve", dir().c_str(), "--listen", "127.0.0.1:0", "--json",
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(out[1]);
  FILE* f = ::fdopen(out[0], "r");
  char line[512] = {0};
  ASSERT_NE(std::fgets(line, sizeof line, f), nullptr) << "sluice serve printed nothing";
  std::string json(line);
  auto at = json.find("\"address\":\"");
  ASSERT_NE(at, std::string::npos) << json;
  std::string address = json.substr(at + 11, json.find('"', at + 11) - at - 11);
  auto c = PeerClient::connect(address, {"secret", 2000});
  std::vector<uint64_t> some = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<ReadRequest> requests(1);
  Buffer buffer;
  requests[0].indices = some;
  requests[0].destination = [&](size_t bytes) { return buffer(bytes); };
  c->read(requests);
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  std::fclose(f);
  auto t0 = std::chrono::steady_clock::now();
  std::string m = message_of([&] { c->read(requests); });
  EXPECT_NE(m.find("peer " + address), std::string::npos) << m;
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  // The client stays failed, and says why.
  EXPECT_NE(message_of([&] { c->read(requests); }).find("unusable"), std::string::npos);
}

}  // namespace
}  // namespace sluice

namespace sluice {
namespace {

// Run by tests/net/netns_test.sh against a server it started elsewhere (another network
// namespace); skipped when SLUICE_TEST_PEER is not set.
TEST(ExternalServer, EveryByteEqualsTheLocalRead) {
  const char* peer = std::getenv("SLUICE_TEST_PEER");
  const char* dir = std::getenv("SLUICE_TEST_DATASET");
  if (!peer || !dir)
    GTEST_SKIP() << "needs a server in another network namespace: run by tests/net/netns_test.sh "
                    "(SLUICE_TEST_PEER, SLUICE_TEST_DATASET)";
  const char* token = std::getenv("SLUICE_TOKEN");
  auto dataset = Dataset::open(dir);
  auto c = PeerClient::connect(peer, {token ? token : "", 5000});
  const uint64_t n = dataset->num_samples();
  std::vector<ReadRequest> requests;
  std::vector<Buffer> buffers((n + 15) / 16);
  for (uint64_t first = 0, k = 0; first < n; first += 16, ++k) {
    ReadRequest r;
    for (uint64_t i = first; i < std::min(n, first + 16); ++i) r.indices.push_back(n - 1 - i);
    r.destination = [&buffers, k](size_t bytes) { return buffers[k](bytes); };
    requests.push_back(std::move(r));
  }
  c->read(requests);
  for (size_t k = 0; k < requests.size(); ++k) {
    for (size_t i = 0; i < requests[k].indices.size(); ++i) {
      auto want = dataset->read_record(requests[k].indices[i]);
      ASSERT_EQ(requests[k].records[i].size, want.size());
      ASSERT_EQ(0, std::memcmp(requests[k].record_data[i].data(), want.data(), want.size()))
          << "sample " << requests[k].indices[i];
    }
  }
}

}  // namespace
}  // namespace sluice
