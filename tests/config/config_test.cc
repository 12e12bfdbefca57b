// YAML config parsing: every key, and errors that name file, line and key.

#include "test_util.h"

#include <sched.h>

#include <algorithm>
#include <fstream>

namespace sluice {
namespace {

std::string config_error(const std::string& yaml) {
  try {
    LoaderOptions::from_yaml_string(yaml, "train.yaml", "/base");
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kConfig) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error for:\n" << yaml;
  return {};
}

TEST(Config, ParsesEveryKey) {
  auto o = LoaderOptions::from_yaml_string(R"(
dataset: {path: data/imagenet, format: shards}
batch_size: 512
drop_last: false
seed: 42
shuffle: {mode: block, block_size: 128, buffer_size: 999}
prefetch: 8
io: {engine: threads, queue_depth: 32, direct: false, threads: 3, timeout_ms: 500, verify: false}
device: cuda:1
distributed: {rank: 3, world_size: 8}
)",
                                           "train.yaml", "/base");
  EXPECT_EQ(o.dataset.path, "/base/data/imagenet");
  EXPECT_EQ(o.dataset.format, DatasetFormat::kShards);
  EXPECT_EQ(o.batch_size, 512u);
  EXPECT_FALSE(o.drop_last);
  EXPECT_EQ(o.seed, 42u);
  EXPECT_EQ(o.shuffle.mode, ShuffleMode::kBlock);
  EXPECT_EQ(o.shuffle.block_size, 128u);
  EXPECT_EQ(o.shuffle.buffer_size, 999u);
  EXPECT_EQ(o.prefetch, 8u);
  EXPECT_EQ(o.io.engine, IoEngineKind::kThreads);
  EXPECT_EQ(o.io.queue_depth, 32u);
  EXPECT_EQ(o.io.direct, DirectIo::kOff);
  EXPECT_EQ(o.io.threads, 3u);
  EXPECT_EQ(o.io.timeout_ms, 500u);
  EXPECT_FALSE(o.io.verify);
  EXPECT_EQ(o.device.kind, DeviceKind::kCuda);
  EXPECT_EQ(o.device.index, 1);
  EXPECT_EQ(o.resolved_rank(), 3u);
  EXPECT_EQ(o.resolved_world_size(), 8u);
  // to_yaml round-trips.
  auto again = LoaderOptions::from_yaml_string(o.to_yaml(), "again.yaml");
  EXPECT_EQ(again.to_yaml(), o.to_yaml());
}

TEST(Config, DefaultsMatchTheContract) {
  auto o = LoaderOptions::from_yaml_string("dataset: {path: /d}\n", "t.yaml");
  EXPECT_EQ(o.dataset.path, "/d");
  EXPECT_EQ(o.dataset.format, DatasetFormat::kAuto);
  EXPECT_EQ(o.batch_size, 256u);
  EXPECT_TRUE(o.drop_last);
  EXPECT_EQ(o.shuffle.mode, ShuffleMode::kGlobal);
  EXPECT_EQ(o.shuffle.block_size, 4096u);
  EXPECT_EQ(o.shuffle.buffer_size, 16384u);
  EXPECT_EQ(o.prefetch, 4u);
  EXPECT_EQ(o.io.queue_depth, 128u);
  EXPECT_EQ(o.io.direct, DirectIo::kAuto);
  EXPECT_EQ(o.device.kind, DeviceKind::kCpu);
  EXPECT_FALSE(o.distributed.rank.has_value());
}

TEST(Config, ErrorsNameFileLineAndKey) {
  EXPECT_EQ(config_error("dataset: {path: /d}\nshuffle:\n  mode: globl\n"),
            "train.yaml:3: shuffle.mode: unknown value \"globl\" (expected global, block, "
            "shard, none)");
  EXPECT_EQ(config_error("batch_size: 8\nbatch_sz: 3\n"), "train.yaml:2: batch_sz: unknown key");
  EXPECT_EQ(config_error("shuffle: {mode: global, blok_size: 3}\n"),
            "train.yaml:1: shuffle.blok_size: unknown key");
  EXPECT_EQ(config_error("batch_size: abc\n"),
            "train.yaml:1: batch_size: expected a positive integer, got \"abc\"");
  EXPECT_EQ(config_error("batch_size: 0\n"),
            "train.yaml:1: batch_size: 0 is out of range [1, 16777216]");
  EXPECT_EQ(config_error("batch_size: -5\n"),
            "train.yaml:1: batch_size: expected a positive integer, got \"-5\"");
  EXPECT_EQ(config_error("batch_size: [1, 2]\n"),
            "train.yaml:1: batch_size: expected a positive integer, got a list");
  EXPECT_EQ(config_error("drop_last: maybe\n"),
            "train.yaml:1: drop_last: expected true or false, got \"maybe\"");
  EXPECT_EQ(config_error("device: gpu\n"),
            "train.yaml:1: device: unknown value \"gpu\" (expected cpu, pinned, cuda:N)");
  EXPECT_EQ(config_error("io:\n  engine: spdk\n"),
            "train.yaml:2: io.engine: unknown value \"spdk\" (expected auto, uring, threads)");
  EXPECT_EQ(config_error("io: 3\n"), "train.yaml:1: io: expected a mapping, got \"3\"");
  EXPECT_EQ(config_error("io: {threads: 0}\n"),
            "train.yaml:1: io.threads: 0 is out of range [1, 64]");
  EXPECT_EQ(config_error("distributed: {world_size: 0}\n"),
            "train.yaml:1: distributed.world_size: 0 is out of range [1, 4294967295]");
  EXPECT_EQ(config_error("distributed: {rank: everyone}\n"),
            "train.yaml:1: distributed.rank: expected env or an integer, got \"everyone\"");
  EXPECT_EQ(config_error("seed: 1\nseed: 2\n"), "train.yaml:2: seed: duplicate key");
  EXPECT_EQ(config_error("dataset: {path: \"\"}\n"),
            "train.yaml:1: dataset.path: must not be empty");
  EXPECT_EQ(config_error("- a\n- b\n"),
            "train.yaml: expected a mapping of config keys at the top level");
  EXPECT_NE(config_error("batch_size: [1\n").find("train.yaml:"), std::string::npos);
}

TEST(Config, ObjectStoreAndCacheKeys) {
  auto o = LoaderOptions::from_yaml_string(R"(
dataset: {path: "s3://bucket/train", s3: {endpoint: "http://127.0.0.1:9000", region: eu-west-1}}
cache: {dir: nvme/cache, capacity: 200G, memory: 1.5G, policy: lru, fetch_size: 4M}
)",
                                           "train.yaml", "/base");
  EXPECT_EQ(o.dataset.path, "s3://bucket/train");  // not made relative to the config's directory
  EXPECT_EQ(o.dataset.s3.endpoint, "http://127.0.0.1:9000");
  EXPECT_EQ(o.dataset.s3.region, "eu-west-1");
  EXPECT_EQ(o.cache.dir, "/base/nvme/cache");
  EXPECT_EQ(o.cache.capacity, 200ull << 30);
  EXPECT_EQ(o.cache.memory, 3ull << 29);
  EXPECT_EQ(o.cache.policy, CachePolicy::kLru);
  EXPECT_EQ(o.cache.fetch_size, 4ull << 20);
  EXPECT_EQ(CacheOptions{}.policy, CachePolicy::kClairvoyant);
  // Printed and parsed back: the same options, and never a secret.
  o.dataset.s3.secret_access_key = "hunter2";
  std::string yaml = o.to_yaml();
  EXPECT_EQ(yaml.find("hunter2"), std::string::npos) << yaml;
  auto back = LoaderOptions::from_yaml_string(yaml, "printed");
  EXPECT_EQ(back.cache, o.cache);
  EXPECT_EQ(back.dataset.s3.endpoint, o.dataset.s3.endpoint);
  EXPECT_EQ(config_error("cache: {capacity: 20X}\n"),
            "train.yaml:1: cache.capacity: expected a size in bytes, optionally with K, M, G or T, "
            "got \"20X\"");
  EXPECT_EQ(config_error("cache: {policy: mru}\n"),
            "train.yaml:1: cache.policy: unknown value \"mru\" (expected clairvoyant, lru)");
  EXPECT_EQ(config_error("dataset: {s3: {key: x}}\n"), "train.yaml:1: dataset.s3.key: unknown key");
}

TEST(Config, TransformsParsePrintAndOverride) {
  auto o = LoaderOptions::from_yaml_string(R"(
dataset: data
transforms:
  jpg:
    - decode: rgb
    - random_resized_crop: {size: [200, 224], scale: [0.25, 1.0], ratio: [0.5, 2]}
    - flip: 0.25
    - normalize: {mean: [0.5, 0.4, 0.3], std: [0.2, 0.2, 0.2], dtype: float16}
    - layout: chw
  png: [{decode: gray}, {resize: 256}, {center_crop: 224}]
transform_errors: skip
)",
                                           "train.yaml", "/base");
  ASSERT_EQ(o.transforms.size(), 2u);
  const auto& j = o.transforms[0].steps;
  ASSERT_EQ(j.size(), 5u);
  EXPECT_EQ(j[1].kind, TransformStep::Kind::kRandomResizedCrop);
  EXPECT_EQ(j[1].height, 200u);
  EXPECT_EQ(j[1].width, 224u);
  EXPECT_EQ(j[1].scale[0], 0.25);
  EXPECT_EQ(j[1].ratio[1], 2.0);
  EXPECT_EQ(j[2].p, 0.25);
  EXPECT_TRUE(j[3].half);
  EXPECT_EQ(j[3].mean, (std::vector<double>{0.5, 0.4, 0.3}));
  EXPECT_TRUE(j[4].chw);
  EXPECT_EQ(o.transforms[1].steps[1].width, 0u);  // the shorter side
  EXPECT_EQ(o.transform_errors, TransformErrors::kSkip);
  // Printed back and parsed again: the same.
  auto again = LoaderOptions::from_yaml_string(o.to_yaml(), "again.yaml", "/base");
  EXPECT_EQ(again.transforms, o.transforms) << o.to_yaml();
  EXPECT_EQ(again.transform_errors, TransformErrors::kSkip);
  // One field's steps by dotted key (Python's {"transforms": {"jpg": [...]}}).
  o.set("transforms.jpg", R"([{"decode": "rgb"}, {"center_crop": 64}])");
  ASSERT_EQ(o.transforms.size(), 2u);
  EXPECT_EQ(o.transforms[0].steps.size(), 2u);
  EXPECT_EQ(LoaderOptions{}.transform_errors, TransformErrors::kFail);

  EXPECT_NE(config_error("transforms: {jpg: [{resize: 9}]}")
                .find("train.yaml:1: transforms.jpg[0]: decode comes first"),
            std::string::npos);
  EXPECT_NE(config_error("transforms: {jpg: [{decode: rgb}, {resize: 9}]}").find("no fixed size"),
            std::string::npos);
  EXPECT_NE(config_error("transforms: {jpg: [{decode: cmyk}, {center_crop: 9}]}")
                .find("transforms.jpg[0].decode: unknown value \"cmyk\""),
            std::string::npos);
  EXPECT_NE(config_error("transforms: {jpg: [{decode: rgb}, {center_crop: 9}, {flip: 2}]}")
                .find("transforms.jpg[2].flip"),
            std::string::npos);
  EXPECT_NE(config_error("transforms: {jpg: [{decode: rgb}, {center_crop: 9}, {layout: chw}, "
                         "{normalize: {mean: [0, 0, 0], std: [1, 1, 1]}}]}")
                .find("comes"),
            std::string::npos);
  EXPECT_NE(config_error("transform_errors: ignore").find("expected fail, skip"),
            std::string::npos);

  // dataset.fields: tar fields some samples may lack.
  auto f = LoaderOptions::from_yaml_string(
      "dataset: {path: d, fields: {json: optional, cls: required}}", "t.yaml", "/base");
  EXPECT_EQ(f.dataset.optional_fields, std::vector<std::string>{"json"});
  EXPECT_EQ(
      LoaderOptions::from_yaml_string(f.to_yaml(), "again.yaml", "/base").dataset.optional_fields,
      std::vector<std::string>{"json"});
  f.set("dataset.fields.txt", "optional");
  f.set("dataset.fields.json", "required");
  EXPECT_EQ(f.dataset.optional_fields, std::vector<std::string>{"txt"});
  EXPECT_NE(config_error("dataset: {path: d, fields: {json: maybe}}")
                .find("dataset.fields.json: unknown value \"maybe\" (expected required, optional)"),
            std::string::npos);
}

TEST(Config, FileErrors) {
  testing::TempDir tmp;
  try {
    LoaderOptions::from_yaml(tmp / "missing.yaml");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kNotFound);
    EXPECT_NE(std::string(e.what()).find("missing.yaml"), std::string::npos);
  }
  {
    std::ofstream f(tmp / "t.yaml");
    f << "# a comment\ndataset: {path: rel/data}\n\nprefetch: 0\n";
  }
  try {
    LoaderOptions::from_yaml(tmp / "t.yaml");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()),
              (tmp / "t.yaml").string() + ":4: prefetch: 0 is out of range [1, 1024]");
  }
  {
    std::ofstream f(tmp / "t.yaml");
    f << "dataset: {path: rel/data}\n";
  }
  EXPECT_EQ(LoaderOptions::from_yaml(tmp / "t.yaml").dataset.path, tmp / "rel/data");
}

TEST(Config, OverridesByDottedKey) {
  LoaderOptions o;
  o.set("shuffle.mode", "shard");
  o.set("batch_size", "64");
  o.set("io.direct", "auto");
  o.set("distributed.rank", "env");
  EXPECT_EQ(o.shuffle.mode, ShuffleMode::kShard);
  EXPECT_EQ(o.batch_size, 64u);
  EXPECT_THROW(o.set("shuffle.mod", "global"), Error);
  EXPECT_THROW(o.set("batch_size", "-1"), Error);
}

// Python's keyword arguments come typed: a string is never read as YAML, and each value meets
// the same setter (and error) as its YAML spelling.
TEST(Config, TypedValuesMeetTheSameSettersWithoutYaml) {
  LoaderOptions o;
  o.set("dataset.path", ConfigValue{std::string("/data/a: [b] #c")});
  EXPECT_EQ(o.dataset.path, "/data/a: [b] #c");
  o.set("cache.dir", ConfigValue{std::string("null")});  // a directory called null
  EXPECT_EQ(o.cache.dir, std::filesystem::current_path() / "null");
  o.set("batch_size", ConfigValue{int64_t{64}});
  o.set("drop_last", ConfigValue{false});
  o.set("seed", ConfigValue{uint64_t{18446744073709551615u}});
  o.set("io.direct", ConfigValue{std::string("auto")});
  EXPECT_EQ(o.batch_size, 64u);
  EXPECT_FALSE(o.drop_last);
  EXPECT_EQ(o.seed, 18446744073709551615u);
  ConfigValue::Map peer = {{"address", {std::string("10.0.0.2:7070")}},
                           {"shards", {ConfigValue::List{{int64_t{0}}, {std::string("5-6")}}}}};
  o.set("distributed.peers", ConfigValue{ConfigValue::List{{peer}}});
  ASSERT_EQ(o.distributed.peers.size(), 1u);
  EXPECT_EQ(o.distributed.peers[0].shards, (std::vector<uint32_t>{0, 5, 6}));
  ConfigValue::List steps = {{ConfigValue::Map{{"decode", {std::string("rgb")}}}},
                             {ConfigValue::Map{{"center_crop", {int64_t{64}}}}}};
  o.set("transforms.jpg", ConfigValue{steps});
  LoaderOptions t;
  t.set("transforms.jpg", R"([{"decode": "rgb"}, {"center_crop": 64}])");
  EXPECT_EQ(o.transforms, t.transforms);
  auto error = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  // The errors are the text path's, word for word (an override's has no line: always 1).
  struct Case {
    std::string key;
    ConfigValue typed;
    std::string text;
  };
  for (const Case& c : std::vector<Case>{{"batch_size", {int64_t{-1}}, "-1"},
                                         {"batch_size", {true}, "true"},
                                         {"drop_last", {2.5}, "2.5"},
                                         {"shuffle", {std::string("none")}, "none"},
                                         {"shuffle.mod", {std::string("global")}, "global"},
                                         {"io.threads", {}, "null"}}) {
    LoaderOptions a, b;
    std::string typed_error = error([&] { a.set(c.key, c.typed); });
    EXPECT_NE(typed_error, "no error") << c.key;
    EXPECT_EQ(typed_error, error([&] { b.set(c.key, std::string_view(c.text)); })) << c.key;
  }
}

TEST(Config, RankAndWorldSizeFromTheEnvironment) {
  LoaderOptions o;
  setenv("RANK", "2", 1);
  setenv("WORLD_SIZE", "4", 1);
  EXPECT_EQ(o.resolved_rank(), 2u);
  EXPECT_EQ(o.resolved_world_size(), 4u);
  setenv("RANK", "4", 1);
  EXPECT_THROW(o.resolved_rank(), Error);
  setenv("RANK", "two", 1);
  EXPECT_THROW(o.resolved_rank(), Error);
  unsetenv("RANK");
  unsetenv("WORLD_SIZE");
  EXPECT_EQ(o.resolved_rank(), 0u);
  EXPECT_EQ(o.resolved_world_size(), 1u);
}

TEST(Config, LoaderThreadsFollowTheCoresThisRankMayUse) {
  LoaderOptions o;
  EXPECT_EQ(o.io.threads, 0u);  // auto
  cpu_set_t set;
  ASSERT_EQ(sched_getaffinity(0, sizeof set, &set), 0);
  const uint32_t cores = static_cast<uint32_t>(CPU_COUNT(&set));
  std::string why;
  const uint32_t threads = o.resolved_io_threads(&why);
  EXPECT_GE(threads, 1u);
  EXPECT_LE(threads, std::min(cores, 4u)) << why;  // never more threads than cores
  EXPECT_NE(why.find("io.threads: auto"), std::string::npos) << why;
  setenv("LOCAL_WORLD_SIZE", "512", 1);  // more ranks on the node than cores: one each
  EXPECT_EQ(o.resolved_io_threads(&why), 1u);
  EXPECT_NE(why.find("shared by 512 ranks"), std::string::npos) << why;
  unsetenv("LOCAL_WORLD_SIZE");

  // Decoding is CPU work: every core, past the reading cap of 4.
  o = LoaderOptions::from_yaml_string("transforms: {jpg: [{decode: rgb}, {center_crop: 8}]}\n",
                                      "t.yaml");
  const uint32_t decoding = o.resolved_io_threads(&why);
  EXPECT_NE(why.find("one per core for transforms"), std::string::npos) << why;
  EXPECT_LE(decoding, cores) << why;
  EXPECT_GE(decoding, threads) << why;
  if (threads < 4) {
    EXPECT_EQ(decoding, threads) << why;  // every core either way
  } else if (why.find("quota") == std::string::npos) {
    EXPECT_EQ(decoding, std::min(cores, 64u)) << why;  // past the cap of 4
  }

  // Under direct I/O: enough threads that the others' batches cover the queue while one
  // assembles (ceil(queue_depth / batch_size) + 1), at most 16; never fewer than for reading.
  o = LoaderOptions::from_yaml_string("batch_size: 64\nio: {queue_depth: 128}\n", "t.yaml");
  EXPECT_EQ(o.resolved_io_threads(&why, true), std::max(3u, threads)) << why;
  if (threads < 3) {
    EXPECT_NE(why.find("under direct I/O"), std::string::npos) << why;
  }
  EXPECT_EQ(o.resolved_io_threads(nullptr, false), threads);
  o.batch_size = 1;
  EXPECT_EQ(o.resolved_io_threads(&why, true), 16u) << why;
  o.batch_size = 4096;
  EXPECT_EQ(o.resolved_io_threads(&why, true), std::max(2u, threads)) << why;

  o = LoaderOptions::from_yaml_string("io: {threads: 3}\n", "t.yaml");
  EXPECT_EQ(o.resolved_io_threads(), 3u);
  EXPECT_EQ(o.resolved_io_threads(nullptr, true), 3u);  // a number is kept as it is
  o = LoaderOptions::from_yaml_string("dataset: /d\nio: {threads: auto}\n", "t.yaml");
  EXPECT_EQ(o.io.threads, 0u);
  EXPECT_EQ(LoaderOptions::from_yaml_string(o.to_yaml(), "again.yaml").io.threads, 0u);
}

}  // namespace
}  // namespace sluice

namespace sluice {
namespace {

TEST(Config, PeersWithShardListsAndRanges) {
  auto o = LoaderOptions::from_yaml_string(R"(
dataset: {path: /data/d}
distributed:
  peers:
    - {address: "10.0.0.2:7070", shards: [0, 2, 5-7]}
    - {address: "[fe80::1]:7070", shards: ["3-4"]}
  listen: 0.0.0.0:7070
  token: s3cret
  peer_timeout_ms: 1500
)",
                                           "t.yaml");
  ASSERT_EQ(o.distributed.peers.size(), 2u);
  EXPECT_EQ(o.distributed.peers[0].address, "10.0.0.2:7070");
  EXPECT_EQ(o.distributed.peers[0].shards, (std::vector<uint32_t>{0, 2, 5, 6, 7}));
  EXPECT_EQ(o.distributed.peers[1].shards, (std::vector<uint32_t>{3, 4}));
  EXPECT_EQ(o.distributed.listen, "0.0.0.0:7070");
  EXPECT_EQ(o.distributed.peer_timeout_ms, 1500u);
  // The YAML dump round-trips the peers and never shows the token.
  std::string yaml = o.to_yaml();
  EXPECT_EQ(yaml.find("s3cret"), std::string::npos) << yaml;
  auto again = LoaderOptions::from_yaml_string(yaml, "dump");
  EXPECT_EQ(again.distributed.peers, o.distributed.peers);
}

TEST(Config, BadPeersNameTheEntry) {
  auto message = [](const std::string& text) {
    try {
      LoaderOptions::from_yaml_string(text, "p.yaml");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_EQ(message("distributed: {peers: 3}"),
            "p.yaml:1: distributed.peers: expected a list of peers, got \"3\"");
  EXPECT_EQ(message("distributed:\n  peers:\n    - {shards: [1]}\n"),
            "p.yaml:3: distributed.peers[0].address: missing");
  EXPECT_EQ(message("distributed:\n  peers:\n    - {address: a:1, shards: [7-3]}\n"),
            "p.yaml:3: distributed.peers[0].shards: expected a shard number or a range A-B, got "
            "\"7-3\"");
  EXPECT_EQ(message("distributed:\n  peers:\n    - {address: a:1, shard: [1]}\n"),
            "p.yaml:3: distributed.peers[0].shard: unknown key (expected address, shards)");
}

}  // namespace
}  // namespace sluice

namespace sluice {
namespace {

TEST(Config, PeersFromTheEnvironment) {
  LoaderOptions o;
  setenv("SLUICE_PEERS", "10.0.0.2:7070=0-2,5;[fe80::1]:7070=3", 1);
  auto peers = o.resolved_peers();
  ASSERT_EQ(peers.size(), 2u);
  EXPECT_EQ(peers[0].address, "10.0.0.2:7070");
  EXPECT_EQ(peers[0].shards, (std::vector<uint32_t>{0, 1, 2, 5}));
  EXPECT_EQ(peers[1].address, "[fe80::1]:7070");
  EXPECT_EQ(peers[1].shards, (std::vector<uint32_t>{3}));
  o.distributed.peers = {{"a:1", {9}}};  // the config wins over the environment
  EXPECT_EQ(o.resolved_peers(), o.distributed.peers);
  o.distributed.peers.clear();
  setenv("SLUICE_PEERS", "10.0.0.2:7070", 1);
  try {
    o.resolved_peers();
    ADD_FAILURE() << "accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("SLUICE_PEERS"), std::string::npos) << e.what();
  }
  setenv("SLUICE_PEERS", "a:1=x-y", 1);
  EXPECT_THROW(o.resolved_peers(), Error);
  unsetenv("SLUICE_PEERS");
  EXPECT_TRUE(o.resolved_peers().empty());
}

}  // namespace
}  // namespace sluice
