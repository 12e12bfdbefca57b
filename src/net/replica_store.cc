#include "net/replica_store.h"

#include <sluice/error.h>

#include "common/errors.h"
#include "common/file.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <set>

namespace sluice::net {

namespace fs = std::filesystem;
using detail::fail;

namespace {

constexpr std::string_view kPartSuffix = ".part.sluice";
// Beside each committed file: "SIZE CHECKSUM" (decimal, 16 hex digits), the writer's
// FileChecksum that the file's bytes matched at its commit.
constexpr std::string_view kSumSuffix = ".sum.sluice";

// The FileChecksum of the first `size` bytes of `fd`.
uint64_t checksum_of(int fd, uint64_t size, const std::string& path) {
  FileChecksum sum;
  std::vector<std::byte> buf(std::min<uint64_t>(size, kMaxCheckpointChunk));
  for (uint64_t at = 0; at < size;) {
    const auto block = std::span(buf).first(std::min<uint64_t>(buf.size(), size - at));
    if (detail::pread_full(fd, block, at, path) != block.size())
      fail(ErrorCode::kIo, "{}: ends before {} bytes (changed meanwhile?)", path, size);
    sum.update(block);
    at += block.size();
  }
  return sum.digest();
}

}  // namespace

ReplicaStore::ReplicaStore(fs::path root) : root_(std::move(root)) {
  std::error_code ec;
  fs::create_directories(root_, ec);
  if (ec || !fs::is_directory(root_))
    fail(ErrorCode::kIo, "checkpoint copies: cannot make {}: {}", root_.string(),
         ec ? ec.message() : "not a directory");
}

fs::path ReplicaStore::incoming(const std::string& checkpoint) const {
  return root_ / fmt::format(".{}.incoming", checkpoint);
}

void ReplicaStore::write(const CheckpointRequest& r) {
  const fs::path dir = incoming(r.checkpoint);
  {
    std::lock_guard lock(mu_);
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) fail(ErrorCode::kIo, "make {}: {}", dir.string(), ec.message());
  }
  const fs::path part = dir / (r.file + std::string(kPartSuffix));
  auto fd = detail::open_file(part, O_WRONLY | O_CREAT);
  detail::write_full(fd.get(), r.payload, part.string(), static_cast<int64_t>(r.header.offset));
  // Writeback starts now rather than at the commit's fsync, which then finds little left (a
  // hint: a failed writeback is reported by that fsync).
  ::sync_file_range(fd.get(), static_cast<off_t>(r.header.offset),
                    static_cast<off_t>(r.payload.size()), SYNC_FILE_RANGE_WRITE);
}

void ReplicaStore::commit(const CheckpointRequest& r) {
  const fs::path dir = incoming(r.checkpoint);
  const fs::path part = dir / (r.file + std::string(kPartSuffix));
  std::error_code ec;
  if (!fs::exists(part, ec))
    fail(ErrorCode::kNotFound, "{}/{}: nothing of it arrived", r.checkpoint, r.file);
  auto fd = detail::open_file(part, O_RDWR);
  // Bytes past the end are an earlier attempt's; every byte below was written by this one (the
  // writer commits only after each of its chunks was acknowledged).
  const uint64_t have = detail::file_size(fd.get(), part.string());
  if (have < r.header.length)
    fail(ErrorCode::kInvalidArgument, "{}/{}: {} bytes arrived, the commit says {}", r.checkpoint,
         r.file, have, r.header.length);
  if (have > r.header.length && ::ftruncate(fd.get(), static_cast<off_t>(r.header.length)) != 0)
    detail::fail_errno(errno, "truncate " + part.string());
  // Every chunk was checked as it came; this checks they make the writer's file (none missing,
  // none from an earlier attempt) and keeps the checksum for restores to check against.
  if (checksum_of(fd.get(), r.header.length, part.string()) != r.header.checksum)
    fail(ErrorCode::kInvalidArgument,
         "{}/{}: the {} bytes that arrived do not match the writer's checksum of the file (a "
         "chunk missing or out of place)",
         r.checkpoint, r.file, r.header.length);
  detail::fsync_or_throw(fd.get(), part.string());
  {
    const fs::path sum = dir / (r.file + std::string(kSumSuffix));
    auto out = detail::open_file(sum, O_WRONLY | O_CREAT | O_TRUNC);
    const std::string text = fmt::format("{} {:016x}\n", r.header.length, r.header.checksum);
    detail::write_full(out.get(), std::as_bytes(std::span(text)), sum.string(), 0);
    detail::fsync_or_throw(out.get(), sum.string());
  }
  const fs::path done = dir / r.file;
  if (::rename(part.c_str(), done.c_str()) != 0)
    detail::fail_errno(errno, fmt::format("rename {} to {}", part.string(), done.string()));
}

void ReplicaStore::publish(const CheckpointRequest& r) {
  std::set<std::string> files;
  std::string_view list(reinterpret_cast<const char*>(r.payload.data()), r.payload.size());
  while (!list.empty()) {
    const size_t nl = list.find('\n');
    std::string_view name = list.substr(0, nl);
    list = nl == std::string_view::npos ? std::string_view() : list.substr(nl + 1);
    if (name.empty()) continue;
    if (!valid_checkpoint_name(name, true))
      fail(ErrorCode::kInvalidArgument, "{}: publish names a file outside [A-Za-z0-9._-]",
           r.checkpoint);
    files.emplace(name);
  }
  if (files.empty()) fail(ErrorCode::kInvalidArgument, "{}: publish names no file", r.checkpoint);
  std::lock_guard lock(mu_);
  const fs::path dir = incoming(r.checkpoint);
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    fail(ErrorCode::kNotFound, "{}: nothing of it arrived", r.checkpoint);
  for (const std::string& f : files)
    if (!fs::is_regular_file(dir / f, ec))
      fail(ErrorCode::kInvalidArgument,
           "{}: publish names {}, which was not committed (a writer "
           "failed or has not finished)",
           r.checkpoint, f);
  // What an earlier attempt left (files this save does not name, parts never committed) goes;
  // the named files' checksums stay.
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::string name = e.path().filename().string();
    if (name.ends_with(kSumSuffix)) name.resize(name.size() - kSumSuffix.size());
    if (!files.contains(name)) fs::remove_all(e.path(), ec);
  }
  detail::fsync_dir(dir);
  detail::replace_dir(dir, root_ / r.checkpoint, /*durable=*/true);
}

std::string ReplicaStore::list(const std::string& checkpoint) const {
  const fs::path dir = root_ / checkpoint;
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    fail(ErrorCode::kNotFound, "no copy of checkpoint {} here", checkpoint);
  std::string out;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_regular_file() || name.ends_with(".sluice")) continue;
    // The size and checksum taken at the commit; a file whose size moved since is damaged.
    std::string text(64, '\0');
    uint64_t size = 0, sum = 0;
    {
      const fs::path path = dir / (name + std::string(kSumSuffix));
      std::error_code sec;
      if (!fs::is_regular_file(path, sec))
        fail(ErrorCode::kCorruption,
             "{}/{}: no checksum beside it (a copy from before checksums, "
             "or damaged): save the checkpoint again",
             checkpoint, name);
      auto fd = detail::open_file(path, O_RDONLY);
      text.resize(
          detail::pread_full(fd.get(), std::as_writable_bytes(std::span(text)), 0, path.string()));
    }
    if (std::sscanf(text.c_str(), "%" SCNu64 " %" SCNx64, &size, &sum) != 2 ||
        size != e.file_size())
      fail(ErrorCode::kCorruption, "{}/{}: {} bytes on disk, its checksum file says \"{}\"",
           checkpoint, name, e.file_size(), text.substr(0, 40));
    out += fmt::format("{} {:016x} {}\n", size, sum, name);
  }
  return out;
}

void ReplicaStore::read(const CheckpointRequest& r, std::span<std::byte> out) const {
  const fs::path path = root_ / r.checkpoint / r.file;
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    fail(ErrorCode::kNotFound, "no copy of {}/{} here", r.checkpoint, r.file);
  auto fd = detail::open_file(path, O_RDONLY);
  const size_t got = detail::pread_full(fd.get(), out, r.header.offset, path.string());
  if (got != out.size())
    fail(ErrorCode::kInvalidArgument, "{}/{}: [{}+{}] is past its end", r.checkpoint, r.file,
         r.header.offset, out.size());
}

}  // namespace sluice::net
