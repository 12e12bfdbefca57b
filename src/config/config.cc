#include <sluice/options.h>

#include "common/errors.h"
#include "common/host.h"
#include "config/keys.h"
#include "config/parse.h"

#include <fmt/format.h>

#include <yaml-cpp/depthguard.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

namespace sluice {

namespace fs = std::filesystem;

LoaderOptions LoaderOptions::from_yaml_string(std::string_view text, const std::string& source,
                                              const fs::path& base_dir) {
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
  } catch (const YAML::DeepRecursion& e) {
    detail::fail(ErrorCode::kConfig, "{}:{}:{}: invalid YAML: nested too deeply", source,
                 e.mark.line + 1, e.mark.column + 1);
  } catch (const YAML::Exception& e) {
    detail::fail(ErrorCode::kConfig, "{}:{}:{}: invalid YAML: {}", source, e.mark.line + 1,
                 e.mark.column + 1, e.msg);
  }
  config::Context ctx{source, base_dir};
  LoaderOptions o;
  if (root.IsNull()) return o;
  if (!root.IsMap())
    detail::fail(ErrorCode::kConfig, "{}: expected a mapping of config keys at the top level",
                 source);
  config::apply_map(o, root, "", ctx);
  return o;
}

LoaderOptions LoaderOptions::from_yaml(const fs::path& path) {
  if (std::error_code ec; fs::is_directory(path, ec))
    detail::fail(ErrorCode::kConfig,
                 "{}: a directory, not a config file (for a dataset there, give a config with "
                 "dataset.path, or in Python sluice.Loader({{\"dataset\": PATH}}))",
                 path.string());
  std::ifstream in(path);
  if (!in) {
    std::error_code ec;
    if (!fs::exists(path, ec))
      throw Error(ErrorCode::kNotFound, fmt::format("{}: config file not found", path.string()),
                  ENOENT);
    detail::fail_errno(errno, "read config " + path.string());
  }
  std::stringstream text;
  text << in.rdbuf();
  return from_yaml_string(text.str(), path.string(), fs::absolute(path).parent_path());
}

namespace {

// A typed value as the node its key's setter reads: scalars as their text, so that the setters
// see what the same value written in YAML gives them, strings never parsed as YAML.
YAML::Node to_node(const ConfigValue& v) {
  struct Visit {
    YAML::Node operator()(std::monostate) const { return YAML::Node(YAML::NodeType::Null); }
    YAML::Node operator()(bool b) const { return YAML::Node(b ? "true" : "false"); }
    YAML::Node operator()(int64_t i) const { return YAML::Node(fmt::format("{}", i)); }
    YAML::Node operator()(uint64_t u) const { return YAML::Node(fmt::format("{}", u)); }
    YAML::Node operator()(double d) const { return YAML::Node(fmt::format("{}", d)); }
    YAML::Node operator()(const std::string& s) const { return YAML::Node(s); }
    YAML::Node operator()(const ConfigValue::List& list) const {
      YAML::Node n(YAML::NodeType::Sequence);
      for (const auto& item : list) n.push_back(to_node(item));
      return n;
    }
    YAML::Node operator()(const ConfigValue::Map& map) const {
      YAML::Node n(YAML::NodeType::Map);
      for (const auto& [key, item] : map) n[key] = to_node(item);
      return n;
    }
  };
  return std::visit(Visit{}, v.value);
}

void set_node(LoaderOptions& o, std::string_view key, const YAML::Node& node) {
  const config::Setter* s = config::find_setter(key);
  const std::string overrides = "override";
  const fs::path cwd = fs::current_path();
  const config::Context ctx{overrides, cwd, false};
  if (!s && key.starts_with("dataset.fields.")) {  // dataset.fields.json=optional
    config::set_optional(o, ctx, node,
                         std::string(key.substr(std::string_view("dataset.fields.").size())));
    return;
  }
  if (!s && key.starts_with("transforms.")) {  // one field's steps: transforms.jpg=[...]
    config::set_transform(
        o, config::parse_field_transform(
               ctx, node, std::string(key.substr(std::string_view("transforms.").size()))));
    return;
  }
  if (!s && key == "dataset" && node.IsScalar())
    s = config::find_setter("dataset.path");  // shorthand
  if (!s && config::is_section(key))
    detail::fail(ErrorCode::kConfig, "{}: {}", key,
                 config::section_expected(std::string(key), node));
  if (!s) detail::fail(ErrorCode::kConfig, "{}: unknown key", key);
  (*s)(o, node, ctx);
}

}  // namespace

void LoaderOptions::set(std::string_view key, std::string_view yaml_value) {
  YAML::Node node;
  try {
    node = YAML::Load(std::string(yaml_value));
  } catch (const YAML::Exception& e) {
    detail::fail(ErrorCode::kConfig, "{}: invalid value \"{}\": {}", key, yaml_value, e.msg);
  }
  set_node(*this, key, node);
}

void LoaderOptions::set(std::string_view key, const ConfigValue& value) {
  set_node(*this, key, to_node(value));
}

SamplerOptions LoaderOptions::sampler_options() const {
  return {shuffle, seed, batch_size, drop_last};
}

std::vector<PeerOptions> LoaderOptions::resolved_peers() const {
  if (!distributed.peers.empty()) return distributed.peers;
  const char* env = std::getenv("SLUICE_PEERS");
  if (!env || !*env) return {};
  // The same grammar as the YAML, written as a YAML list so that one parser checks both.
  std::string yaml = "[";
  std::string_view rest(env);
  while (!rest.empty()) {
    size_t end = rest.find(';');
    std::string_view entry = rest.substr(0, end);
    rest = end == std::string_view::npos ? std::string_view() : rest.substr(end + 1);
    if (entry.empty()) continue;
    size_t eq = entry.rfind('=');
    if (eq == std::string_view::npos)
      detail::fail(ErrorCode::kConfig,
                   "environment variable SLUICE_PEERS: \"{}\": expected HOST:PORT=SHARDS", entry);
    yaml += fmt::format("{{address: \"{}\", shards: [", entry.substr(0, eq));
    std::string_view shards = entry.substr(eq + 1);
    while (!shards.empty()) {
      size_t comma = shards.find(',');
      yaml += fmt::format("\"{}\",", shards.substr(0, comma));
      shards = comma == std::string_view::npos ? std::string_view() : shards.substr(comma + 1);
    }
    yaml += "]},";
  }
  yaml += "]";
  std::string source = "environment variable SLUICE_PEERS";
  fs::path none;
  config::Context ctx{source, none, false};  // one line: its number says nothing
  YAML::Node node;
  try {
    node = YAML::Load(yaml);
  } catch (const YAML::Exception&) {
    detail::fail(ErrorCode::kConfig, "{}: cannot parse \"{}\"", source, env);
  }
  return config::parse_peers(ctx, node);
}

uint32_t LoaderOptions::resolved_world_size() const {
  if (distributed.world_size) return *distributed.world_size;
  return detail::env_uint("WORLD_SIZE", 1).value_or(1);
}

uint32_t LoaderOptions::resolved_local_world_size() const {
  return detail::env_uint("LOCAL_WORLD_SIZE", 1).value_or(1);
}

uint32_t LoaderOptions::resolved_rank() const {
  uint32_t rank = distributed.rank ? *distributed.rank : detail::env_uint("RANK", 0).value_or(0);
  uint32_t world = resolved_world_size();
  if (rank >= world)
    detail::fail(ErrorCode::kConfig, "distributed.rank: rank {} is not below world_size {}", rank,
                 world);
  return rank;
}

uint32_t LoaderOptions::resolved_io_threads(std::string* why, bool direct_io) const {
  if (io.threads) {
    if (why) *why = "io.threads";
    return io.threads;
  }
  // Reading: past 4 threads, more did not read faster (RESULTS.md, issue 19). Decoding is CPU
  // work that scales with threads: 4 of 16 cores gave a quarter of the images (issue 34).
  const uint32_t kMost = transforms.empty() ? 4 : 64;
  constexpr uint32_t kMostWaiting = 16;
  const auto [cores, how] = detail::cpu_room();
  const uint32_t ranks = resolved_local_world_size();
  uint32_t threads = std::clamp<uint32_t>(cores / ranks, 1, kMost);
  std::string rule = transforms.empty() ? "at most 4 for reading" : "one per core for transforms";
  // Under direct I/O the threads mostly wait on the one IO thread, and the device's queue stays
  // full only while the others' reads cover it as one thread assembles its batch: 2 threads of
  // 64-read batches kept 72 of 128 reads in flight on a RAM-backed device (issue 33).
  const uint64_t batch = std::max<uint64_t>(batch_size, 1);
  const auto cover = static_cast<uint32_t>(
      std::min<uint64_t>((io.queue_depth + batch - 1) / batch + 1, kMostWaiting));
  if (direct_io && transforms.empty() && cover > threads) {
    threads = cover;
    rule = fmt::format(
        "under direct I/O enough to keep io.queue_depth {} reads queued: "
        "{} batches of {} and one more, at most {}",
        io.queue_depth, threads - 1, batch_size, kMostWaiting);
  }
  if (why)
    *why =
        fmt::format("io.threads: auto: {} loader threads ({}{}; {})", threads, how,
                    ranks > 1 ? fmt::format(" shared by {} ranks on this node", ranks) : "", rule);
  return threads;
}

std::string read_token_file(const std::filesystem::path& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw Error(ErrorCode::kConfig, path.string() + ": token file is a directory");
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line)) {
    if (in.is_open() && in.eof())
      throw Error(ErrorCode::kConfig, path.string() + ": token file is empty");
    throw Error(ErrorCode::kConfig, fmt::format("{}: cannot read the token file: {}", path.string(),
                                                std::strerror(errno)));
  }
  const auto first = line.find_first_not_of(" \t\r");
  const auto last = line.find_last_not_of(" \t\r");
  if (first == std::string::npos)
    throw Error(ErrorCode::kConfig,
                path.string() + ": token file holds no token on its first line");
  return line.substr(first, last - first + 1);
}

std::string DistributedOptions::resolved_token() const {
  if (!token.empty()) return token;
  if (!token_file.empty()) return read_token_file(token_file);
  const char* env = std::getenv("SLUICE_TOKEN");
  return env && !no_token ? env : "";
}

std::string_view to_string(ShuffleMode mode) {
  return config::name_of<ShuffleMode>(config::kShuffleNames, mode);
}

std::string_view to_string(DatasetFormat format) {
  return config::name_of<DatasetFormat>(config::kFormatNames, format);
}

std::string_view to_string(CachePolicy policy) {
  return config::name_of<CachePolicy>(config::kPolicyNames, policy);
}

std::string LoaderOptions::to_yaml() const {
  const std::string engine(config::name_of<IoEngineKind>(config::kEngineNames, io.engine));
  auto direct = io.direct == DirectIo::kAuto ? "auto"
                : io.direct == DirectIo::kOn ? "true"
                                             : "false";
  std::string dev = device.kind == DeviceKind::kCpu      ? "cpu"
                    : device.kind == DeviceKind::kPinned ? "pinned"
                                                         : fmt::format("cuda:{}", device.index);
  auto opt = [](const std::optional<uint32_t>& v) { return v ? std::to_string(*v) : "env"; };
  YAML::Emitter out;
  out << YAML::BeginMap;
  out << YAML::Key << "dataset" << YAML::Value << YAML::Flow << YAML::BeginMap << YAML::Key
      << "path" << YAML::Value << dataset.path.string() << YAML::Key << "format" << YAML::Value
      << std::string(to_string(dataset.format));
  if (dataset.seq_len)
    out << YAML::Key << "seq_len" << YAML::Value << dataset.seq_len << YAML::Key << "stride"
        << YAML::Value << (dataset.stride ? dataset.stride : dataset.seq_len) << YAML::Key
        << "dtype" << YAML::Value
        << std::string(config::name_of<uint32_t>(config::kTokenDtypeNames, dataset.token_bytes));
  if (!dataset.optional_fields.empty()) {
    out << YAML::Key << "fields" << YAML::Value << YAML::Flow << YAML::BeginMap;
    for (const auto& f : dataset.optional_fields)
      out << YAML::Key << f << YAML::Value << "optional";
    out << YAML::EndMap;
  }
  // Credentials are secrets: never echoed; where to find the store is not.
  if (!dataset.s3.endpoint.empty() || !dataset.s3.region.empty()) {
    out << YAML::Key << "s3" << YAML::Value << YAML::Flow << YAML::BeginMap;
    if (!dataset.s3.endpoint.empty())
      out << YAML::Key << "endpoint" << YAML::Value << dataset.s3.endpoint;
    if (!dataset.s3.region.empty())
      out << YAML::Key << "region" << YAML::Value << dataset.s3.region;
    out << YAML::EndMap;
  }
  out << YAML::EndMap;
  out << YAML::Key << "batch_size" << YAML::Value << batch_size;
  out << YAML::Key << "drop_last" << YAML::Value << drop_last;
  out << YAML::Key << "seed" << YAML::Value << seed;
  out << YAML::Key << "shuffle" << YAML::Value << YAML::Flow << YAML::BeginMap << YAML::Key
      << "mode" << YAML::Value << std::string(to_string(shuffle.mode)) << YAML::Key << "block_size"
      << YAML::Value << shuffle.block_size << YAML::Key << "buffer_size" << YAML::Value
      << shuffle.buffer_size << YAML::EndMap;
  out << YAML::Key << "prefetch" << YAML::Value << prefetch;
  out << YAML::Key << "max_batches_held" << YAML::Value << max_batches_held;
  out << YAML::Key << "io" << YAML::Value << YAML::Flow << YAML::BeginMap << YAML::Key << "engine"
      << YAML::Value << engine << YAML::Key << "queue_depth" << YAML::Value << io.queue_depth
      << YAML::Key << "direct" << YAML::Value << direct << YAML::Key << "threads" << YAML::Value
      << (io.threads ? std::to_string(io.threads) : std::string("auto")) << YAML::Key
      << "timeout_ms" << YAML::Value << io.timeout_ms << YAML::Key << "verify" << YAML::Value
      << io.verify << YAML::EndMap;
  out << YAML::Key << "device" << YAML::Value << dev;
  if (!cache.dir.empty() || cache != CacheOptions{}) {
    out << YAML::Key << "cache" << YAML::Value << YAML::Flow << YAML::BeginMap;
    if (!cache.dir.empty()) out << YAML::Key << "dir" << YAML::Value << cache.dir.string();
    out << YAML::Key << "capacity" << YAML::Value << cache.capacity << YAML::Key << "memory"
        << YAML::Value << cache.memory << YAML::Key << "policy" << YAML::Value
        << std::string(to_string(cache.policy)) << YAML::Key << "fetch_size" << YAML::Value
        << cache.fetch_size << YAML::EndMap;
  }
  if (!transforms.empty()) {
    out << YAML::Key << "transforms" << YAML::Value << YAML::BeginMap;
    using K = TransformStep::Kind;
    for (const auto& t : transforms) {
      out << YAML::Key << t.field << YAML::Value << YAML::BeginSeq;
      for (const auto& s : t.steps) {
        out << YAML::Flow << YAML::BeginMap << YAML::Key
            << std::string(config::name_of<K>(config::kStepNames, s.kind)) << YAML::Value;
        auto size = [&] {
          if (s.width == 0 || s.width == s.height)
            out << s.height;
          else
            out << YAML::Flow << YAML::BeginSeq << s.height << s.width << YAML::EndSeq;
        };
        switch (s.kind) {
          case K::kDecode:
            out << (s.gray ? "gray" : "rgb");
            break;
          case K::kResize:
            if (s.width == 0)
              out << s.height;
            else
              out << YAML::Flow << YAML::BeginSeq << s.height << s.width << YAML::EndSeq;
            break;
          case K::kCenterCrop:
            size();
            break;
          case K::kRandomResizedCrop:
            out << YAML::Flow << YAML::BeginMap << YAML::Key << "size" << YAML::Value;
            out << YAML::Flow << YAML::BeginSeq << s.height << s.width << YAML::EndSeq;
            out << YAML::Key << "scale" << YAML::Value << YAML::Flow << YAML::BeginSeq << s.scale[0]
                << s.scale[1] << YAML::EndSeq << YAML::Key << "ratio" << YAML::Value << YAML::Flow
                << YAML::BeginSeq << s.ratio[0] << s.ratio[1] << YAML::EndSeq << YAML::EndMap;
            break;
          case K::kFlip:
            out << s.p;
            break;
          case K::kNormalize:
            out << YAML::Flow << YAML::BeginMap << YAML::Key << "mean" << YAML::Value << YAML::Flow
                << s.mean << YAML::Key << "std" << YAML::Value << YAML::Flow << s.std << YAML::Key
                << "dtype" << YAML::Value << (s.half ? "float16" : "float32") << YAML::EndMap;
            break;
          case K::kLayout:
            out << (s.chw ? "chw" : "hwc");
            break;
        }
        out << YAML::EndMap;
      }
      out << YAML::EndSeq;
    }
    out << YAML::EndMap;
    out << YAML::Key << "transform_errors" << YAML::Value
        << std::string(
               config::name_of<TransformErrors>(config::kTransformErrorNames, transform_errors));
  }
  out << YAML::Key << "distributed" << YAML::Value << YAML::BeginMap << YAML::Key << "rank"
      << YAML::Value << opt(distributed.rank) << YAML::Key << "world_size" << YAML::Value
      << opt(distributed.world_size);
  if (!distributed.peers.empty()) {
    out << YAML::Key << "peers" << YAML::Value << YAML::BeginSeq;
    for (const auto& p : distributed.peers)
      out << YAML::Flow << YAML::BeginMap << YAML::Key << "address" << YAML::Value << p.address
          << YAML::Key << "shards" << YAML::Value << YAML::Flow << p.shards << YAML::EndMap;
    out << YAML::EndSeq;
  }
  if (!distributed.listen.empty())
    out << YAML::Key << "listen" << YAML::Value << distributed.listen;
  // The token is a secret: never echoed (its file's path is not).
  if (!distributed.token_file.empty())
    out << YAML::Key << "token_file" << YAML::Value << distributed.token_file.string();
  if (distributed.no_token) out << YAML::Key << "no_token" << YAML::Value << true;
  out << YAML::Key << "peer_timeout_ms" << YAML::Value << distributed.peer_timeout_ms
      << YAML::EndMap;
  out << YAML::EndMap;
  return out.c_str();
}

}  // namespace sluice
