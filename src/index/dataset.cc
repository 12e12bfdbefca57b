// Packed shards (open), and what every Dataset answers whichever opener made it: extents,
// records, their fields, a files tree's samples, verify. The sources read in place are opened
// in in_place.cc.

#include "common/check.h"
#include "common/errors.h"
#include "common/file.h"
#include "format/layout.h"
#include "index/dataset_impl.h"
#include "index/internals.h"

#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

namespace sluice {

using detail::fail;
using index::Shard;
namespace fs = std::filesystem;

index::Shard::~Shard() {
  if (map) ::munmap(map, map_bytes);
}

void Dataset::Impl::open_shard(uint32_t id, bool allow_absent) {
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
    fail(ErrorCode::kCorruption, "{}: file is {} bytes, its header says {} (appended to?)", source,
         size, h.file_bytes);
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

int Dataset::Impl::shard_fd(uint32_t shard) const {
  SLUICE_CHECK(shard < shards.size());
  return shards[shard].fd.get();
}

uint32_t Dataset::Impl::shard_of(uint64_t index) const {
  if (index >= manifest.num_samples)
    fail(ErrorCode::kInvalidArgument, "{}: sample {} out of range (dataset has {})", dir.string(),
         index, manifest.num_samples);
  const auto& firsts = first_samples;
  return static_cast<uint32_t>(std::upper_bound(firsts.begin(), firsts.end(), index) -
                               firsts.begin() - 1);
}

SampleExtent Dataset::extent(uint64_t index) const {
  const uint32_t shard = impl_->shard_of(index);
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
  if (impl_->files) file = detail::UniqueFd(impl_->open_sample(index, false));
  size_t n =
      detail::pread_full(file ? file.get() : impl_->shard_fd(x.shard), record, x.offset, path);
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
  if (auto why = impl_->split_record(index, record, out.fields); !why.empty())
    fail(ErrorCode::kCorruption, "{}: sample {}: {}", impl_->dir.string(), index, why);
  return out;
}

std::string Dataset::Impl::split_record(uint64_t index, std::span<const std::byte> record,
                                        std::vector<std::span<const std::byte>>& fields) const {
  if (const auto& f = files) {  // the file's bytes, and the label from its directory
    fields.assign({record, std::as_bytes(std::span(&f->labels[index], 1))});
    return "";
  }
  if (!tars.empty()) {  // each member's place in the sample's span, from the index
    const uint32_t shard = shard_of(index);
    const auto& t = tars[shard];
    const uint64_t local = index - first_samples[shard];
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
  auto split = layout.split(record, fields);
  return split ? "" : split.error();
}

std::string Dataset::sample_key(uint64_t index) const {
  if (impl_->files) return std::string(impl_->sample_file(index));
  if (impl_->tars.empty()) return {};
  const uint32_t shard = impl_->shard_of(index);
  return impl_->tars[shard].keys[index - impl_->first_samples[shard]];
}

std::string_view Dataset::Impl::sample_file(uint64_t index) const {
  const auto& f = files;
  if (!f || index >= manifest.num_samples) return {};
  return std::string_view(f->names).substr(f->name_at[index],
                                           f->name_at[index + 1] - f->name_at[index]);
}

int Dataset::Impl::open_sample(uint64_t index, bool direct) const {
  std::string name(sample_file(index));
  if (name.empty())
    fail(ErrorCode::kInvalidArgument, "{}: sample {}: not a files dataset", dir.string(), index);
  // RESOLVE_BENEATH: no path (nor a link replaced since the listing) leads out of the tree.
  open_how how{};
  how.flags = O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0);
  how.resolve = RESOLVE_BENEATH;
  int fd =
      static_cast<int>(::syscall(SYS_openat2, shards[0].fd.get(), name.c_str(), &how, sizeof how));
  if (fd < 0 && errno == ENOSYS)  // before Linux 5.6: the listing's check stands alone
    fd = ::openat(shards[0].fd.get(), name.c_str(), static_cast<int>(how.flags));
  const std::string path = (dir / name).string();
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
  const uint64_t listed = files->sizes[index];
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
        if (auto why = impl_->split_record(index, record, fields); !why.empty())
          problems.push_back(fmt::format("{}: sample {}: {}",
                                         (impl_->files ? impl_->dir / impl_->sample_file(index)
                                                       : impl_->infos[impl_->shard_of(index)].path)
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

std::shared_ptr<Dataset> detail::DatasetInternals::make(std::unique_ptr<Impl> impl) {
  return std::shared_ptr<Dataset>(new Dataset(std::move(impl)));
}

namespace index {

int shard_fd(const Dataset& d, uint32_t shard) {
  return detail::DatasetInternals::impl(d).shard_fd(shard);
}
uint32_t shard_of(const Dataset& d, uint64_t index) {
  return detail::DatasetInternals::impl(d).shard_of(index);
}
Status split_record(const Dataset& d, uint64_t index, std::span<const std::byte> record,
                    std::vector<std::span<const std::byte>>& fields) {
  std::string why = detail::DatasetInternals::impl(d).split_record(index, record, fields);
  if (!why.empty()) return failure(std::move(why));
  return {};
}
std::string_view sample_file(const Dataset& d, uint64_t index) {
  return detail::DatasetInternals::impl(d).sample_file(index);
}
int open_sample(const Dataset& d, uint64_t index, bool direct) {
  return detail::DatasetInternals::impl(d).open_sample(index, direct);
}

}  // namespace index

}  // namespace sluice
