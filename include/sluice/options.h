#pragma once

#include <sluice/export.h>
#include <sluice/sampler.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace sluice {

/// Which reader a dataset path needs (config `dataset.format`).
enum class DatasetFormat { kAuto, kShards, kTar, kTokens, kFiles, kNpy };

struct DatasetOptions {
  std::filesystem::path path;  // relative paths in a config file are relative to that file
  DatasetFormat format = DatasetFormat::kAuto;  // auto: a directory with a manifest, a .npy file,
                                                // or a token file when seq_len is set
  uint64_t seq_len = 0;      // tokens: tokens per sample (window length); required
  uint64_t stride = 0;       // tokens: tokens between window starts; 0 means seq_len
  uint32_t token_bytes = 2;  // tokens: 2 (uint16, as nanoGPT writes) or 4 (uint32)
  // tar: fields some samples may lack (config `dataset.fields: {json: optional}`): such a
  // sample's field is empty (an integer field: -1). Any other field missing from a sample is
  // an error naming the shard, the sample and the field.
  std::vector<std::string> optional_fields;
  // An s3://BUCKET/PREFIX path: where and as whom. Empty values come from the environment as
  // AWS tools read it (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
  // AWS_SESSION_TOKEN).
  struct S3 {
    std::string endpoint, region, access_key_id, secret_access_key, session_token;
  } s3;
};

/// Which sample a full cache drops (config `cache.policy`).
enum class CachePolicy {
  kClairvoyant,  // the one needed furthest in the future (Belady), from the sampler's order
  kLru,          // the least recently used, for comparison
};

/// A node cache in front of a dataset that is not on this node (an s3:// path, or any path when
/// `dir` is set: a slow shared file system). Config `cache`.
struct CacheOptions {
  std::filesystem::path dir;  // node-local directory; empty: memory only (for s3:// paths)
  uint64_t capacity = 0;      // bytes of samples kept under dir; 0: half the free space there
  uint64_t memory = 0;        // without dir: bytes kept in memory; 0: a quarter of free memory
  CachePolicy policy = CachePolicy::kClairvoyant;
  // A missing sample is fetched with the other samples of the aligned block of this many bytes
  // around it that the policy would keep, in one ranged read from the first to the last of them:
  // fewer requests for more bytes (an object store's request costs about what 4 MiB take to
  // arrive). 0: each sample's record alone (no byte fetched that is not asked for).
  uint64_t fetch_size = 4ull << 20;
  bool operator==(const CacheOptions&) const = default;
};

enum class IoEngineKind { kAuto, kUring, kThreads };
enum class DirectIo { kAuto, kOn, kOff };

struct IoOptions {
  IoEngineKind engine = IoEngineKind::kAuto;  // auto: io_uring when the kernel allows it
  // Reads in flight: in the loader's one IO thread under direct I/O, per loader thread through
  // the page cache.
  uint32_t queue_depth = 128;
  DirectIo direct = DirectIo::kAuto;  // O_DIRECT when the file system allows it
  // Loader threads, each building one batch at a time; 0 (auto): resolved_io_threads().
  uint32_t threads = 0;
  uint32_t timeout_ms = 30000;  // longest wait for a read or a batch
  bool verify = true;           // check every sample's checksum as it is read
};

enum class DeviceKind { kCpu, kPinned, kCuda };

struct DeviceOptions {
  DeviceKind kind = DeviceKind::kCpu;
  int index = 0;  // the N of cuda:N
};

/// A shard server and the shards it serves (config `distributed.peers`).
struct PeerOptions {
  std::string address;           // HOST:PORT of `sluice serve` or of another loader's server
  std::vector<uint32_t> shards;  // shard numbers (manifest order) it serves
  bool operator==(const PeerOptions&) const = default;
};

struct SLUICE_EXPORT DistributedOptions {
  std::optional<uint32_t> rank;        // nullopt: read RANK from the environment (default 0)
  std::optional<uint32_t> world_size;  // nullopt: read WORLD_SIZE from the environment (default 1)
  // Where the shards missing from this node are read from. A shard listed by several peers has
  // replicas, tried in this order when a peer fails.
  std::vector<PeerOptions> peers;
  std::string listen;                // HOST:PORT: also serve this node's shards to other loaders
  std::string token;                 // shared token of the cluster; "" reads token_file, then
                                     // $SLUICE_TOKEN
  std::filesystem::path token_file;  // a file holding the token (first line)
  bool no_token = false;  // listen without a token: anyone who can connect reads (trusted host)
  uint32_t peer_timeout_ms = 5000;  // connecting to a peer, and each batch's remote reads

  /// The cluster's token: `token`, else the first line of `token_file` (read_token_file), else
  /// $SLUICE_TOKEN unless no_token; "" when none. Throws kConfig naming a bad token file.
  std::string resolved_token() const;
};

/// The token in a token file: its first line, without surrounding whitespace. Throws
/// Error(kConfig) naming the file when it is missing, unreadable, a directory or holds no token:
/// a server never starts open by mistake.
SLUICE_EXPORT std::string read_token_file(const std::filesystem::path& path);

/// One step of a field's image transform (config `transforms: FIELD: [STEP, ...]`), run by the
/// loader threads on each sample before its batch is published (src/transform/README.md).
struct TransformStep {
  enum class Kind { kDecode, kResize, kCenterCrop, kRandomResizedCrop, kFlip, kNormalize, kLayout };
  Kind kind = Kind::kDecode;
  bool gray = false;    // decode: gray | rgb
  uint32_t height = 0;  // resize: [h, w] exactly, or (width 0) the shorter side to `height`;
  uint32_t width = 0;   // the crops: the output's [h, w]
  double scale[2] = {0.08, 1.0};             // random_resized_crop: area fraction
  double ratio[2] = {3.0 / 4.0, 4.0 / 3.0};  // random_resized_crop: aspect ratio w/h
  double p = 0.5;                            // flip: horizontal, with this probability
  std::vector<double> mean, std;             // normalize: per channel, on values in [0, 1]
  bool half = false;                         // normalize: float16, else float32
  bool chw = false;                          // layout: chw, else hwc
  bool operator==(const TransformStep&) const = default;
};

/// A field's transform: its encoded bytes in, a fixed-shape tensor out.
struct FieldTransform {
  std::string field;
  std::vector<TransformStep> steps;
  bool operator==(const FieldTransform&) const = default;
};

/// A sample whose transform fails (config `transform_errors`).
enum class TransformErrors {
  kFail,  // the batch fails, naming the shard or file and the sample
  kSkip,  // the sample becomes padding (zeros, marked), counted in stats
};

/// One config value, typed: how Python's sluice.Loader hands over its keyword arguments, with no
/// YAML text in between (a string stays a string even when it reads as YAML: "a: b", "[x]",
/// "null"). A mapping keeps its keys in order.
struct ConfigValue {
  struct Entry;  // a mapping's key and value (a struct of its own: clang 14 refuses a
                 // std::pair of the type being defined inside its own variant)
  using List = std::vector<ConfigValue>;
  using Map = std::vector<Entry>;
  std::variant<std::monostate, bool, int64_t, uint64_t, double, std::string, List, Map> value;
};
struct ConfigValue::Entry {
  std::string key;
  ConfigValue value;
};

/// Everything a Loader needs, as in the YAML config (README.md, "Config"). Plain values with
/// defaults; every key can be set from YAML, from set() with a dotted key, or directly in C++.
struct SLUICE_EXPORT LoaderOptions {
  DatasetOptions dataset;
  uint64_t batch_size = 256;
  bool drop_last = true;
  uint64_t seed = 0;
  ShuffleOptions shuffle;
  uint32_t prefetch = 4;  // batches in flight per rank; at least one per loader thread
  // Batches the consumer may hold while it asks for the next (Python: tensors still alive).
  // Holding more, next() fails at once saying so (keeping every batch, as list(loader) does,
  // is the usual cause); memory stays bounded.
  uint32_t max_batches_held = 32;
  IoOptions io;
  DeviceOptions device;
  DistributedOptions distributed;
  CacheOptions cache;
  std::vector<FieldTransform> transforms;
  TransformErrors transform_errors = TransformErrors::kFail;

  /// Parses a YAML config file. Throws Error(kConfig) naming file, line and key for unknown
  /// keys, wrong types and bad values; Error(kNotFound) when the file does not exist.
  static LoaderOptions from_yaml(const std::filesystem::path& path);
  /// Parses YAML text; `source` names it in errors; relative paths resolve against `base_dir`.
  static LoaderOptions from_yaml_string(std::string_view text, const std::string& source,
                                        const std::filesystem::path& base_dir = {});
  /// Sets one key by its dotted config name from a YAML scalar, e.g.
  /// set("shuffle.mode", "block"), set("batch_size", "512") (the CLI's --set). Same errors as
  /// from_yaml.
  void set(std::string_view key, std::string_view yaml_value);
  /// The same from a typed value: set("batch_size", {int64_t{512}}). The same setters check it
  /// and word its errors.
  void set(std::string_view key, const ConfigValue& value);

  /// The options as the sampler needs them.
  SamplerOptions sampler_options() const;
  /// rank and world size, with "env" resolved from RANK / WORLD_SIZE; throws kConfig when
  /// those variables are malformed or rank >= world_size.
  uint32_t resolved_rank() const;
  uint32_t resolved_world_size() const;
  /// The ranks on this node ($LOCAL_WORLD_SIZE, as torchrun sets it; 1 without it): node-wide
  /// defaults (loader threads, the memory cache's size) are shared among them.
  uint32_t resolved_local_world_size() const;
  /// io.threads, or under auto the cores this process may use (its CPU affinity and its cgroup's
  /// CPU quota, v1 or v2) shared among this node's ranks ($LOCAL_WORLD_SIZE, as torchrun sets
  /// it), at least 1 and at most 4, or with `transforms` (decoding is CPU-bound) every one of
  /// those cores. With `direct_io` (the loader reads with O_DIRECT through one IO thread) and
  /// no transforms, at least enough to keep io.queue_depth reads queued while one thread
  /// assembles: ceil(queue_depth / batch_size) + 1, at most 16. `why`, when given, says how it
  /// was found.
  uint32_t resolved_io_threads(std::string* why = nullptr, bool direct_io = false) const;
  /// distributed.peers, or when it is empty the peers in $SLUICE_PEERS, written
  /// "HOST:PORT=SHARDS;HOST:PORT=SHARDS" with SHARDS like "0-3,8"; throws kConfig naming the
  /// variable when it is malformed.
  std::vector<PeerOptions> resolved_peers() const;
  /// The options as YAML, in the config file's shape.
  std::string to_yaml() const;
};

SLUICE_EXPORT std::string_view to_string(ShuffleMode mode);
SLUICE_EXPORT std::string_view to_string(DatasetFormat format);
SLUICE_EXPORT std::string_view to_string(CachePolicy policy);

}  // namespace sluice
