#include "common/errors.h"
#include "format/layout.h"

// The x86 dispatching entry points of libxxhash pick AVX2/AVX-512 at run time; the plain ones
// in Debian's build are SSE2 only, about half as fast on the records every read checks.
#include <xxh_x86dispatch.h>
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <set>

namespace sluice {

namespace {
struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t size;
};
constexpr std::array<DTypeInfo, 13> kDTypes = {{
    {DType::kUInt8, "uint8", 1},
    {DType::kInt8, "int8", 1},
    {DType::kUInt16, "uint16", 2},
    {DType::kInt16, "int16", 2},
    {DType::kUInt32, "uint32", 4},
    {DType::kInt32, "int32", 4},
    {DType::kUInt64, "uint64", 8},
    {DType::kInt64, "int64", 8},
    {DType::kFloat16, "float16", 2},
    {DType::kBFloat16, "bfloat16", 2},
    {DType::kFloat32, "float32", 4},
    {DType::kFloat64, "float64", 8},
    {DType::kBool, "bool", 1},
}};
}  // namespace

size_t dtype_size(DType dtype) {
  auto i = static_cast<size_t>(dtype);
  return i < kDTypes.size() ? kDTypes[i].size : 0;
}

std::string_view dtype_name(DType dtype) {
  auto i = static_cast<size_t>(dtype);
  return i < kDTypes.size() ? kDTypes[i].name : "invalid";
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& info : kDTypes)
    if (info.name == name) return info.dtype;
  return std::nullopt;
}

bool FieldSpec::fixed_size() const {
  return std::none_of(shape.begin(), shape.end(), [](int64_t d) { return d < 0; });
}

uint64_t FieldSpec::fixed_bytes() const {
  if (!fixed_size()) return 0;
  uint64_t n = dtype_size(dtype);
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

}  // namespace sluice

namespace sluice::format {

using detail::fail;

uint64_t checksum64(const void* data, size_t size, uint64_t seed) {
  return XXH3_64bits_withSeed(data, size, seed);
}

uint32_t record_checksum(const void* data, size_t size, uint64_t index) {
  return static_cast<uint32_t>(XXH3_64bits_withSeed(data, size, index));
}

Status check_record(std::span<const std::byte> record, uint64_t index, uint32_t stored) {
  const uint32_t computed = record_checksum(record.data(), record.size(), index);
  if (computed == stored) return {};
  return failure(fmt::format("sample {}: checksum mismatch (stored {:08x}, computed {:08x})", index,
                             stored, computed));
}

std::string shard_name(uint32_t shard_id) {
  return fmt::format("shard-{:05}{}", shard_id, kShardExtension);
}

namespace {

class ByteWriter {
 public:
  template <typename T>
  void put(T value) {
    size_t at = out_.size();
    out_.resize(at + sizeof(T));
    std::memcpy(out_.data() + at, &value, sizeof(T));
  }
  void put_string(const std::string& s) {
    put(static_cast<uint16_t>(s.size()));
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    out_.insert(out_.end(), p, p + s.size());
  }
  std::vector<std::byte>& bytes() { return out_; }

 private:
  std::vector<std::byte> out_;
};

// Bounds-checked reader over untrusted bytes: every read past the end throws kCorruption.
class ByteReader {
 public:
  ByteReader(std::span<const std::byte> bytes, const std::string& source)
      : bytes_(bytes), source_(source) {}
  template <typename T>
  T get(const char* what) {
    need(sizeof(T), what);
    T value;
    std::memcpy(&value, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }
  std::string get_string(const char* what) {
    auto n = get<uint16_t>(what);
    need(n, what);
    std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), n);
    pos_ += n;
    return s;
  }
  size_t remaining() const { return bytes_.size() - pos_; }

 private:
  void need(size_t n, const char* what) {
    if (n > remaining())
      fail(ErrorCode::kCorruption, "{}: truncated while reading {} (at byte {} of {})", source_,
           what, pos_, bytes_.size());
  }
  std::span<const std::byte> bytes_;
  const std::string& source_;
  size_t pos_ = 0;
};

bool safe_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

void check_alignment(uint32_t alignment, const std::string& source) {
  if (alignment < kMinAlignment || alignment > kMaxAlignment || !std::has_single_bit(alignment))
    fail(ErrorCode::kCorruption, "{}: bad alignment {} (expected a power of two in [{}, {}])",
         source, alignment, kMinAlignment, kMaxAlignment);
}

}  // namespace

std::vector<std::byte> encode_manifest(const Manifest& m) {
  ByteWriter body;
  for (const auto& f : m.fields) {
    body.put(static_cast<uint8_t>(f.dtype));
    body.put(static_cast<uint8_t>(f.shape.size()));
    for (int64_t d : f.shape) body.put(d);
    body.put_string(f.name);
  }
  for (const auto& c : m.classes) body.put_string(c);
  for (const auto& s : m.shards) {
    body.put(s.num_samples);
    body.put(s.file_bytes);
    body.put_string(s.name);
  }
  ManifestHeader h{};
  std::memcpy(h.magic, kManifestMagic, sizeof(h.magic));
  h.version = m.version;
  h.alignment = m.alignment;
  h.dataset_id = m.dataset_id;
  h.num_samples = m.num_samples;
  h.total_bytes = m.total_bytes;
  h.num_shards = static_cast<uint32_t>(m.shards.size());
  h.num_fields = static_cast<uint32_t>(m.fields.size());
  h.num_classes = static_cast<uint32_t>(m.classes.size());
  h.body_bytes = body.bytes().size();
  h.body_checksum = checksum64(body.bytes().data(), body.bytes().size());
  h.header_checksum = checksum64(&h, offsetof(ManifestHeader, header_checksum));
  std::vector<std::byte> out(sizeof(h) + body.bytes().size());
  std::memcpy(out.data(), &h, sizeof(h));
  if (!body.bytes().empty())
    std::memcpy(out.data() + sizeof(h), body.bytes().data(), body.bytes().size());
  return out;
}

Manifest decode_manifest(std::span<const std::byte> bytes, const std::string& source) {
  if (bytes.size() < sizeof(ManifestHeader))
    fail(ErrorCode::kCorruption, "{}: truncated: {} bytes, a manifest header needs {}", source,
         bytes.size(), sizeof(ManifestHeader));
  ManifestHeader h;
  std::memcpy(&h, bytes.data(), sizeof(h));
  if (std::memcmp(h.magic, kManifestMagic, sizeof(h.magic)) != 0)
    fail(ErrorCode::kCorruption, "{}: bad header: not a sluice manifest (wrong magic)", source);
  if (h.version != kVersion)
    fail(ErrorCode::kCorruption,
         "{}: bad header: unsupported format version {} (this build reads {})", source, h.version,
         kVersion);
  if (h.header_checksum != checksum64(&h, offsetof(ManifestHeader, header_checksum)))
    fail(ErrorCode::kCorruption, "{}: bad header: header checksum mismatch", source);
  auto body = bytes.subspan(sizeof(h));
  if (body.size() != h.body_bytes)
    fail(ErrorCode::kCorruption, "{}: truncated: body is {} bytes, header says {}", source,
         body.size(), h.body_bytes);
  if (h.body_checksum != checksum64(body.data(), body.size()))
    fail(ErrorCode::kCorruption, "{}: body checksum mismatch", source);
  check_alignment(h.alignment, source);
  if (h.num_fields == 0 || h.num_fields > 4096)
    fail(ErrorCode::kCorruption, "{}: bad field count {}", source, h.num_fields);

  Manifest m;
  m.version = h.version;
  m.alignment = h.alignment;
  m.dataset_id = h.dataset_id;
  m.num_samples = h.num_samples;
  m.total_bytes = h.total_bytes;
  ByteReader in(body, source);
  std::set<std::string> names;
  for (uint32_t i = 0; i < h.num_fields; ++i) {
    FieldSpec f;
    auto dtype = in.get<uint8_t>("field dtype");
    if (dtype_size(static_cast<DType>(dtype)) == 0)
      fail(ErrorCode::kCorruption, "{}: field {}: unknown dtype code {}", source, i, dtype);
    f.dtype = static_cast<DType>(dtype);
    auto ndim = in.get<uint8_t>("field rank");
    f.shape.resize(ndim);
    for (auto& d : f.shape) {
      d = in.get<int64_t>("field shape");
      if (d < -1) fail(ErrorCode::kCorruption, "{}: field {}: bad dimension {}", source, i, d);
    }
    f.name = in.get_string("field name");
    if (f.name.empty() || !names.insert(f.name).second)
      fail(ErrorCode::kCorruption, "{}: field {}: empty or duplicate name \"{}\"", source, i,
           f.name);
    m.fields.push_back(std::move(f));
  }
  for (uint32_t i = 0; i < h.num_classes; ++i) m.classes.push_back(in.get_string("class name"));
  uint64_t samples = 0;
  for (uint32_t i = 0; i < h.num_shards; ++i) {
    ShardEntry s;
    s.num_samples = in.get<uint64_t>("shard sample count");
    s.file_bytes = in.get<uint64_t>("shard size");
    s.name = in.get_string("shard name");
    if (!safe_file_name(s.name))
      fail(ErrorCode::kCorruption, "{}: shard {}: bad file name \"{}\"", source, i, s.name);
    if (s.num_samples > m.num_samples - samples)
      fail(ErrorCode::kCorruption, "{}: shard {}: sample counts exceed the total {}", source, i,
           m.num_samples);
    samples += s.num_samples;
    m.shards.push_back(std::move(s));
  }
  if (samples != m.num_samples)
    fail(ErrorCode::kCorruption, "{}: shards hold {} samples, header says {}", source, samples,
         m.num_samples);
  if (in.remaining() != 0)
    fail(ErrorCode::kCorruption, "{}: {} unexpected bytes after the shard table", source,
         in.remaining());
  return m;
}

void seal_shard_header(ShardHeader& h) {
  std::memcpy(h.magic, kShardMagic, sizeof(h.magic));
  h.version = kVersion;
  h.header_bytes = kShardHeaderBytes;
  h.header_checksum = checksum64(&h, offsetof(ShardHeader, header_checksum));
}

void validate_shard_header(const ShardHeader& h, const std::string& source) {
  if (std::memcmp(h.magic, kShardMagic, sizeof(h.magic)) != 0)
    fail(ErrorCode::kCorruption, "{}: bad header: not a sluice shard (wrong magic)", source);
  if (h.version != kVersion)
    fail(ErrorCode::kCorruption,
         "{}: bad header: unsupported format version {} (this build reads {})", source, h.version,
         kVersion);
  if (h.header_checksum != checksum64(&h, offsetof(ShardHeader, header_checksum)))
    fail(ErrorCode::kCorruption, "{}: bad header: header checksum mismatch", source);
  check_alignment(h.alignment, source);
  bool ok = h.header_bytes == kShardHeaderBytes && h.data_offset == h.header_bytes &&
            h.data_end >= h.data_offset && h.index_offset >= h.data_end &&
            h.index_offset % kPageBytes == 0 &&
            h.num_samples <= (UINT64_MAX - h.index_offset) / 16 &&
            h.file_bytes == h.index_offset + h.num_samples * sizeof(IndexEntry);
  if (!ok) fail(ErrorCode::kCorruption, "{}: bad header: inconsistent region offsets", source);
}

RecordLayout::RecordLayout(const std::vector<FieldSpec>& fields) : fields_(fields) {
  for (const auto& f : fields_) {
    if (f.fixed_size())
      fixed_bytes_ += f.fixed_bytes();
    else
      ++num_variable_;
  }
}

Status RecordLayout::check_lengths(std::span<const uint64_t> lengths) const {
  if (lengths.size() != fields_.size())
    return failure(fmt::format("expected {} fields, got {}", fields_.size(), lengths.size()));
  for (size_t i = 0; i < fields_.size(); ++i) {
    const auto& f = fields_[i];
    if (f.fixed_size() && lengths[i] != f.fixed_bytes())
      return failure(fmt::format("field \"{}\": {} bytes, its shape needs {}", f.name, lengths[i],
                                 f.fixed_bytes()));
    if (!f.fixed_size() && lengths[i] % dtype_size(f.dtype) != 0)
      return failure(fmt::format("field \"{}\": {} bytes is not a whole number of {} elements",
                                 f.name, lengths[i], dtype_name(f.dtype)));
    if (lengths[i] > UINT32_MAX) return failure(fmt::format("field \"{}\": over 4 GiB", f.name));
  }
  return {};
}

uint64_t RecordLayout::record_bytes(std::span<const uint64_t> lengths) const {
  uint64_t n = trailer_bytes();
  for (uint64_t len : lengths) n += len;
  return n;
}

Status RecordLayout::split(std::span<const std::byte> record,
                           std::vector<std::span<const std::byte>>& out) const {
  out.clear();
  uint64_t overhead = fixed_bytes_ + trailer_bytes();
  if (record.size() < overhead)
    return failure(
        fmt::format("record is {} bytes, its fixed fields need {}", record.size(), overhead));
  if (num_variable_ == 0 && record.size() != overhead)
    return failure(
        fmt::format("record is {} bytes, its fields need exactly {}", record.size(), overhead));
  uint64_t variable_left = record.size() - overhead;
  const std::byte* trailer = record.data() + record.size() - trailer_bytes();
  size_t var_seen = 0;
  uint64_t pos = 0;
  for (const auto& f : fields_) {
    uint64_t len;
    if (f.fixed_size()) {
      len = f.fixed_bytes();
    } else if (++var_seen < num_variable_) {
      uint32_t stored;
      std::memcpy(&stored, trailer + 4 * (var_seen - 1), 4);
      if (stored > variable_left)
        return failure(
            fmt::format("field \"{}\": stored length {} exceeds the record", f.name, stored));
      len = stored;
      variable_left -= len;
    } else {
      len = variable_left;
    }
    if (!f.fixed_size() && len % dtype_size(f.dtype) != 0)
      return failure(fmt::format("field \"{}\": {} bytes is not a whole number of {} elements",
                                 f.name, len, dtype_name(f.dtype)));
    out.push_back(record.subspan(pos, len));
    pos += len;
  }
  return {};
}

uint64_t place_record(uint64_t offset, uint64_t size, uint32_t alignment) {
  if (size == 0) return offset;
  uint64_t min_blocks = (size + alignment - 1) / alignment;
  uint64_t blocks = (offset % alignment + size + alignment - 1) / alignment;
  return blocks > min_blocks ? align_up(offset, alignment) : offset;
}

}  // namespace sluice::format
