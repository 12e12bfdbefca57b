// Checkpoint copies on a peer (CheckpointReplica, net/replica_store.h) between a real shard
// server and its clients over UCX on loopback: a save copied and published there, a restore
// when the local copy is gone, every refusal (no token, a wrong one, a path out of the store, a
// publish of a file that never arrived) and every damage (in transfer, at rest) named, and a
// peer that is down costing the copy, never the save.

#include <sluice/checkpoint.h>
#include <sluice/error.h>

#include "checkpoint/files.h"
#include "net/client.h"
#include "net/server.h"
#include "net/wire.h"
#include "test_util.h"

#include <fmt/format.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <list>
#include <mutex>

namespace sluice {
namespace {

using testing::message_of;

namespace fs = std::filesystem;

std::vector<std::vector<std::byte>> some_parts(uint64_t seed) {
  std::vector<std::vector<std::byte>> out;
  // Empty, small, and one over two batches of 8 MiB chunks (4 to a batch, the next read while
  // one is sent) with a ragged end.
  for (size_t n : {0ul, 4097ul, (43ul << 20) + 5, 100ul})
    out.push_back(testing::sample_bytes(seed + n, 0, n));
  return out;
}

std::vector<CheckpointPart> as_parts(const std::vector<std::vector<std::byte>>& data) {
  std::vector<CheckpointPart> parts;
  for (size_t i = 0; i < data.size(); ++i) parts.push_back({fmt::format("t{}", i), data[i]});
  return parts;
}

std::string file_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

class ReplicaTest : public ::testing::Test {
 protected:
  void SetUp() override { start(tmp_ / "peer"); }

  void start(const fs::path& store) {
    server_.reset();
    ServerOptions o;
    o.token = "secret";
    o.checkpoint_dir = store;
    net::ServerFaults faults;
    faults.reply = [this](net::ReplyHeader& h, std::span<std::byte> d,
                          std::chrono::milliseconds& delay) {
      std::lock_guard lock(mu_);
      if (fault_) fault_(h, d, delay);
    };
    server_ = net::start_server(nullptr, o, std::move(faults));
  }

  CheckpointOptions with_replica(std::string token = "secret") {
    CheckpointOptions o;
    o.replica = {server_->address(), std::move(token), 5000, ""};
    return o;
  }

  void expect_loaded(const fs::path& dir, const std::vector<std::vector<std::byte>>& want,
                     const CheckpointOptions& o = {}) {
    auto got = load_checkpoint(dir, o);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) EXPECT_TRUE(got[i].bytes == want[i]) << "part " << i;
  }

  // A raw checkpoint op, as a hostile (but authenticated) client might send it.
  // A kCommit carries `file_sum`, the checksum of the whole file.
  net::RawCall raw(net::PeerClient& c, net::CheckpointOp op, const std::string& name,
                   const std::string& payload = "", uint64_t length = 0, uint64_t file_sum = 0) {
    net::CheckpointHeader h;
    h.op = op;
    h.length = length;
    h.name_bytes = static_cast<uint32_t>(name.size());
    auto data = std::as_bytes(std::span(data_.emplace_back(name + payload)));
    h.checksum = op == net::CheckpointOp::kCommit
                     ? file_sum
                     : net::checkpoint_chunk_checksum(data.subspan(name.size()), 0);
    net::RawCall call;
    call.header.resize(sizeof h);
    std::memcpy(call.header.data(), &h, sizeof h);
    call.data = data;
    c.call(std::span(&call, 1));
    return call;
  }

  testing::TempDir tmp_;
  std::unique_ptr<ShardServer> server_;
  std::mutex mu_;
  net::ReplyFault fault_;
  std::list<std::string> data_;
};

TEST_F(ReplicaTest, ASaveIsCopiedAndRestoredWhenTheLocalCopyIsGone) {
  const fs::path local = tmp_ / "node" / "step-100";
  auto data = some_parts(1);
  auto r = save_checkpoint(local, as_parts(data), with_replica());
  EXPECT_EQ(r.replica_error, "");
  const std::string name = checkpoint_copy_name(local);
  EXPECT_TRUE(name.starts_with("step-100-")) << name;
  for (const char* f : {"data", "index.json"})
    EXPECT_EQ(file_text(tmp_ / "peer" / name / f), file_text(local / f)) << f;
  EXPECT_FALSE(fs::exists(tmp_ / "peer" / ("." + name + ".incoming")));
  EXPECT_GT(server_->stats().checkpoint_bytes, 43u << 20);

  fs::remove_all(tmp_ / "node");  // the node was replaced
  expect_loaded(local, data, with_replica());
  EXPECT_EQ(file_text(local / "data"), file_text(tmp_ / "peer" / name / "data"));
  // Present now: nothing to fetch.
  EXPECT_FALSE(restore_checkpoint_dir(with_replica().replica, name, local));

  // Another job's "step-100" has a copy of its own.
  auto theirs = some_parts(9);
  const fs::path elsewhere = tmp_ / "other-job" / "step-100";
  EXPECT_EQ(save_checkpoint(elsewhere, as_parts(theirs), with_replica()).replica_error, "");
  EXPECT_NE(checkpoint_copy_name(elsewhere), name);
  fs::remove_all(local);
  expect_loaded(local, data, with_replica());

  // A second save of that name replaces the copy in one step.
  auto other = some_parts(2);
  EXPECT_EQ(save_checkpoint(local, as_parts(other), with_replica()).replica_error, "");
  fs::remove_all(local);
  expect_loaded(local, other, with_replica());
}

TEST_F(ReplicaTest, APeerThatIsDownCostsTheCopyNotTheSave) {
  const fs::path local = tmp_ / "step-1";
  auto data = some_parts(3);
  CheckpointOptions o;
  o.replica = {testing::free_loopback_address(), "secret", 2000, ""};
  auto r = save_checkpoint(local, as_parts(data), o);
  EXPECT_NE(r.replica_error.find("checkpoint copy of step-1-"), std::string::npos)
      << r.replica_error;
  EXPECT_NE(r.replica_error.find("on peer " + o.replica.address), std::string::npos)
      << r.replica_error;
  expect_loaded(local, data);
  // And a restore from it fails naming it.
  fs::remove_all(local);
  std::string m = message_of([&] { load_checkpoint(local, o); });
  EXPECT_NE(m.find(o.replica.address), std::string::npos) << m;
}

TEST_F(ReplicaTest, CopiesNeedTheToken) {
  auto data = some_parts(4);
  auto r = save_checkpoint(tmp_ / "a", as_parts(data), with_replica("wrong"));
  EXPECT_NE(r.replica_error, "");
  r = save_checkpoint(tmp_ / "b", as_parts(data), with_replica(""));
  EXPECT_NE(r.replica_error.find("no token"), std::string::npos) << r.replica_error;
  EXPECT_TRUE(fs::is_empty(tmp_ / "peer"));  // nothing of either reached the disk
  EXPECT_EQ(server_->stats().checkpoint_ops, 0u);
  expect_loaded(tmp_ / "a", data);
}

TEST_F(ReplicaTest, NamesCannotLeaveTheStoreAndPublishNeedsEveryFile) {
  auto c = net::PeerClient::connect(server_->address(), {"secret", 5000});
  for (const char* name :
       {"../x/data", "ckpt/../../etc", "ckpt/x/y", ".ckpt/data", "a/b.sluice", "ckpt/", "/data"}) {
    auto call = raw(*c, net::CheckpointOp::kWrite, name, "bytes");
    EXPECT_EQ(call.status, net::ReplyStatus::kBadRequest) << name;
  }
  EXPECT_FALSE(fs::exists(tmp_ / "x"));
  // A file that never arrived cannot be published, nor a commit claim more than arrived.
  EXPECT_EQ(raw(*c, net::CheckpointOp::kWrite, "c/one", "abc").status, net::ReplyStatus::kOk);
  auto commit = raw(*c, net::CheckpointOp::kCommit, "c/one", "", 10);
  EXPECT_EQ(commit.status, net::ReplyStatus::kBadRequest);
  // Nor one whose bytes are not the writer's file (a chunk lost or misplaced).
  commit = raw(*c, net::CheckpointOp::kCommit, "c/one", "", 3, /*file_sum=*/12345);
  EXPECT_EQ(commit.status, net::ReplyStatus::kBadRequest);
  std::string text(reinterpret_cast<const char*>(commit.reply.data()), commit.reply.size());
  EXPECT_NE(text.find("do not match the writer's checksum"), std::string::npos) << text;
  net::FileChecksum abc;
  abc.update(std::as_bytes(std::span(std::string_view("abc"))));
  EXPECT_EQ(raw(*c, net::CheckpointOp::kCommit, "c/one", "", 3, abc.digest()).status,
            net::ReplyStatus::kOk);
  auto publish = raw(*c, net::CheckpointOp::kPublish, "c", "one\ntwo\n");
  EXPECT_EQ(publish.status, net::ReplyStatus::kBadRequest);
  std::string why(reinterpret_cast<const char*>(publish.reply.data()), publish.reply.size());
  EXPECT_NE(why.find("two, which was not committed"), std::string::npos) << why;
  EXPECT_FALSE(fs::exists(tmp_ / "peer" / "c"));
  EXPECT_EQ(raw(*c, net::CheckpointOp::kList, "nothing").status, net::ReplyStatus::kNotFound);
  // A write whose checksum does not match its bytes is refused.
  net::CheckpointHeader h;
  h.name_bytes = 5;
  h.checksum = 1;
  std::string d = "c/twoxyz";
  net::RawCall bad;
  bad.header.resize(sizeof h);
  std::memcpy(bad.header.data(), &h, sizeof h);
  bad.data = std::as_bytes(std::span(d));
  c->call(std::span(&bad, 1));
  EXPECT_EQ(bad.status, net::ReplyStatus::kBadRequest);
  // A server with no dataset answers sample reads with a refusal.
  std::vector<std::byte> buf(4096);
  std::vector<net::ReadRequest> reads(1);
  reads[0].indices = {0};
  reads[0].destination = [&](size_t) { return std::span(buf); };
  std::string m = message_of([&] { c->read(reads); });
  EXPECT_NE(m.find("serves no dataset"), std::string::npos) << m;
}

TEST_F(ReplicaTest, DamageInTransferOrOnThePeersDiskIsCaught) {
  const fs::path local = tmp_ / "step-7";
  auto data = some_parts(5);
  ASSERT_EQ(save_checkpoint(local, as_parts(data), with_replica()).replica_error, "");
  fs::remove_all(local);
  {
    std::lock_guard lock(mu_);
    fault_ = [](net::ReplyHeader&, std::span<std::byte> d, std::chrono::milliseconds&) {
      if (d.size() > (1 << 20)) d[d.size() / 2] ^= std::byte{1};  // a chunk read back
    };
  }
  ErrorCode code{};
  std::string m = message_of([&] { load_checkpoint(local, with_replica()); }, &code);
  EXPECT_EQ(code, ErrorCode::kCorruption) << m;
  EXPECT_NE(m.find(checkpoint_copy_name(local) + "/data"), std::string::npos) << m;
  EXPECT_NE(m.find("came back damaged"), std::string::npos) << m;
  EXPECT_FALSE(fs::exists(local));  // nothing half-fetched is visible
  {
    std::lock_guard lock(mu_);
    fault_ = nullptr;
  }
  // A byte flipped on the peer's disk, in either file: the transfer is faithful, the file's
  // checksum taken at its commit is not; nothing is published here.
  for (const char* file : {"data", "index.json"}) {
    const fs::path copy = tmp_ / "peer" / checkpoint_copy_name(local) / file;
    const auto flip = [&] {
      std::fstream f(copy, std::ios::in | std::ios::out | std::ios::binary);
      f.seekg(file == std::string("data") ? 4097 + 12345 : 20);
      const char b = static_cast<char>(f.get() ^ 0x20);
      f.seekp(file == std::string("data") ? 4097 + 12345 : 20);
      f.put(b);
    };
    flip();
    m = message_of([&] { load_checkpoint(local, with_replica()); }, &code);
    EXPECT_EQ(code, ErrorCode::kCorruption) << m;
    EXPECT_NE(m.find(checkpoint_copy_name(local) + "/" + file + " on peer"), std::string::npos)
        << m;
    EXPECT_NE(m.find("the peer's copy is damaged"), std::string::npos) << m;
    EXPECT_FALSE(fs::exists(local));
    flip();  // back as it was
  }
  expect_loaded(local, data, with_replica());
  // A file whose size moved on the peer's disk: the listing says so.
  fs::remove_all(local);
  fs::resize_file(tmp_ / "peer" / checkpoint_copy_name(local) / "index.json", 5);
  m = message_of([&] { load_checkpoint(local, with_replica()); }, &code);
  EXPECT_EQ(code, ErrorCode::kIo) << m;  // the peer's error, as it reports it
  EXPECT_NE(m.find("index.json: 5 bytes on disk"), std::string::npos) << m;
  EXPECT_FALSE(fs::exists(local));
}

TEST_F(ReplicaTest, AServerWithoutACheckpointDirRefusesCopies) {
  ServerOptions o;
  o.token = "secret";
  auto plain = ShardServer::start(nullptr, o);
  CheckpointOptions co;
  co.replica = {plain->address(), "secret", 5000, ""};
  auto r = save_checkpoint(tmp_ / "s", as_parts(some_parts(6)), co);
  EXPECT_NE(r.replica_error.find("keeps no checkpoint copies"), std::string::npos)
      << r.replica_error;
}

}  // namespace
}  // namespace sluice
