#include "common/check.h"
#include "common/errors.h"
#include "common/file.h"
#include "common/log.h"
#include "format/layout.h"
#include "index/tar_index.h"

#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstring>
#include <optional>
#include <set>

namespace sluice {

using detail::fail;
namespace fs = std::filesystem;

namespace {
// WebDataset shards compressed (shard-000.tar.gz) are named as such: sluice reads samples in
// place, which a compressed stream does not allow.
void refuse_compressed_tar(const fs::path& p) {
  const std::string name = p.filename().string();
  for (const char* ext : {".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.zstd"})
    if (name.ends_with(ext))
      fail(ErrorCode::kUnsupported,
           "{}: a compressed tar ({}): sluice reads WebDataset shards uncompressed (each sample "
           "in place at its offset); decompress the shards first",
           p.string(), ext);
}

// One shard's open file and memory-mapped index.
struct Shard {
  detail::UniqueFd fd;
  format::ShardHeader header{};
  const format::IndexEntry* index = nullptr;
  void* map = nullptr;
  size_t map_bytes = 0;

  Shard() = default;
  Shard(Shard&& o) noexcept
      : fd(std::move(o.fd)), header(o.header), index(o.index), map(o.map), map_bytes(o.map_bytes) {
    o.map = nullptr;
    o.index = nullptr;
  }
  Shard& operator=(Shard&&) = delete;
  ~Shard() {
    if (map) ::munmap(map, map_bytes);
  }
};

}  // namespace

struct Dataset::Impl {
  fs::path dir;
  DatasetFormat format = DatasetFormat::kShards;
  format::Manifest manifest;
  std::vector<ShardInfo> infos;
  std::vector<Shard> shards;
  std::vector<uint64_t> first_samples;  // per shard, for the binary search in extent()
  format::RecordLayout layout{{}};
  // Sources read in place (npy, tokens): one file, sample i at base + i * stride, item bytes
  // long; no index, no checksums.
  struct Array {
    uint64_t base = 0, stride = 0, item = 0;
  };
  std::optional<Array> array;
  // files: a tree read in place. Compact per-sample metadata: relative paths back to back.
  struct Files {
    std::string names;
    std::vector<uint64_t> name_at;  // N + 1 offsets into names
    std::vector<uint32_t> sizes;
    std::vector<int64_t> labels;
  };
  std::optional<Files> files;
  // tar: WebDataset shards read in place, one TarIndex per tar (= shard).
  std::vector<index::TarIndex> tars;

  // What every source read in place has instead of a manifest: its schema and sizes, version 0,
  // and the O_DIRECT block as alignment (reads cover whole blocks).
  void describe_in_place(DatasetFormat in_place, std::vector<FieldSpec> fields, uint64_t samples,
                         uint64_t bytes) {
    format = in_place;
    manifest.fields = std::move(fields);
    manifest.num_samples = samples;
    manifest.total_bytes = bytes;
    manifest.alignment = 4096;
    manifest.version = 0;
    layout = format::RecordLayout(manifest.fields);
  }
  // A single-file source (npy, tokens, a files tree's root directory) as the one shard.
  void add_single_shard(Shard s, uint64_t samples, uint64_t file_bytes) {
    infos.push_back({dir, 0, samples, file_bytes, true});
    first_samples.push_back(0);
    shards.push_back(std::move(s));
  }

  const std::string& shard_label(uint32_t shard) const { return manifest.shards[shard].name; }

  void open_shard(uint32_t id, bool allow_absent) {
    const auto& entry = manifest.shards[id];
    fs::path path = dir / entry.name;
    std::string source = path.string();
    Shard s;
    try {
      s.fd = detail::open_file(path, O_RDONLY);
    } catch (const Error& e) {
      if (e.code() == ErrorCode::kNotFound && allow_absent) {
        infos[id].local = false;
        shards.push_back(std::move(s));
        return;
      }
      if (e.code() == ErrorCode::kNotFound)
        throw Error(ErrorCode::kNotFound,
                    fmt::format("{}: shard {} is missing (listed in the manifest)", source, id),
                    e.sys_errno());
      throw;
    }
    uint64_t size = detail::file_size(s.fd.get(), source);
    if (size < sizeof(format::ShardHeader))
      fail(ErrorCode::kCorruption, "{}: truncated: {} bytes, smaller than a shard header", source,
           size);
    detail::pread_full(s.fd.get(), std::as_writable_bytes(std::span(&s.header, 1)), 0, source);
    const auto& h = s.header;
    format::validate_shard_header(h, source);
    if (h.dataset_id != manifest.dataset_id || h.shard_id != id ||
        h.first_sample != infos[id].first_sample || h.num_samples != entry.num_samples ||
        h.alignment != manifest.alignment || h.file_bytes != entry.file_bytes)
      fail(ErrorCode::kCorruption,
           "{}: bad header: does not match the manifest "
           "(shard {} of dataset {:016x} expected)",
           source, id, manifest.dataset_id);
    if (size < h.file_bytes)
      fail(ErrorCode::kCorruption, "{}: truncated: file is {} bytes, its header says {}", source,
           size, h.file_bytes);
    if (size > h.file_bytes)
      fail(ErrorCode::kCorruption, "{}: file is {} bytes, its header says {} (appended to?)",
           source, size, h.file_bytes);
    if (h.num_samples > 0) {
      // The index starts 4 KiB-aligned; map from the page boundary below it so that machines
      // with larger pages (16 or 64 KiB) read the same files.
      static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
      uint64_t map_start = h.index_offset / page * page;
      s.map_bytes = h.index_offset - map_start + h.num_samples * sizeof(format::IndexEntry);
      s.map = ::mmap(nullptr, s.map_bytes, PROT_READ, MAP_SHARED, s.fd.get(),
                     static_cast<off_t>(map_start));
      if (s.map == MAP_FAILED) {
        s.map = nullptr;
        detail::fail_errno(errno, "mmap index of " + source);
      }
      s.index = reinterpret_cast<const format::IndexEntry*>(static_cast<const std::byte*>(s.map) +
                                                            (h.index_offset - map_start));
    }
    shards.push_back(std::move(s));
  }
};

Dataset::Dataset(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Dataset::~Dataset() = default;

std::shared_ptr<Dataset> Dataset::open(const fs::path& dir, const DatasetOpenOptions& options) {
  auto impl = std::make_unique<Impl>();
  impl->dir = fs::absolute(dir);
  std::error_code ec;
  if (!fs::exists(impl->dir, ec))
    throw Error(ErrorCode::kNotFound, fmt::format("{}: dataset not found", dir.string()), ENOENT);
  if (!fs::is_directory(impl->dir, ec))
    fail(ErrorCode::kInvalidArgument, "{}: not a dataset directory", dir.string());
  fs::path manifest_path = impl->dir / format::kManifestName;
  std::vector<std::byte> bytes;
  {
    detail::UniqueFd fd;
    try {
      fd = detail::open_file(manifest_path, O_RDONLY);
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kNotFound) throw;
      throw Error(ErrorCode::kNotFound,
                  fmt::format("{}: not a packed sluice dataset (no {}; was `sluice pack` "
                              "interrupted?)",
                              dir.string(), format::kManifestName),
                  ENOENT);
    }
    uint64_t size = detail::file_size(fd.get(), manifest_path.string());
    if (size > (1ull << 30))
      fail(ErrorCode::kCorruption, "{}: manifest of {} bytes is implausibly large",
           manifest_path.string(), size);
    bytes.resize(size);
    bytes.resize(detail::pread_full(fd.get(), bytes, 0, manifest_path.string()));
  }
  impl->manifest = format::decode_manifest(bytes, manifest_path.string());
  impl->layout = format::RecordLayout(impl->manifest.fields);
  uint64_t first = 0;
  for (const auto& s : impl->manifest.shards) {
    impl->infos.push_back({impl->dir / s.name, first, s.num_samples, s.file_bytes, true});
    impl->first_samples.push_back(first);
    first += s.num_samples;
  }
  impl->shards.reserve(impl->manifest.shards.size());
  detail::reserve_descriptors(
      impl->manifest.shards.size(),
      fmt::format("{} ({} shards)", impl->dir.string(), impl->manifest.shards.size()));
  for (uint32_t i = 0; i < impl->manifest.shards.size(); ++i)
    impl->open_shard(i, options.allow_absent_shards);
  return std::shared_ptr<Dataset>(new Dataset(std::move(impl)));
}

const fs::path& Dataset::path() const { return impl_->dir; }
uint64_t Dataset::num_samples() const { return impl_->manifest.num_samples; }
uint64_t Dataset::total_bytes() const { return impl_->manifest.total_bytes; }
uint32_t Dataset::alignment() const { return impl_->manifest.alignment; }
uint32_t Dataset::format_version() const { return impl_->manifest.version; }
bool Dataset::packed() const { return impl_->format == DatasetFormat::kShards; }
DatasetFormat Dataset::format() const { return impl_->format; }
const std::vector<FieldSpec>& Dataset::fields() const { return impl_->manifest.fields; }
const std::vector<std::string>& Dataset::classes() const { return impl_->manifest.classes; }
const std::vector<ShardInfo>& Dataset::shards() const { return impl_->infos; }

std::vector<uint64_t> Dataset::shard_sizes() const {
  std::vector<uint64_t> sizes;
  for (const auto& s : impl_->infos) sizes.push_back(s.num_samples);
  return sizes;
}

int Dataset::shard_fd(uint32_t shard) const {
  SLUICE_CHECK(shard < impl_->shards.size());
  return impl_->shards[shard].fd.get();
}

uint32_t Dataset::shard_of(uint64_t index) const {
  if (index >= num_samples())
    fail(ErrorCode::kInvalidArgument, "{}: sample {} out of range (dataset has {})",
         impl_->dir.string(), index, num_samples());
  const auto& firsts = impl_->first_samples;
  return static_cast<uint32_t>(std::upper_bound(firsts.begin(), firsts.end(), index) -
                               firsts.begin() - 1);
}

SampleExtent Dataset::extent(uint64_t index) const {
  const uint32_t shard = shard_of(index);
  if (const auto& a = impl_->array)
    return {0, a->base + index * a->stride, static_cast<uint32_t>(a->item), 0};
  if (const auto& f = impl_->files) return {0, 0, f->sizes[index], 0};
  if (!impl_->tars.empty()) {
    const auto& t = impl_->tars[shard];
    const uint64_t local = index - impl_->first_samples[shard];
    return {shard, t.start[local], t.span[local], 0};
  }
  const auto& firsts = impl_->first_samples;
  if (!impl_->infos[shard].local)
    throw Error(ErrorCode::kNotFound,
                fmt::format("{}: sample {}: shard {} is not on this node",
                            impl_->infos[shard].path.string(), index, shard),
                ENOENT);
  const Shard& s = impl_->shards[shard];
  const format::IndexEntry& e = s.index[index - firsts[shard]];
  if (e.offset < s.header.data_offset || e.offset > s.header.data_end ||
      e.size > s.header.data_end - e.offset)
    fail(ErrorCode::kCorruption, "{}: sample {}: index entry [{}+{}] lies outside the data region",
         impl_->infos[shard].path.string(), index, e.offset, e.size);
  return {shard, e.offset, e.size, e.checksum};
}

std::vector<std::byte> Dataset::read_record(uint64_t index) const {
  std::vector<std::byte> record(extent(index).size);
  read_record_into(index, record);
  return record;
}

size_t Dataset::read_record_into(uint64_t index, std::span<std::byte> dest) const {
  SampleExtent x = extent(index);
  const std::string& path = impl_->infos[x.shard].path.string();
  if (dest.size() < x.size)
    fail(ErrorCode::kInvalidArgument, "{}: sample {}: {} bytes do not fit a buffer of {}", path,
         index, x.size, dest.size());
  auto record = dest.first(x.size);
  detail::UniqueFd file;
  if (impl_->files) file = detail::UniqueFd(open_sample(index, false));
  size_t n = detail::pread_full(file ? file.get() : shard_fd(x.shard), record, x.offset, path);
  if (n != x.size)
    fail(ErrorCode::kCorruption, "{}: sample {}: truncated: read {} of {} bytes at offset {}", path,
         index, n, x.size, x.offset);
  if (!packed()) return x.size;  // nothing to check against
  if (auto checked = format::check_record(record, index, x.checksum); !checked)
    fail(ErrorCode::kCorruption, "{}: {}", path, checked.error());
  return x.size;
}

SampleFields Dataset::parse_record(uint64_t index, std::span<const std::byte> record) const {
  SampleFields out;
  if (auto why = split_record(index, record, out.fields); !why.empty())
    fail(ErrorCode::kCorruption, "{}: sample {}: {}", impl_->dir.string(), index, why);
  return out;
}

std::string Dataset::split_record(uint64_t index, std::span<const std::byte> record,
                                  std::vector<std::span<const std::byte>>& fields) const {
  if (const auto& f = impl_->files) {  // the file's bytes, and the label from its directory
    fields.assign({record, std::as_bytes(std::span(&f->labels[index], 1))});
    return "";
  }
  if (!impl_->tars.empty()) {  // each member's place in the sample's span, from the index
    const uint32_t shard = shard_of(index);
    const auto& t = impl_->tars[shard];
    const uint64_t local = index - impl_->first_samples[shard];
    const size_t nf = t.fields.size();
    fields.resize(nf);
    for (size_t f = 0; f < nf; ++f) {
      const size_t k = local * nf + f;
      if (t.is_int[f])
        fields[f] = std::as_bytes(std::span(&t.ints[k], 1));
      else if (uint64_t{t.offset[k]} + t.size[k] <= record.size())
        fields[f] = record.subspan(t.offset[k], t.size[k]);
      else
        return fmt::format("field {} lies outside the sample", t.fields[f]);
    }
    return "";
  }
  // The public header cannot name Status (common/result.h); index::split_record gives one.
  auto split = impl_->layout.split(record, fields);
  return split ? "" : split.error();
}

std::string Dataset::sample_key(uint64_t index) const {
  if (impl_->files) return std::string(sample_file(index));
  if (impl_->tars.empty()) return {};
  const uint32_t shard = shard_of(index);
  return impl_->tars[shard].keys[index - impl_->first_samples[shard]];
}

std::string_view Dataset::sample_file(uint64_t index) const {
  const auto& f = impl_->files;
  if (!f || index >= num_samples()) return {};
  return std::string_view(f->names).substr(f->name_at[index],
                                           f->name_at[index + 1] - f->name_at[index]);
}

int Dataset::open_sample(uint64_t index, bool direct) const {
  std::string name(sample_file(index));
  if (name.empty())
    fail(ErrorCode::kInvalidArgument, "{}: sample {}: not a files dataset", impl_->dir.string(),
         index);
  // RESOLVE_BENEATH: no path (nor a link replaced since the listing) leads out of the tree.
  open_how how{};
  how.flags = O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0);
  how.resolve = RESOLVE_BENEATH;
  int fd = static_cast<int>(
      ::syscall(SYS_openat2, impl_->shards[0].fd.get(), name.c_str(), &how, sizeof how));
  if (fd < 0 && errno == ENOSYS)  // before Linux 5.6: the listing's check stands alone
    fd = ::openat(impl_->shards[0].fd.get(), name.c_str(), static_cast<int>(how.flags));
  const std::string path = (impl_->dir / name).string();
  if (fd < 0) {
    int err = errno;
    throw Error(err == ENOENT ? ErrorCode::kNotFound : ErrorCode::kIo,
                fmt::format("{}: sample {}: open: {}{}", path, index, detail::errno_text(err),
                            err == EXDEV ? " (a symbolic link now leads out of the tree)" : ""),
                err);
  }
  // The listing's size is what the sample is: a file that has changed since would be read cut
  // short or cut off without a word.
  struct stat st {};
  const uint64_t listed = impl_->files->sizes[index];
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    detail::fail_errno(err, "stat " + path);
  }
  if (static_cast<uint64_t>(st.st_size) != listed) {
    ::close(fd);
    fail(ErrorCode::kCorruption,
         "{}: sample {}: size changed since the tree was listed ({} bytes then, {} now); list "
         "it again (a new Loader) after changing files",
         path, index, listed, st.st_size);
  }
  return fd;
}

std::vector<std::string> Dataset::verify(
    const std::function<void(uint64_t, uint64_t)>& progress) const {
  std::vector<std::string> problems;
  uint64_t total = total_bytes(), done = 0;
  if (!packed()) {  // no checksums: read every sample and split it into its fields
    std::vector<std::byte> record;
    std::vector<std::span<const std::byte>> fields;
    for (uint64_t index = 0; index < num_samples(); ++index) {
      try {
        record.resize(extent(index).size);
        read_record_into(index, record);
        if (auto why = split_record(index, record, fields); !why.empty())
          problems.push_back(fmt::format(
              "{}: sample {}: {}",
              (impl_->files ? impl_->dir / sample_file(index) : impl_->infos[shard_of(index)].path)
                  .string(),
              index, why));
      } catch (const Error& e) {
        problems.push_back(e.what());
      }
      done += record.size();
      if (progress && (index & 0xfff) == 0) progress(done, total);
    }
    if (progress) progress(done, total);
    return problems;
  }
  std::vector<std::byte> window;
  std::vector<std::span<const std::byte>> fields;
  constexpr uint64_t kWindow = 8 << 20;
  for (uint32_t id = 0; id < impl_->shards.size(); ++id) {
    const Shard& s = impl_->shards[id];
    const ShardInfo& info = impl_->infos[id];
    std::string path = info.path.string();
    const auto& h = s.header;
    if (h.num_samples > 0 &&
        format::checksum64(s.index, h.num_samples * sizeof(format::IndexEntry)) != h.index_checksum)
      problems.push_back(fmt::format("{}: sample index checksum mismatch", path));
    uint64_t win_start = 0, win_end = 0;
    for (uint64_t local = 0; local < h.num_samples; ++local) {
      uint64_t index = info.first_sample + local;
      const format::IndexEntry& e = s.index[local];
      if (e.offset < h.data_offset || e.offset > h.data_end || e.size > h.data_end - e.offset) {
        problems.push_back(
            fmt::format("{}: sample {}: index entry [{}+{}] lies outside the data "
                        "region",
                        path, index, e.offset, e.size));
        continue;
      }
      if (e.offset < win_start || e.offset + e.size > win_end) {
        win_start = e.offset;
        window.resize(std::max<uint64_t>(kWindow, e.size));
        window.resize(detail::pread_full(s.fd.get(), window, win_start, path));
        win_end = win_start + window.size();
        if (e.offset + e.size > win_end) {
          problems.push_back(fmt::format("{}: sample {}: truncated record", path, index));
          continue;
        }
      }
      auto record = std::span(window).subspan(e.offset - win_start, e.size);
      if (auto sum = format::check_record(record, index, e.checksum); !sum)
        problems.push_back(fmt::format("{}: {}", path, sum.error()));
      else if (auto split = impl_->layout.split(record, fields); !split)
        problems.push_back(fmt::format("{}: sample {}: {}", path, index, split.error()));
      done += e.size;
      if (progress && (local & 0xfff) == 0) progress(done, total);
    }
  }
  if (progress) progress(done, total);
  return problems;
}

// Sources read in place ---------------------------------------------------------------------

namespace {

uint64_t read_u64_le(const std::byte* p, size_t n) {
  uint64_t v = 0;
  for (size_t i = 0; i < n; ++i) v |= uint64_t(std::to_integer<uint8_t>(p[i])) << (8 * i);
  return v;
}

// The value of 'key' in a .npy header dict (text up to the next top-level ',' or '}').
std::string npy_value(const std::string& header, const std::string& key, const std::string& path) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) k = header.find("\"" + key + "\"");
  if (k == std::string::npos)
    fail(ErrorCode::kCorruption, "{}: bad .npy header: no '{}' in {}", path, key, header);
  size_t colon = header.find(':', k);
  size_t start = colon == std::string::npos ? colon : header.find_first_not_of(' ', colon + 1);
  if (start == std::string::npos)  // found by fuzz_sources: a key with no value
    fail(ErrorCode::kCorruption, "{}: bad .npy header: '{}' has no value in {}", path, key, header);
  size_t end = start;
  int depth = 0;
  for (; end < header.size(); ++end) {
    char c = header[end];
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if (depth == 0 && (c == ',' || c == '}')) break;
  }
  return header.substr(start, end - start);
}

DType npy_dtype(std::string descr, const std::string& path) {
  if (descr.size() >= 2 && (descr.front() == '\'' || descr.front() == '"'))
    descr = descr.substr(1, descr.size() - 2);
  if (descr.size() >= 3 && descr[0] == '>' && descr.substr(1) != "u1" && descr.substr(1) != "i1" &&
      descr.substr(1) != "b1")
    fail(ErrorCode::kUnsupported, "{}: dtype {}: big-endian arrays are not read in place", path,
         descr);
  static const std::pair<const char*, DType> kTypes[] = {
      {"u1", DType::kUInt8},   {"i1", DType::kInt8},    {"b1", DType::kBool},
      {"u2", DType::kUInt16},  {"i2", DType::kInt16},   {"u4", DType::kUInt32},
      {"i4", DType::kInt32},   {"u8", DType::kUInt64},  {"i8", DType::kInt64},
      {"f2", DType::kFloat16}, {"f4", DType::kFloat32}, {"f8", DType::kFloat64}};
  std::string code = descr.size() == 3 ? descr.substr(1) : descr;
  for (const auto& [name, dtype] : kTypes)
    if (code == name) return dtype;
  fail(ErrorCode::kUnsupported, "{}: dtype {}: not a numeric dtype sluice reads", path, descr);
}

}  // namespace

std::shared_ptr<Dataset> Dataset::open_source(const DatasetOptions& source,
                                              const DatasetOpenOptions& options) {
  const fs::path& path = source.path;
  std::error_code ec;
  DatasetFormat format = source.format;
  if (format == DatasetFormat::kAuto) {
    if (!fs::exists(path, ec) || fs::exists(path / format::kManifestName, ec))
      format = DatasetFormat::kShards;
    else if (path.extension() == ".tar")
      format = DatasetFormat::kTar;
    else if (fs::is_directory(path, ec)) {
      for (const auto& e : fs::directory_iterator(path, ec)) refuse_compressed_tar(e.path());
      // .tar files: WebDataset shards. Shard files without a manifest: a pack that never
      // finished, opened as packed so that the error says so. Otherwise a tree of files.
      format = DatasetFormat::kFiles;
      for (const auto& e : fs::directory_iterator(path, ec)) {
        if (e.path().extension() == ".tar") format = DatasetFormat::kTar;
        if (e.path().extension() == format::kShardExtension) {
          format = DatasetFormat::kShards;
          break;
        }
      }
    } else if (path.extension() == ".npy")
      format = DatasetFormat::kNpy;
    else if (source.seq_len > 0)
      format = DatasetFormat::kTokens;
    else
      fail(ErrorCode::kConfig,
           "{}: a file, not a packed dataset: set dataset.format (npy, tokens) and, for tokens, "
           "dataset.seq_len",
           path.string());
  }
  if (format == DatasetFormat::kShards) return open(path, options);
  if (format == DatasetFormat::kFiles) return open_files(path);
  if (format == DatasetFormat::kTar) return open_tar(path, source.optional_fields);

  if (std::error_code dec; fs::is_directory(path, dec)) {
    // One array per file: a directory (a prefix of an object store) is not one. Its files are
    // named so that the path of one can be given instead.
    std::vector<std::string> files;
    for (const auto& e : fs::directory_iterator(path, dec))
      if (e.is_regular_file(dec)) files.push_back(e.path().filename().string());
    std::sort(files.begin(), files.end());
    std::string listed;
    for (size_t i = 0; i < std::min<size_t>(files.size(), 3); ++i)
      listed += (i ? ", " : "") + files[i];
    if (files.size() > 3) listed += fmt::format(", ... ({} files)", files.size());
    fail(ErrorCode::kInvalidArgument,
         "{}: format {} reads one file, and this is a directory{}: give one file's path{}",
         path.string(), format == DatasetFormat::kTokens ? "tokens" : "npy",
         listed.empty() ? " without files" : " of " + listed,
         files.empty() ? "" : fmt::format(" (dataset.path: {})", (path / files.front()).string()));
  }
  auto impl = std::make_unique<Impl>();
  impl->dir = fs::absolute(path);
  const std::string name = path.string();
  Shard s;
  s.fd = detail::open_file(impl->dir, O_RDONLY);
  const uint64_t size = detail::file_size(s.fd.get(), name);
  Impl::Array a;
  FieldSpec field;
  uint64_t count = 0;
  if (format == DatasetFormat::kNpy) {
    std::byte prefix[12] = {};
    size_t got = detail::pread_full(s.fd.get(), prefix, 0, name);
    if (got < 10 || std::memcmp(prefix, "\x93NUMPY", 6) != 0)
      fail(ErrorCode::kCorruption, "{}: not a .npy file (no \\x93NUMPY magic)", name);
    auto major = std::to_integer<uint8_t>(prefix[6]);
    size_t len_bytes = major == 1 ? 2 : 4, header_at = 8 + len_bytes;
    if (major < 1 || major > 3 || got < header_at)
      fail(ErrorCode::kCorruption, "{}: bad .npy header: version {}", name, major);
    uint64_t header_len = read_u64_le(prefix + 8, len_bytes);
    if (header_len > (1 << 20) || header_at + header_len > size)
      fail(ErrorCode::kCorruption, "{}: bad .npy header: length {} in a file of {} bytes", name,
           header_len, size);
    std::string header(header_len, '\0');
    detail::pread_full(s.fd.get(), std::as_writable_bytes(std::span(header)), header_at, name);
    if (npy_value(header, "fortran_order", name) != "False")
      fail(ErrorCode::kUnsupported, "{}: a Fortran-order array; save it C-contiguous", name);
    field.name = "data";
    field.dtype = npy_dtype(npy_value(header, "descr", name), name);
    std::string shape = npy_value(header, "shape", name);
    std::vector<int64_t> dims;
    for (size_t i = 0; i < shape.size();) {
      if (!std::isdigit(static_cast<unsigned char>(shape[i]))) {
        ++i;
        continue;
      }
      int64_t dim = 0;
      auto r = std::from_chars(shape.data() + i, shape.data() + shape.size(), dim);
      if (r.ec != std::errc() || dim > (int64_t{1} << 48))  // found by fuzz_sources: overflow
        fail(ErrorCode::kCorruption, "{}: bad .npy header: shape {}", name, shape);
      dims.push_back(dim);
      i = static_cast<size_t>(r.ptr - shape.data());
    }
    if (dims.empty())
      fail(ErrorCode::kInvalidArgument, "{}: a 0-d array; sluice reads arrays of shape (N, ...)",
           name);
    count = static_cast<uint64_t>(dims[0]);
    field.shape.assign(dims.begin() + 1, dims.end());
    uint64_t total = dtype_size(field.dtype);  // bytes of the whole array, without overflow
    for (int64_t d : dims)
      if (__builtin_mul_overflow(total, static_cast<uint64_t>(d), &total) || total > size)
        fail(ErrorCode::kCorruption, "{}: truncated: {} bytes, its header says shape {}", name,
             size, shape);
    a.base = header_at + header_len;
    a.item = field.fixed_bytes();
    a.stride = a.item;
    if (a.base + count * a.item > size)
      fail(ErrorCode::kCorruption,
           "{}: truncated: {} bytes, its header says {} samples of {} bytes", name, size, count,
           a.item);
  } else {
    if (source.seq_len == 0) fail(ErrorCode::kConfig, "dataset.seq_len: required for tokens");
    if (source.token_bytes != 2 && source.token_bytes != 4)
      fail(ErrorCode::kConfig, "dataset.dtype: tokens are uint16 or uint32");
    const uint64_t t = source.token_bytes;
    if (size % t != 0)
      fail(ErrorCode::kCorruption,
           "{}: {} bytes is not a whole number of {}-byte tokens (truncated?)", name, size, t);
    const uint64_t tokens = size / t, stride = source.stride ? source.stride : source.seq_len;
    if (tokens < source.seq_len)
      fail(ErrorCode::kInvalidArgument, "{}: {} tokens, fewer than one window of seq_len {}", name,
           tokens, source.seq_len);
    count = (tokens - source.seq_len) / stride + 1;
    field.name = "tokens";
    field.dtype = t == 2 ? DType::kUInt16 : DType::kUInt32;
    field.shape = {static_cast<int64_t>(source.seq_len)};
    a.item = source.seq_len * t;
    a.stride = stride * t;
  }
  if (a.item == 0 || a.item > UINT32_MAX)
    fail(ErrorCode::kInvalidArgument, "{}: samples of {} bytes (sluice reads 1 byte to 4 GiB)",
         name, a.item);
  impl->array = a;
  impl->describe_in_place(format, {field}, count, count * a.item);
  impl->add_single_shard(std::move(s), count, size);
  return std::shared_ptr<Dataset>(new Dataset(std::move(impl)));
}

// A files tree is listed once. Labels are torchvision's ImageFolder's: the first directory
// under the root (ROOT/cat/train/a.jpg is a "cat"). Symbolic links are followed while they stay
// inside the root (a class directory linked from elsewhere in the tree, a deduplicated file);
// one that leads out of it is skipped, with a warning, and never read (reads open files with
// RESOLVE_BENEATH, so a link changed later cannot lead out either). Hidden entries are skipped.
std::shared_ptr<Dataset> Dataset::open_files(const fs::path& root) {
  std::error_code ec;
  if (!fs::exists(root, ec))
    throw Error(ErrorCode::kNotFound, fmt::format("{}: no such directory", root.string()), ENOENT);
  if (!fs::is_directory(root, ec))
    fail(ErrorCode::kInvalidArgument,
         "{}: not a directory (format files takes a tree of class directories)", root.string());
  const fs::path real_root = fs::canonical(root, ec);
  if (ec) detail::fail_errno(ec.value(), "resolve " + root.string());
  struct Entry {
    std::string rel, label;
    std::string open_as;  // rel, or for an entry reached through links, the path they lead to
    uint64_t size;
  };
  std::vector<Entry> entries;
  std::vector<std::string> outside;       // links that lead out of the tree, skipped
  std::set<fs::path> entered{real_root};  // directories reached through links: no cycles
  std::vector<std::string> linked_dirs;   // listed paths of directories entered through links
  auto inside = [&](const fs::path& real) {
    auto rel = real.lexically_relative(real_root);
    return !rel.empty() && *rel.begin() != "..";
  };
  auto it =
      fs::recursive_directory_iterator(root, fs::directory_options::follow_directory_symlink, ec);
  if (ec) detail::fail_errno(ec.value(), "list " + root.string());
  for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
    if (ec) detail::fail_errno(ec.value(), "list " + it->path().string());
    const fs::path& path = it->path();
    if (path.filename().string().starts_with(".")) {  // hidden: skipped, not entered
      if (it->is_directory(ec)) it.disable_recursion_pending();
      continue;
    }
    if (it->is_symlink(ec)) {
      fs::path real = fs::canonical(path, ec);
      if (ec || !inside(real)) {
        outside.push_back(path.string() + (ec ? " (dangling)" : " -> " + real.string()));
        ec.clear();
        if (it->is_directory(ec)) it.disable_recursion_pending();
        continue;
      }
      if (fs::is_directory(real, ec)) {
        if (!entered.insert(real).second)
          it.disable_recursion_pending();  // a cycle
        else
          linked_dirs.push_back(path.string() + "/");
        continue;
      }
    }
    if (!it->is_regular_file(ec)) continue;
    fs::path rel = path.lexically_relative(root);
    // Reached through a link: read by the path it resolves to (links in it checked above), so
    // that opening it follows no link at all.
    fs::path open_as = rel;
    const bool linked = it->is_symlink(ec) || std::any_of(linked_dirs.begin(), linked_dirs.end(),
                                                          [&](const std::string& d) {
                                                            return path.string().starts_with(d);
                                                          });
    if (linked) open_as = fs::canonical(path, ec).lexically_relative(real_root);
    if (ec) detail::fail_errno(ec.value(), "resolve " + path.string());
    if (!rel.has_parent_path())
      fail(ErrorCode::kInvalidArgument,
           "{}: not inside a class directory (expected ROOT/<label>/.../<file>)", path.string());
    uint64_t size = it->file_size(ec);
    if (ec) detail::fail_errno(ec.value(), "stat " + path.string());
    if (size > UINT32_MAX)
      fail(ErrorCode::kUnsupported, "{}: {} bytes: samples are at most 4 GiB", path.string(), size);
    entries.push_back({rel.string(), rel.begin()->string(), open_as.string(), size});
  }
  if (!outside.empty())
    detail::log_line(
        fmt::format("{}: skipped {} symbolic link{} leading out of the tree (not read): {}{}",
                    root.string(), outside.size(), outside.size() == 1 ? "" : "s", outside.front(),
                    outside.size() > 1 ? ", ..." : ""));
  if (entries.empty()) fail(ErrorCode::kInvalidArgument, "{}: no files", root.string());
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return a.rel < b.rel; });

  auto impl = std::make_unique<Impl>();
  impl->dir = real_root;
  Impl::Files f;
  std::vector<std::string>& classes = impl->manifest.classes;
  for (const auto& e : entries) classes.push_back(e.label);
  std::sort(classes.begin(), classes.end());
  classes.erase(std::unique(classes.begin(), classes.end()), classes.end());
  uint64_t total = 0;
  for (const auto& e : entries) {
    f.name_at.push_back(f.names.size());
    f.names += e.open_as;
    f.sizes.push_back(static_cast<uint32_t>(e.size));
    f.labels.push_back(std::lower_bound(classes.begin(), classes.end(), e.label) - classes.begin());
    total += e.size;
  }
  f.name_at.push_back(f.names.size());
  impl->files = std::move(f);
  impl->describe_in_place(DatasetFormat::kFiles,
                          {{"data", DType::kUInt8, {-1}}, {"label", DType::kInt64, {}}},
                          entries.size(), total);
  Shard s;  // the root directory: files open relative to it
  s.fd = detail::open_file(impl->dir, O_RDONLY | O_DIRECTORY);
  impl->add_single_shard(std::move(s), entries.size(), total);
  return std::shared_ptr<Dataset>(new Dataset(std::move(impl)));
}

std::shared_ptr<Dataset> Dataset::open_tar(const fs::path& path,
                                           const std::vector<std::string>& optional_fields) {
  std::error_code ec;
  std::vector<fs::path> tars;
  if (fs::is_directory(path, ec)) {
    for (const auto& e : fs::directory_iterator(path, ec)) {
      if (e.path().extension() == ".tar") tars.push_back(e.path());
      refuse_compressed_tar(e.path());
    }
    std::sort(tars.begin(), tars.end());
    if (tars.empty()) fail(ErrorCode::kInvalidArgument, "{}: no .tar files", path.string());
  } else {
    tars.push_back(path);
  }
  auto impl = std::make_unique<Impl>();
  impl->dir = fs::absolute(path);
  uint64_t first = 0, total = 0;
  for (const fs::path& tar : tars) {
    Shard s;
    s.fd = detail::open_file(tar, O_RDONLY);
    uint64_t size = detail::file_size(s.fd.get(), tar.string());
    index::TarIndex t = index::load_tar_index(tar, s.fd.get(), size);
    for (uint32_t span : t.span) total += span;
    impl->infos.push_back({fs::absolute(tar), first, t.num_samples(), size, true});
    impl->first_samples.push_back(first);
    first += t.num_samples();
    impl->shards.push_back(std::move(s));
    impl->tars.push_back(std::move(t));
  }
  // Every field any shard has, each shard's columns in that order; a sample may lack only the
  // fields said to be optional (dataset.fields).
  std::set<std::string> all;
  for (const auto& t : impl->tars) all.insert(t.fields.begin(), t.fields.end());
  const std::vector<std::string> names(all.begin(), all.end());
  for (size_t k = 0; k < impl->tars.size(); ++k) {
    index::remap_fields(impl->tars[k], names);
    index::check_fields(tars[k].string(), impl->tars[k], optional_fields);
  }
  const auto& t0 = impl->tars[0];
  std::vector<FieldSpec> fields;
  for (size_t f = 0; f < t0.fields.size(); ++f)
    fields.push_back(t0.is_int[f] ? FieldSpec{t0.fields[f], DType::kInt64, {}}
                                  : FieldSpec{t0.fields[f], DType::kUInt8, {-1}});
  impl->describe_in_place(DatasetFormat::kTar, std::move(fields), first, total);
  return std::shared_ptr<Dataset>(new Dataset(std::move(impl)));
}

}  // namespace sluice
