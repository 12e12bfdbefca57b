// The sources read in place, opened by Dataset::open_source (which also tells the formats
// apart): npy and tokens (one file, computed extents), a files tree (listed once), WebDataset
// tar shards (tar_index.h). Each fills in a Dataset::Impl (dataset_impl.h) that dataset.cc
// reads as it reads packed shards.

#include "common/errors.h"
#include "common/file.h"
#include "common/log.h"
#include "format/layout.h"
#include "index/dataset_impl.h"
#include "index/internals.h"
#include "index/tar_index.h"

#include <fcntl.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstring>
#include <set>

namespace sluice {

using detail::fail;
using index::Shard;
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

using Impl = detail::DatasetInternals::Impl;

std::shared_ptr<Dataset> open_files(const fs::path& root);
std::shared_ptr<Dataset> open_tar(const fs::path& path,
                                  const std::vector<std::string>& optional_fields);

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
  return detail::DatasetInternals::make(std::move(impl));
}

namespace {

// A files tree is listed once. Labels are torchvision's ImageFolder's: the first directory
// under the root (ROOT/cat/train/a.jpg is a "cat"). Symbolic links are followed while they stay
// inside the root (a class directory linked from elsewhere in the tree, a deduplicated file);
// one that leads out of it is skipped, with a warning, and never read (reads open files with
// RESOLVE_BENEATH, so a link changed later cannot lead out either). Hidden entries are skipped.
std::shared_ptr<Dataset> open_files(const fs::path& root) {
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
  return detail::DatasetInternals::make(std::move(impl));
}

std::shared_ptr<Dataset> open_tar(const fs::path& path,
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
  return detail::DatasetInternals::make(std::move(impl));
}

}  // namespace

}  // namespace sluice
