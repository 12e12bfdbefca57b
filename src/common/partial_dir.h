#pragma once

// A writer's staging directory beside the directory it becomes (a checkpoint, an embedding
// table), and the removal of those that writers killed midway left.

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace sluice::detail {

/// A staging directory, `.NAME.partial-XXXXXX` beside the directory `NAME` it is renamed to,
/// made with the umask's permissions. While this object lives it holds an flock on the
/// directory, so that remove_partial_dirs in any process leaves it alone; rename it into place
/// before letting go.
class PartialDir {
 public:
  PartialDir(std::filesystem::path path, int lock_fd) : path_(std::move(path)), fd_(lock_fd) {}
  PartialDir(PartialDir&& other) noexcept;
  PartialDir& operator=(PartialDir&& other) noexcept;
  PartialDir(const PartialDir&) = delete;
  PartialDir& operator=(const PartialDir&) = delete;
  ~PartialDir() { release(); }

  const std::filesystem::path& path() const { return path_; }
  operator const std::filesystem::path&() const { return path_; }
  /// Lets go of the lock (a published directory is no longer a partial one).
  void release();

 private:
  std::filesystem::path path_;
  int fd_ = -1;
};

/// A fresh staging directory for `dir`, locked (see PartialDir).
PartialDir make_partial_dir(const std::filesystem::path& dir);

/// Removes the staging directories that writers which never finished (killed midway) left in
/// `dir`'s parent, under any name: each one no process holds (its flock is free). Where the
/// file system has no flock, only `dir`'s own are removed, so call it when no writer of `dir`
/// is running. Says what it removed in one log line starting with `what` ("checkpoint");
/// returns their names, sorted.
std::vector<std::string> remove_partial_dirs(const std::filesystem::path& dir,
                                             std::string_view what);

}  // namespace sluice::detail
