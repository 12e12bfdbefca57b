#include "config/keys.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <filesystem>
#include <set>
#include <utility>
#include <vector>

namespace sluice::config {

namespace fs = std::filesystem;

namespace {

const std::vector<std::pair<std::string_view, Setter>>& cache_setters() {
  static const std::vector<std::pair<std::string_view, Setter>> table = {
      {"cache.dir",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         fs::path p(scalar(c, n, "cache.dir", "a path"));
         bool keep = p.is_absolute() || c.base_dir.empty();
         o.cache.dir = keep ? p : (c.base_dir / p).lexically_normal();
       }},
      {"cache.capacity",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.cache.capacity = parse_bytes(c, n, "cache.capacity");
       }},
      {"cache.memory",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.cache.memory = parse_bytes(c, n, "cache.memory");
       }},
      {"cache.fetch_size",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.cache.fetch_size = parse_bytes(c, n, "cache.fetch_size");
       }},
      {"cache.policy",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.cache.policy = parse_enum<CachePolicy>(c, n, "cache.policy", kPolicyNames);
       }},
  };
  return table;
}

const std::vector<std::pair<std::string_view, Setter>>& setters() {
  static const std::vector<std::pair<std::string_view, Setter>> table = {
      {"dataset.path",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         std::string s = scalar(c, n, "dataset.path", "a path");
         if (s.empty()) config_error(c, n, "dataset.path", "must not be empty");
         fs::path p(s);
         bool keep = p.is_absolute() || c.base_dir.empty() || s.starts_with("s3://");
         o.dataset.path = keep ? p : (c.base_dir / p).lexically_normal();
       }},
      {"dataset.format",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.dataset.format = parse_enum<DatasetFormat>(c, n, "dataset.format", kFormatNames);
       }},
      {"dataset.fields",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         if (!n.IsMap())
           config_error(c, n, "dataset.fields",
                        fmt::format("expected a mapping of field: optional | required, got {}",
                                    shown(n)));
         for (const auto& kv : n) set_optional(o, c, kv.second, kv.first.Scalar());
       }},
      {"dataset.seq_len",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.dataset.seq_len = parse_uint(c, n, "dataset.seq_len", 1, 1ull << 30);
       }},
      {"dataset.stride",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.dataset.stride = parse_uint(c, n, "dataset.stride", 1, 1ull << 30);
       }},
      {"dataset.dtype",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.dataset.token_bytes = parse_enum<uint32_t>(c, n, "dataset.dtype", kTokenDtypeNames);
       }},
      {"batch_size",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.batch_size = parse_uint(c, n, "batch_size", 1, 1u << 24);
       }},
      {"drop_last", [](LoaderOptions& o, const YAML::Node& n,
                       const Context& c) { o.drop_last = parse_bool(c, n, "drop_last"); }},
      {"seed", [](LoaderOptions& o, const YAML::Node& n,
                  const Context& c) { o.seed = parse_uint(c, n, "seed"); }},
      {"shuffle.mode",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.shuffle.mode = parse_enum<ShuffleMode>(c, n, "shuffle.mode", kShuffleNames);
       }},
      {"shuffle.block_size",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.shuffle.block_size = parse_uint(c, n, "shuffle.block_size", 1);
       }},
      {"shuffle.buffer_size",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.shuffle.buffer_size = parse_uint(c, n, "shuffle.buffer_size", 1);
       }},
      {"dataset.s3.endpoint",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.dataset.s3.endpoint = scalar(c, n, "dataset.s3.endpoint", "a URL");
       }},
      {"dataset.s3.region",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.dataset.s3.region = scalar(c, n, "dataset.s3.region", "a region name");
       }},
      {"dataset.s3.access_key_id",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.dataset.s3.access_key_id = scalar(c, n, "dataset.s3.access_key_id", "a string");
       }},
      {"dataset.s3.secret_access_key",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         auto& secret = o.dataset.s3.secret_access_key;
         secret = scalar(c, n, "dataset.s3.secret_access_key", "a string");
       }},
      {"dataset.s3.session_token",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         auto& token = o.dataset.s3.session_token;
         token = scalar(c, n, "dataset.s3.session_token", "a string");
       }},
      {"prefetch",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.prefetch = static_cast<uint32_t>(parse_uint(c, n, "prefetch", 1, 1024));
       }},
      {"max_batches_held",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.max_batches_held =
             static_cast<uint32_t>(parse_uint(c, n, "max_batches_held", 1, 1u << 20));
       }},
      {"io.engine",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.io.engine = parse_enum<IoEngineKind>(c, n, "io.engine", kEngineNames);
       }},
      {"io.queue_depth",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.io.queue_depth = static_cast<uint32_t>(parse_uint(c, n, "io.queue_depth", 1, 4096));
       }},
      {"io.direct",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         std::string s = scalar(c, n, "io.direct", "auto, true or false");
         o.io.direct = s == "auto"
                           ? DirectIo::kAuto
                           : (parse_bool(c, n, "io.direct") ? DirectIo::kOn : DirectIo::kOff);
       }},
      {"io.threads",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.io.threads = scalar(c, n, "io.threads", "auto or a count") == "auto"
                            ? 0
                            : static_cast<uint32_t>(parse_uint(c, n, "io.threads", 1, 64));
       }},
      {"io.timeout_ms",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.io.timeout_ms = static_cast<uint32_t>(parse_uint(c, n, "io.timeout_ms", 1, 86400000));
       }},
      {"io.verify", [](LoaderOptions& o, const YAML::Node& n,
                       const Context& c) { o.io.verify = parse_bool(c, n, "io.verify"); }},
      {"device", [](LoaderOptions& o, const YAML::Node& n,
                    const Context& c) { o.device = parse_device(c, n, "device"); }},
      {"distributed.peers", [](LoaderOptions& o, const YAML::Node& n,
                               const Context& c) { o.distributed.peers = parse_peers(c, n); }},
      {"distributed.listen",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.distributed.listen = scalar(c, n, "distributed.listen", "HOST:PORT");
       }},
      {"distributed.token",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.distributed.token = scalar(c, n, "distributed.token", "a string");
       }},
      {"distributed.token_file",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         fs::path p(scalar(c, n, "distributed.token_file", "a path"));
         o.distributed.token_file =
             p.is_absolute() || c.base_dir.empty() ? p : (c.base_dir / p).lexically_normal();
       }},
      {"distributed.no_token",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.distributed.no_token = parse_bool(c, n, "distributed.no_token");
       }},
      {"distributed.peer_timeout_ms",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.distributed.peer_timeout_ms =
             static_cast<uint32_t>(parse_uint(c, n, "distributed.peer_timeout_ms", 1, 3600000));
       }},
      {"distributed.rank",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.distributed.rank = parse_rank(c, n, "distributed.rank", 0);
       }},
      {"transform_errors",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) {
         o.transform_errors =
             parse_enum<TransformErrors>(c, n, "transform_errors", kTransformErrorNames);
       }},
      {"transforms",
       [](LoaderOptions& o, const YAML::Node& n, const Context& c) { parse_transforms(o, c, n); }},
      {"distributed.world_size",
       [](LoaderOptions& o, const YAML::Node& n,
          const Context&
              c) { o.distributed.world_size = parse_rank(c, n, "distributed.world_size", 1); }},
  };
  // The node cache's keys (cache.*), in a table of their own.
  static const auto all = [] {
    auto t = table;
    t.insert(t.end(), cache_setters().begin(), cache_setters().end());
    return t;
  }();
  return all;
}

}  // namespace

const Setter* find_setter(std::string_view key) {
  for (const auto& [name, setter] : setters())
    if (name == key) return &setter;
  return nullptr;
}

bool is_section(std::string_view key) {
  for (const auto& [name, _] : setters())
    if (name.starts_with(key) && name.size() > key.size() && name[key.size()] == '.') return true;
  return false;
}

std::string section_expected(const std::string& section, const YAML::Node& got) {
  std::vector<std::string> keys;
  for (const auto& [name, _] : setters())
    if (name.starts_with(section) && name.size() > section.size() && name[section.size()] == '.')
      keys.emplace_back(name.substr(section.size() + 1));
  return fmt::format("expected a mapping of {} (e.g. {}: {{{}: ...}}), got {}",
                     fmt::join(keys, ", "), section, keys.front(), shown(got));
}

void apply_map(LoaderOptions& o, const YAML::Node& map, const std::string& prefix,
               const Context& ctx) {
  std::set<std::string> seen;
  for (const auto& kv : map) {
    const YAML::Node& key_node = kv.first;
    if (!key_node.IsScalar()) config_error(ctx, key_node, prefix + "?", "keys must be names");
    std::string key = prefix + key_node.Scalar();
    if (!seen.insert(key).second) config_error(ctx, key_node, key, "duplicate key");
    if (kv.second.IsMap() && is_section(key)) {
      apply_map(o, kv.second, key + ".", ctx);
    } else if (const Setter* s = find_setter(key)) {
      (*s)(o, kv.second, ctx);
    } else if (key == "dataset" && kv.second.IsScalar()) {  // dataset: PATH, a shorthand
      (*find_setter("dataset.path"))(o, kv.second, ctx);
    } else if (is_section(key)) {
      config_error(ctx, kv.second, key,
                   fmt::format("expected a mapping, got {}", shown(kv.second)));
    } else {
      config_error(ctx, key_node, key, "unknown key");
    }
  }
}

}  // namespace sluice::config
