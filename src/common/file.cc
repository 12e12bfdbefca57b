#include "common/file.h"

#include "common/errors.h"
#include "common/log.h"

#include <fcntl.h>
#include <stdio.h>  // renameat2, RENAME_EXCHANGE
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

namespace sluice::detail {

UniqueFd& UniqueFd::operator=(UniqueFd&& other) noexcept {
  if (this != &other) reset(other.release());
  return *this;
}

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

UniqueFd open_file(const std::filesystem::path& path, int flags, unsigned mode) {
  int fd;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) fail_errno(errno, "open " + path.string());
  return UniqueFd(fd);
}

size_t pread_full(int fd, std::span<std::byte> buf, uint64_t offset, const std::string& what) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n =
        ::pread(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      fail_errno(errno, fmt::format("read {} [{}+{}]", what, offset, buf.size()));
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

void write_full(int fd, std::span<const std::byte> buf, const std::string& what, int64_t offset) {
  size_t done = 0;
  while (done < buf.size()) {
    ssize_t n = offset < 0 ? ::write(fd, buf.data() + done, buf.size() - done)
                           : ::pwrite(fd, buf.data() + done, buf.size() - done,
                                      static_cast<off_t>(offset) + static_cast<off_t>(done));
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      fail_errno(errno, "write " + what);
    }
    done += static_cast<size_t>(n);
  }
}

void fsync_or_throw(int fd, const std::string& what) {
  if (::fsync(fd) != 0) fail_errno(errno, "fsync " + what);
}

void fsync_dir(const std::filesystem::path& dir) {
  UniqueFd fd = open_file(dir, O_RDONLY | O_DIRECTORY);
  fsync_or_throw(fd.get(), dir.string());
}

void replace_dir(const std::filesystem::path& staging, const std::filesystem::path& dir,
                 bool durable) {
  namespace fs = std::filesystem;
  const fs::path parent = dir.parent_path().empty() ? fs::path(".") : dir.parent_path();
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    if (::rename(staging.c_str(), dir.c_str()) != 0)
      fail_errno(errno, "rename " + staging.string() + " to " + dir.string());
  } else {
    // Both names stay valid throughout: the old directory is under `staging` afterwards.
    if (::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) != 0)
      fail_errno(errno, "exchange " + staging.string() + " with " + dir.string());
    if (durable) fsync_dir(parent);
    fs::remove_all(staging, ec);
  }
  if (durable) fsync_dir(parent);
}

uint64_t file_size(int fd, const std::string& what) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail_errno(errno, "stat " + what);
  return static_cast<uint64_t>(st.st_size);
}

void reserve_descriptors(uint64_t count, const std::string& what) {
  constexpr uint64_t kMargin = 64;  // sockets, the IO engine's ring, files the program has open
  uint64_t open_now = 0;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator("/proc/self/fd", ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec))
    ++open_now;
  const uint64_t want = open_now + count + kMargin;
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur == RLIM_INFINITY ||
      lim.rlim_cur >= want)
    return;
  if (lim.rlim_max != RLIM_INFINITY && lim.rlim_max < want)
    fail(ErrorCode::kIo,
         "{} needs about {} open files ({} of its own, {} open already), but this process may "
         "open {} (ulimit -n, hard limit {}): raise the limit, e.g. ulimit -n {}",
         what, want, count, open_now, lim.rlim_cur, lim.rlim_max, want);
  const rlim_t before = lim.rlim_cur;
  lim.rlim_cur = want;
  if (::setrlimit(RLIMIT_NOFILE, &lim) == 0)
    log_line(fmt::format("{}: raised the open-file limit from {} to {} (ulimit -n)", what, before,
                         want));
}

}  // namespace sluice::detail
