#include "common/check.h"
#include "common/errors.h"
#include "common/file.h"
#include "format/layout.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

namespace sluice {

using detail::fail;
namespace fs = std::filesystem;

namespace {

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
  format::Manifest manifest;
  std::vector<ShardInfo> infos;
  std::vector<Shard> shards;
  std::vector<uint64_t> first_samples;  // per shard, for the binary search in extent()
  format::RecordLayout layout{{}};

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
  for (uint32_t i = 0; i < impl->manifest.shards.size(); ++i)
    impl->open_shard(i, options.allow_absent_shards);
  return std::shared_ptr<Dataset>(new Dataset(std::move(impl)));
}

const fs::path& Dataset::path() const { return impl_->dir; }
uint64_t Dataset::num_samples() const { return impl_->manifest.num_samples; }
uint64_t Dataset::total_bytes() const { return impl_->manifest.total_bytes; }
uint32_t Dataset::alignment() const { return impl_->manifest.alignment; }
uint32_t Dataset::format_version() const { return impl_->manifest.version; }
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
  size_t n = detail::pread_full(shard_fd(x.shard), record, x.offset, path);
  if (n != x.size)
    fail(ErrorCode::kCorruption, "{}: sample {}: truncated: read {} of {} bytes at offset {}", path,
         index, n, x.size, x.offset);
  uint32_t sum = format::record_checksum(record.data(), record.size(), index);
  if (sum != x.checksum)
    fail(ErrorCode::kCorruption,
         "{}: sample {}: checksum mismatch (stored {:08x}, computed {:08x})", path, index,
         x.checksum, sum);
  return x.size;
}

SampleFields Dataset::parse_record(uint64_t index, std::span<const std::byte> record) const {
  SampleFields out;
  if (auto why = impl_->layout.split(record, out.fields); !why.empty())
    fail(ErrorCode::kCorruption, "{}: sample {}: {}", impl_->dir.string(), index, why);
  return out;
}

std::vector<std::string> Dataset::verify(
    const std::function<void(uint64_t, uint64_t)>& progress) const {
  std::vector<std::string> problems;
  uint64_t total = total_bytes(), done = 0;
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
      uint32_t sum = format::record_checksum(record.data(), record.size(), index);
      if (sum != e.checksum)
        problems.push_back(
            fmt::format("{}: sample {}: checksum mismatch (stored {:08x}, computed "
                        "{:08x})",
                        path, index, e.checksum, sum));
      else if (auto why = impl_->layout.split(record, fields); !why.empty())
        problems.push_back(fmt::format("{}: sample {}: {}", path, index, why));
      done += e.size;
      if (progress && (local & 0xfff) == 0) progress(done, total);
    }
  }
  if (progress) progress(done, total);
  return problems;
}

}  // namespace sluice
