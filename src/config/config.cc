#include <sluice/options.h>

#include "common/errors.h"
#include "common/host.h"

#include <fmt/ranges.h>

#include <yaml-cpp/depthguard.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>
#include <span>
#include <sstream>

namespace sluice {

namespace fs = std::filesystem;

namespace {

// Where a value came from, for errors: "train.yaml:7: shuffle.mode: ...".
struct Context {
  const std::string& source;
  const fs::path& base_dir;
};

[[noreturn]] void config_error(const Context& ctx, const YAML::Node& node, std::string_view key,
                               const std::string& what) {
  std::string where = ctx.source;
  if (node.Mark().line >= 0) where += fmt::format(":{}", node.Mark().line + 1);
  throw Error(ErrorCode::kConfig, fmt::format("{}: {}: {}", where, key, what));
}

std::string shown(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return "nothing";
  if (node.IsScalar()) return fmt::format("\"{}\"", node.Scalar());
  return node.IsMap() ? "a mapping" : "a list";
}

std::string scalar(const Context& ctx, const YAML::Node& node, std::string_view key,
                   std::string_view expected) {
  if (!node.IsScalar())
    config_error(ctx, node, key, fmt::format("expected {}, got {}", expected, shown(node)));
  return node.Scalar();
}

uint64_t parse_uint(const Context& ctx, const YAML::Node& node, std::string_view key,
                    uint64_t min = 0, uint64_t max = UINT64_MAX) {
  std::string expected = min > 0 ? "a positive integer" : "a non-negative integer";
  std::string s = scalar(ctx, node, key, expected);
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty())
    config_error(ctx, node, key, fmt::format("expected {}, got \"{}\"", expected, s));
  if (value < min || value > max)
    config_error(ctx, node, key, fmt::format("{} is out of range [{}, {}]", value, min, max));
  return value;
}

bool parse_bool(const Context& ctx, const YAML::Node& node, std::string_view key) {
  std::string s = scalar(ctx, node, key, "true or false");
  bool value;
  if (!YAML::convert<bool>::decode(node, value))
    config_error(ctx, node, key, fmt::format("expected true or false, got \"{}\"", s));
  return value;
}

// A byte count: an integer, or with a K, M, G or T suffix (powers of 1024; "200G", "4.5T").
uint64_t parse_bytes(const Context& ctx, const YAML::Node& node, std::string_view key) {
  std::string s = scalar(ctx, node, key, "a size in bytes (e.g. 200G)");
  double value = 0;
  const char* end = s.data() + s.size();
  auto [at, ec] = std::from_chars(s.data(), end, value);
  uint64_t unit = 1;
  if (at + 1 == end || (at + 2 == end && (at[1] == 'B' || at[1] == 'b'))) {
    constexpr std::string_view kUnits = "KMGT";  // 2^10, 2^20, 2^30, 2^40
    size_t k = kUnits.find(static_cast<char>(std::toupper(static_cast<unsigned char>(*at))));
    unit = k == std::string_view::npos ? 0 : 1ull << (10 * (k + 1));
    at = end;
  }
  if (ec != std::errc() || at != end || unit == 0 || value < 0 ||
      value * static_cast<double>(unit) > 1e18)
    config_error(
        ctx, node, key,
        fmt::format("expected a size in bytes, optionally with K, M, G or T, got \"{}\"", s));
  return static_cast<uint64_t>(value * static_cast<double>(unit));
}

// Each enum's config spellings, in one table that both parsing and printing use.
template <typename E>
using Names = std::span<const std::pair<std::string_view, E>>;
constexpr std::pair<std::string_view, DatasetFormat> kFormatNames[] = {
    {"auto", DatasetFormat::kAuto},   {"shards", DatasetFormat::kShards},
    {"tar", DatasetFormat::kTar},     {"tokens", DatasetFormat::kTokens},
    {"files", DatasetFormat::kFiles}, {"npy", DatasetFormat::kNpy}};
constexpr std::pair<std::string_view, ShuffleMode> kShuffleNames[] = {
    {"global", ShuffleMode::kGlobal},
    {"block", ShuffleMode::kBlock},
    {"shard", ShuffleMode::kShard},
    {"none", ShuffleMode::kNone}};
constexpr std::pair<std::string_view, IoEngineKind> kEngineNames[] = {
    {"auto", IoEngineKind::kAuto},
    {"uring", IoEngineKind::kUring},
    {"threads", IoEngineKind::kThreads}};
constexpr std::pair<std::string_view, CachePolicy> kPolicyNames[] = {
    {"clairvoyant", CachePolicy::kClairvoyant}, {"lru", CachePolicy::kLru}};
constexpr std::pair<std::string_view, TransformErrors> kTransformErrorNames[] = {
    {"fail", TransformErrors::kFail}, {"skip", TransformErrors::kSkip}};
constexpr std::pair<std::string_view, TransformStep::Kind> kStepNames[] = {
    {"decode", TransformStep::Kind::kDecode},
    {"resize", TransformStep::Kind::kResize},
    {"center_crop", TransformStep::Kind::kCenterCrop},
    {"random_resized_crop", TransformStep::Kind::kRandomResizedCrop},
    {"flip", TransformStep::Kind::kFlip},
    {"normalize", TransformStep::Kind::kNormalize},
    {"layout", TransformStep::Kind::kLayout}};
constexpr std::pair<std::string_view, uint32_t> kTokenDtypeNames[] = {{"uint16", 2u},
                                                                      {"uint32", 4u}};

template <typename E>
std::string_view name_of(Names<E> names, E value) {
  for (const auto& [name, v] : names)
    if (v == value) return name;
  return "?";
}

template <typename E>
E parse_enum(const Context& ctx, const YAML::Node& node, std::string_view key, Names<E> values) {
  std::string names;
  for (const auto& [name, _] : values) names += (names.empty() ? "" : ", ") + std::string(name);
  std::string s = scalar(ctx, node, key, "one of " + names);
  for (const auto& [name, value] : values)
    if (s == name) return value;
  config_error(ctx, node, key, fmt::format("unknown value \"{}\" (expected {})", s, names));
}

std::optional<uint32_t> parse_rank(const Context& ctx, const YAML::Node& node, std::string_view key,
                                   uint64_t min) {
  if (node.IsScalar() && node.Scalar() == "env") return std::nullopt;
  if (!node.IsScalar() || node.Scalar().empty() ||
      !std::isdigit(static_cast<unsigned char>(node.Scalar()[0])))
    config_error(ctx, node, key, fmt::format("expected env or an integer, got {}", shown(node)));
  return static_cast<uint32_t>(parse_uint(ctx, node, key, min, UINT32_MAX));
}

DeviceOptions parse_device(const Context& ctx, const YAML::Node& node, std::string_view key) {
  std::string s = scalar(ctx, node, key, "cpu, pinned or cuda:N");
  if (s == "cpu") return {DeviceKind::kCpu, 0};
  if (s == "pinned") return {DeviceKind::kPinned, 0};
  if (s == "cuda") return {DeviceKind::kCuda, 0};
  if (s.starts_with("cuda:")) {
    int index = -1;
    auto [end, ec] = std::from_chars(s.data() + 5, s.data() + s.size(), index);
    if (ec == std::errc() && end == s.data() + s.size() && index >= 0 && s.size() > 5)
      return {DeviceKind::kCuda, index};
  }
  config_error(ctx, node, key,
               fmt::format("unknown value \"{}\" (expected cpu, pinned, cuda:N)", s));
}

// distributed.peers: a list of {address: HOST:PORT, shards: [0, 1, "4-7", ...]}.
std::vector<PeerOptions> parse_peers(const Context& ctx, const YAML::Node& node) {
  const std::string key = "distributed.peers";
  if (!node.IsSequence())
    config_error(ctx, node, key, fmt::format("expected a list of peers, got {}", shown(node)));
  std::vector<PeerOptions> peers;
  for (size_t i = 0; i < node.size(); ++i) {
    const YAML::Node& p = node[i];
    std::string at = fmt::format("{}[{}]", key, i);
    if (!p.IsMap())
      config_error(ctx, p, at,
                   fmt::format("expected {{address: HOST:PORT, shards: [...]}}, got {}", shown(p)));
    PeerOptions peer;
    for (const auto& kv : p) {
      std::string name = kv.first.IsScalar() ? kv.first.Scalar() : "?";
      if (name == "address") {
        peer.address = scalar(ctx, kv.second, at + ".address", "HOST:PORT");
      } else if (name == "shards") {
        const YAML::Node& list = kv.second;
        if (!list.IsSequence())
          config_error(
              ctx, list, at + ".shards",
              fmt::format("expected a list of shard numbers or ranges, got {}", shown(list)));
        for (const auto& item : list) {
          std::string s = scalar(ctx, item, at + ".shards", "a shard number or a range A-B");
          uint64_t lo = 0, hi = 0;
          size_t dash = s.find('-');
          auto num = [&](std::string_view t, uint64_t& v) {
            auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
            return ec == std::errc() && end == t.data() + t.size() && !t.empty();
          };
          bool ok = dash == std::string::npos
                        ? num(s, lo) && (hi = lo, true)
                        : num(std::string_view(s).substr(0, dash), lo) &&
                              num(std::string_view(s).substr(dash + 1), hi) && lo <= hi;
          if (!ok || hi > UINT32_MAX || hi - lo > (1u << 20))
            config_error(ctx, item, at + ".shards",
                         fmt::format("expected a shard number or a range A-B, got \"{}\"", s));
          for (uint64_t k = lo; k <= hi; ++k) peer.shards.push_back(static_cast<uint32_t>(k));
        }
      } else {
        config_error(ctx, kv.first, at + "." + name, "unknown key (expected address, shards)");
      }
    }
    if (peer.address.empty()) config_error(ctx, p, at + ".address", "missing");
    peers.push_back(std::move(peer));
  }
  return peers;
}

bool second_of(const Context& ctx, const YAML::Node& node, const std::string& key,
               std::string_view a, std::string_view b);

// dataset.fields.NAME: optional | required.
void set_optional(LoaderOptions& o, const Context& ctx, const YAML::Node& node,
                  const std::string& field) {
  auto& list = o.dataset.optional_fields;
  std::erase(list, field);
  if (!second_of(ctx, node, "dataset.fields." + field, "required", "optional")) return;
  list.push_back(field);
}

// --- transforms: FIELD: [STEP, ...] ------------------------------------------------------

double parse_double(const Context& ctx, const YAML::Node& node, std::string_view key, double min,
                    double max) {
  std::string s = scalar(ctx, node, key, "a number");
  double value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty() || !(value >= min) ||
      !(value <= max))
    config_error(ctx, node, key,
                 fmt::format("expected a number in [{}, {}], got \"{}\"", min, max, s));
  return value;
}

std::vector<double> parse_numbers(const Context& ctx, const YAML::Node& node,
                                  const std::string& key, double min, double max) {
  if (!node.IsSequence() || node.size() == 0)
    config_error(ctx, node, key, fmt::format("expected a list of numbers, got {}", shown(node)));
  std::vector<double> out;
  for (size_t i = 0; i < node.size(); ++i)
    out.push_back(parse_double(ctx, node[i], fmt::format("{}[{}]", key, i), min, max));
  return out;
}

// A side (224) or [height, width].
void parse_size(const Context& ctx, const YAML::Node& node, const std::string& key,
                TransformStep& s) {
  constexpr uint64_t kMax = 16384;
  if (node.IsSequence()) {
    if (node.size() != 2) config_error(ctx, node, key, "expected a size (224) or [height, width]");
    s.height = static_cast<uint32_t>(parse_uint(ctx, node[0], key + "[0]", 1, kMax));
    s.width = static_cast<uint32_t>(parse_uint(ctx, node[1], key + "[1]", 1, kMax));
  } else {
    s.height = s.width = static_cast<uint32_t>(parse_uint(ctx, node, key, 1, kMax));
  }
}

void parse_range(const Context& ctx, const YAML::Node& node, const std::string& key, double (&r)[2],
                 double min, double max) {
  auto v = parse_numbers(ctx, node, key, min, max);
  if (v.size() != 2 || v[0] > v[1])
    config_error(ctx, node, key, "expected [low, high] with low <= high");
  r[0] = v[0];
  r[1] = v[1];
}

// One of two words: false for `a`, true for `b`.
bool second_of(const Context& ctx, const YAML::Node& node, const std::string& key,
               std::string_view a, std::string_view b) {
  std::string v = scalar(ctx, node, key, fmt::format("{} or {}", a, b));
  if (v != a && v != b)
    config_error(ctx, node, key, fmt::format("unknown value \"{}\" (expected {}, {})", v, a, b));
  return v == b;
}

TransformStep parse_step(const Context& ctx, const YAML::Node& node, const std::string& key) {
  if (!node.IsMap() || node.size() != 1)
    config_error(
        ctx, node, key,
        fmt::format("expected one step as a one-key mapping (e.g. {{decode: rgb}}), got {}",
                    shown(node)));
  const auto kv = *node.begin();
  TransformStep s;
  s.kind = parse_enum<TransformStep::Kind>(ctx, kv.first, key, kStepNames);
  const YAML::Node& v = kv.second;
  const std::string at = key + "." + kv.first.Scalar();
  using K = TransformStep::Kind;
  switch (s.kind) {
    case K::kDecode:
      s.gray = second_of(ctx, v, at, "rgb", "gray");
      break;
    case K::kResize:
      parse_size(ctx, v, at, s);
      if (!v.IsSequence()) s.width = 0;  // the shorter side
      break;
    case K::kCenterCrop:
      parse_size(ctx, v, at, s);
      break;
    case K::kRandomResizedCrop:
      if (!v.IsMap()) {
        parse_size(ctx, v, at, s);
        break;
      }
      for (const auto& e : v) {
        const std::string k = e.first.Scalar();
        if (k == "size")
          parse_size(ctx, e.second, at + ".size", s);
        else if (k == "scale")
          parse_range(ctx, e.second, at + ".scale", s.scale, 1e-6, 1.0);
        else if (k == "ratio")
          parse_range(ctx, e.second, at + ".ratio", s.ratio, 1e-3, 1e3);
        else
          config_error(ctx, e.first, at + "." + k, "unknown key (expected size, scale, ratio)");
      }
      if (s.height == 0) config_error(ctx, v, at + ".size", "required");
      break;
    case K::kFlip:
      s.p = parse_double(ctx, v, at, 0.0, 1.0);
      break;
    case K::kNormalize: {
      if (!v.IsMap()) config_error(ctx, v, at, "expected a mapping of mean, std, dtype");
      for (const auto& e : v) {
        const std::string k = e.first.Scalar();
        if (k == "mean") {
          s.mean = parse_numbers(ctx, e.second, at + ".mean", -1e6, 1e6);
        } else if (k == "std") {
          s.std = parse_numbers(ctx, e.second, at + ".std", 1e-12, 1e6);
        } else if (k == "dtype") {
          s.half = second_of(ctx, e.second, at + ".dtype", "float32", "float16");
        } else {
          config_error(ctx, e.first, at + "." + k, "unknown key (expected mean, std, dtype)");
        }
      }
      if (s.mean.empty() || s.std.empty() || s.mean.size() != s.std.size())
        config_error(ctx, v, at, "mean and std: required, one number per channel each");
      break;
    }
    case K::kLayout:
      s.chw = second_of(ctx, v, at, "hwc", "chw");
      break;
  }
  return s;
}

// A field's steps, checked as a whole: decode first, a fixed size at the end of the geometry
// (a crop, or a resize to [h, w]), then normalize and layout at most once each, in that order.
FieldTransform parse_field_transform(const Context& ctx, const YAML::Node& node,
                                     const std::string& field) {
  const std::string key = "transforms." + field;
  if (field.empty()) config_error(ctx, node, key, "a field name is required");
  if (!node.IsSequence() || node.size() == 0)
    config_error(ctx, node, key,
                 fmt::format("expected a list of steps (e.g. [{{decode: rgb}}, {{center_crop: "
                             "224}}]), got {}",
                             shown(node)));
  FieldTransform t{field, {}};
  using K = TransformStep::Kind;
  bool fixed = false;
  int stage = 0;  // 0 geometry, 1 after normalize, 2 after layout
  uint32_t channels = 3;
  for (size_t i = 0; i < node.size(); ++i) {
    const std::string at = fmt::format("{}[{}]", key, i);
    TransformStep s = parse_step(ctx, node[i], at);
    if ((i == 0) != (s.kind == K::kDecode))
      config_error(ctx, node[i], at, "decode comes first, once");
    if (s.kind == K::kDecode) channels = s.gray ? 1 : 3;
    const bool geometry = s.kind == K::kResize || s.kind == K::kCenterCrop ||
                          s.kind == K::kRandomResizedCrop || s.kind == K::kFlip;
    if (geometry && stage > 0) config_error(ctx, node[i], at, "comes after normalize or layout");
    if (s.kind == K::kNormalize) {
      if (stage > 0) config_error(ctx, node[i], at, "normalize comes once, before layout");
      if (s.mean.size() != channels)
        config_error(ctx, node[i], at,
                     fmt::format("mean and std have {} values; the image has {} channel{}",
                                 s.mean.size(), channels, channels == 1 ? "" : "s"));
      stage = 1;
    }
    if (s.kind == K::kLayout) {
      if (stage == 2) config_error(ctx, node[i], at, "layout comes once, last");
      stage = 2;
    }
    if (s.kind == K::kResize) fixed = s.width != 0;
    if (s.kind == K::kCenterCrop || s.kind == K::kRandomResizedCrop) fixed = true;
    t.steps.push_back(s);
  }
  if (!fixed)
    config_error(ctx, node, key,
                 "the output has no fixed size: end the geometry with center_crop, "
                 "random_resized_crop or resize: [height, width]");
  return t;
}

void set_transform(LoaderOptions& o, FieldTransform t) {
  for (auto& existing : o.transforms)
    if (existing.field == t.field) {
      existing = std::move(t);
      return;
    }
  o.transforms.push_back(std::move(t));
}

void parse_transforms(LoaderOptions& o, const Context& ctx, const YAML::Node& node) {
  if (!node.IsMap())
    config_error(ctx, node, "transforms",
                 fmt::format("expected a mapping of field: [steps], got {}", shown(node)));
  o.transforms.clear();
  for (const auto& kv : node)
    set_transform(o, parse_field_transform(ctx, kv.second, kv.first.Scalar()));
}

using Setter = std::function<void(LoaderOptions&, const YAML::Node&, const Context&)>;

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

// For an override of a whole section with a scalar (Python's shuffle="none"): "expected a
// mapping of mode, block_size, buffer_size (e.g. shuffle: {mode: ...}), got "none"".
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

}  // namespace

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
  Context ctx{source, base_dir};
  LoaderOptions o;
  if (root.IsNull()) return o;
  if (!root.IsMap())
    detail::fail(ErrorCode::kConfig, "{}: expected a mapping of config keys at the top level",
                 source);
  apply_map(o, root, "", ctx);
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

void LoaderOptions::set(std::string_view key, std::string_view yaml_value) {
  const Setter* s = find_setter(key);
  std::string source = fmt::format("override {}", key);
  YAML::Node node;
  try {
    node = YAML::Load(std::string(yaml_value));
  } catch (const YAML::Exception& e) {
    detail::fail(ErrorCode::kConfig, "{}: invalid value \"{}\": {}", key, yaml_value, e.msg);
  }
  if (!s && key.starts_with("dataset.fields.")) {  // dataset.fields.json=optional
    const std::string overrides = "override";
    fs::path cwd = fs::current_path();
    set_optional(*this, {overrides, cwd}, node,
                 std::string(key.substr(std::string_view("dataset.fields.").size())));
    return;
  }
  if (!s && key.starts_with("transforms.")) {  // one field's steps: transforms.jpg=[...]
    const std::string overrides = "override";
    fs::path cwd = fs::current_path();
    set_transform(*this, parse_field_transform(
                             {overrides, cwd}, node,
                             std::string(key.substr(std::string_view("transforms.").size()))));
    return;
  }
  if (!s && key == "dataset" && node.IsScalar()) s = find_setter("dataset.path");  // shorthand
  if (!s && is_section(key))
    detail::fail(ErrorCode::kConfig, "{}: {}", key, section_expected(std::string(key), node));
  if (!s) detail::fail(ErrorCode::kConfig, "{}: unknown key", key);
  fs::path cwd = fs::current_path();
  const std::string overrides = "override";
  Context ctx{overrides, cwd};
  (*s)(*this, node, ctx);
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
  Context ctx{source, none};
  YAML::Node node;
  try {
    node = YAML::Load(yaml);
  } catch (const YAML::Exception&) {
    detail::fail(ErrorCode::kConfig, "{}: cannot parse \"{}\"", source, env);
  }
  return parse_peers(ctx, node);
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

std::string_view to_string(ShuffleMode mode) { return name_of<ShuffleMode>(kShuffleNames, mode); }

std::string_view to_string(DatasetFormat format) {
  return name_of<DatasetFormat>(kFormatNames, format);
}

std::string_view to_string(CachePolicy policy) {
  return name_of<CachePolicy>(kPolicyNames, policy);
}

std::string LoaderOptions::to_yaml() const {
  const std::string engine(name_of<IoEngineKind>(kEngineNames, io.engine));
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
        << std::string(name_of<uint32_t>(kTokenDtypeNames, dataset.token_bytes));
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
            << std::string(name_of<K>(kStepNames, s.kind)) << YAML::Value;
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
        << std::string(name_of<TransformErrors>(kTransformErrorNames, transform_errors));
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
