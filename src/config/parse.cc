#include "config/parse.h"

#include <sluice/error.h>

#include <fmt/format.h>

#include <cctype>
#include <charconv>

namespace sluice::config {

[[noreturn]] void config_error(const Context& ctx, const YAML::Node& node, std::string_view key,
                               const std::string& what) {
  std::string where = ctx.source;
  if (ctx.lines && node.Mark().line >= 0) where += fmt::format(":{}", node.Mark().line + 1);
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

uint64_t parse_uint(const Context& ctx, const YAML::Node& node, std::string_view key, uint64_t min,
                    uint64_t max) {
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
               std::string_view a, std::string_view b) {
  std::string v = scalar(ctx, node, key, fmt::format("{} or {}", a, b));
  if (v != a && v != b)
    config_error(ctx, node, key, fmt::format("unknown value \"{}\" (expected {}, {})", v, a, b));
  return v == b;
}

void set_optional(LoaderOptions& o, const Context& ctx, const YAML::Node& node,
                  const std::string& field) {
  auto& list = o.dataset.optional_fields;
  std::erase(list, field);
  if (!second_of(ctx, node, "dataset.fields." + field, "required", "optional")) return;
  list.push_back(field);
}

// --- transforms: FIELD: [STEP, ...] ------------------------------------------------------

namespace {

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

}  // namespace

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

}  // namespace sluice::config
