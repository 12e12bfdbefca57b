#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>

namespace sluice::detail {

/// Owns one file descriptor. Move-only; closes on destruction.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() {
    int fd = fd_;
    fd_ = -1;
    return fd;
  }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

/// Opens `path` with `flags` (O_CLOEXEC added); throws Error naming the path on failure.
UniqueFd open_file(const std::filesystem::path& path, int flags, unsigned mode = 0644);

/// Reads exactly buf.size() bytes at `offset`, retrying EINTR and short reads. Returns the
/// bytes read, which is less than requested only at end of file. Throws on other errors,
/// naming `what`.
size_t pread_full(int fd, std::span<std::byte> buf, uint64_t offset, const std::string& what);

/// Writes all of `buf` at the current position (or at `offset` when >= 0); throws on error.
void write_full(int fd, std::span<const std::byte> buf, const std::string& what,
                int64_t offset = -1);

void fsync_or_throw(int fd, const std::string& what);
/// fsyncs a directory so that renames and new entries in it are durable.
void fsync_dir(const std::filesystem::path& dir);
/// Makes the directory `staging` visible as `dir` in one step: renamed into place, or exchanged
/// with an existing `dir` (renameat2 RENAME_EXCHANGE), which is then removed. The parent is
/// fsynced when `durable`. Throws naming both paths.
void replace_dir(const std::filesystem::path& staging, const std::filesystem::path& dir,
                 bool durable);
uint64_t file_size(int fd, const std::string& what);

/// Makes room for `count` more open descriptors (plus a margin) under RLIMIT_NOFILE: raises the
/// soft limit toward the hard one when needed, saying so once. Throws Error(kIo) naming `what`
/// and how many are needed when even the hard limit is too low.
void reserve_descriptors(uint64_t count, const std::string& what);

}  // namespace sluice::detail
