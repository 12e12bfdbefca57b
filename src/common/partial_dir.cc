#include "common/partial_dir.h"

#include "common/errors.h"
#include "common/file.h"
#include "common/log.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <string_view>
#include <system_error>
#include <utility>

namespace sluice::detail {

namespace fs = std::filesystem;

namespace {
constexpr std::string_view kPartial = ".partial-";
constexpr size_t kSuffix = 6;  // random characters after kPartial

std::string partial_prefix(const fs::path& dir) {
  return fmt::format(".{}{}", dir.filename().string(), kPartial);
}
fs::path parent_of(const fs::path& dir) {
  return dir.parent_path().empty() ? fs::path(".") : dir.parent_path();
}
// `.NAME.partial-XXXXXX`, as make_partial_dir names them.
bool is_partial_name(const std::string& name) {
  const size_t at = name.rfind(kPartial);
  return name.size() > 1 && name[0] == '.' && at != std::string::npos && at > 1 &&
         name.size() == at + kPartial.size() + kSuffix;
}
}  // namespace

PartialDir::PartialDir(PartialDir&& other) noexcept
    : path_(std::move(other.path_)), fd_(std::exchange(other.fd_, -1)) {}

PartialDir& PartialDir::operator=(PartialDir&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

void PartialDir::release() {
  if (fd_ >= 0) ::close(fd_);  // closing drops the flock
  fd_ = -1;
}

PartialDir make_partial_dir(const fs::path& dir) {
  if (dir.filename().empty())
    fail(ErrorCode::kInvalidArgument, "{}: names no directory", dir.string());
  std::error_code ec;
  fs::create_directories(parent_of(dir), ec);
  static constexpr char kChars[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  std::random_device rd;
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::string name = partial_prefix(dir);
    for (size_t i = 0; i < kSuffix; ++i) name += kChars[rd() % (sizeof kChars - 1)];
    const fs::path path = parent_of(dir) / name;
    if (::mkdir(path.c_str(), 0777) != 0) {  // 0777 less the umask, as the checkpoint's parent
      if (errno == EEXIST) continue;
      fail_errno(errno, "make " + path.string());
    }
    const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) detail::fail_errno(errno, "open " + path.string());
    PartialDir made(path, fd);
    if (::flock(fd, LOCK_EX) != 0) {
      if (errno == ENOLCK || errno == EOPNOTSUPP || errno == EINVAL) return made;  // no flock
      fail_errno(errno, "lock " + path.string());
    }
    // A cleaner that found the directory unlocked between mkdir and flock removed it while
    // holding the lock we waited for: then start again under another name.
    struct stat by_fd {};
    struct stat by_path {};
    if (::fstat(fd, &by_fd) == 0 && ::stat(path.c_str(), &by_path) == 0 &&
        by_fd.st_ino == by_path.st_ino && by_fd.st_dev == by_path.st_dev)
      return made;
  }
  fail(ErrorCode::kIo, "could not make a staging directory beside {}", dir.string());
}

std::vector<std::string> remove_partial_dirs(const fs::path& dir, std::string_view what) {
  std::vector<std::string> removed;
  std::error_code ec;
  const std::string own = partial_prefix(dir);
  for (const auto& e : fs::directory_iterator(parent_of(dir), ec)) {
    const std::string name = e.path().filename().string();
    std::error_code tec;
    if (!is_partial_name(name) || !e.is_directory(tec)) continue;
    detail::UniqueFd fd(::open(e.path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (fd.get() < 0) continue;  // gone meanwhile: its save finished or another process removed it
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      if (errno == EWOULDBLOCK) continue;    // a save in progress holds it
      if (!name.starts_with(own)) continue;  // no flock: only dir's own
    }
    std::error_code rec;
    fs::remove_all(e.path(), rec);
    if (!rec) removed.push_back(name);
  }
  std::sort(removed.begin(), removed.end());
  if (!removed.empty()) {
    std::string list;
    for (const auto& n : removed) list += (list.empty() ? "" : ", ") + n;
    log_line(fmt::format("{}: removed {} unfinished staging director{} in {}: {}", what,
                         removed.size(), removed.size() == 1 ? "y" : "ies", parent_of(dir).string(),
                         list));
  }
  return removed;
}

}  // namespace sluice::detail
