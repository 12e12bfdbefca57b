// The directory source: a dataset on a (slow) shared file system, read with pread.

#include "common/errors.h"
#include "common/file.h"
#include "source/detail/s3.h"
#include "source/source.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <filesystem>
#include <mutex>
#include <thread>

namespace sluice::source {
namespace {

namespace fs = std::filesystem;
using sluice::detail::fail;
using sluice::detail::fail_errno;

// A file's version: its modification and change times and inode (a rewrite in place moves the
// times; a replacement by rename, the inode).
std::string version(const fs::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) fail_errno(errno, "stat " + path.string());
  return fmt::format("{}.{:09}-{}.{:09}-{}", st.st_mtim.tv_sec, st.st_mtim.tv_nsec,
                     st.st_ctim.tv_sec, st.st_ctim.tv_nsec, st.st_ino);
}

class DirSource final : public Source {
 public:
  DirSource(std::string path, const SourceOptions& options)
      : url_(std::move(path)), max_in_flight_(std::max(1u, options.max_in_flight)) {
    std::error_code ec;
    if (fs::is_regular_file(url_, ec)) {  // one file (a token file): its key is ""
      objects_.push_back({"", fs::file_size(url_, ec), version(url_)});
      if (ec) fail_errno(ec.value(), "stat " + url_);
      fds_ = std::vector<std::atomic<int>>(1);
      fds_[0].store(-1, std::memory_order_relaxed);
      return;
    }
    fs::directory_options opts = fs::directory_options::follow_directory_symlink;
    fs::recursive_directory_iterator it(url_, opts, ec);
    if (ec) fail_errno(ec.value(), "list " + url_);
    for (; it != fs::recursive_directory_iterator(); it.increment(ec)) {
      if (ec) fail_errno(ec.value(), "list " + url_);
      std::error_code sec;
      if (!it->is_regular_file(sec)) continue;  // follows symlinks; skips dirs, sockets, fifos
      uint64_t size = it->file_size(sec);
      if (sec) fail_errno(sec.value(), "stat " + it->path().string());
      objects_.push_back(
          {fs::relative(it->path(), url_).generic_string(), size, version(it->path())});
    }
    if (ec) fail_errno(ec.value(), "list " + url_);
    if (objects_.empty()) fail(ErrorCode::kNotFound, "{}: no files in the directory", url_);
    std::sort(objects_.begin(), objects_.end(),
              [](const Object& a, const Object& b) { return a.key < b.key; });
    fds_ = std::vector<std::atomic<int>>(objects_.size());
    for (auto& fd : fds_) fd.store(-1, std::memory_order_relaxed);
  }

  ~DirSource() override {
    for (auto& fd : fds_)
      if (int f = fd.load(); f >= 0) ::close(f);
  }

  const std::string& url() const override { return url_; }
  const std::vector<Object>& objects() const override { return objects_; }

  void read(std::span<const Range> ranges) override {
    for (const Range& r : ranges) check(r);
    size_t threads = std::min<size_t>(max_in_flight_, ranges.size());
    if (threads <= 1) {
      for (const Range& r : ranges) read_one(r);
      return;
    }
    // A shared file system answers many reads at once faster than one after another.
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;
    std::mutex mu;
    auto work = [&] {
      for (size_t i; !failed.load() && (i = next.fetch_add(1)) < ranges.size();) {
        try {
          read_one(ranges[i]);
        } catch (...) {
          std::lock_guard lock(mu);
          if (!error) error = std::current_exception();
          failed = true;
        }
      }
    };
    {
      std::vector<std::jthread> pool;
      for (size_t t = 1; t < threads; ++t) pool.emplace_back(work);
      work();
    }
    if (error) std::rethrow_exception(error);
  }

  std::vector<std::byte> get(uint32_t object) override {
    if (object >= objects_.size())
      fail(ErrorCode::kInvalidArgument, "{}: no object {} (has {})", url_, object, objects_.size());
    const Object& o = objects_[object];
    std::vector<std::byte> out(o.size + 1);
    std::string what = name(object);
    size_t n = sluice::detail::pread_full(fd(object), out, 0, what);
    if (n != o.size)
      fail(ErrorCode::kCorruption, "read {}: {} bytes where {} were listed (changed since opened?)",
           what, n > o.size ? "more" : std::to_string(n), o.size);
    out.resize(n);
    bytes_read_ += n;
    requests_ += 1;
    return out;
  }

  uint64_t bytes_read() const override { return bytes_read_.load(); }
  uint64_t requests() const override { return requests_.load(); }
  uint64_t retries() const override { return 0; }

 private:
  std::string name(uint32_t object) const override {
    return objects_[object].key.empty() ? url_ : (fs::path(url_) / objects_[object].key).string();
  }

  // The file's descriptor, opened on first use and kept (a shared file system's open is slow).
  int fd(uint32_t object) {
    int f = fds_[object].load(std::memory_order_acquire);
    if (f >= 0) return f;
    sluice::detail::UniqueFd opened = sluice::detail::open_file(name(object), O_RDONLY);
    int expected = -1;
    if (fds_[object].compare_exchange_strong(expected, opened.get(), std::memory_order_acq_rel))
      return opened.release();
    return expected;  // another thread won; ours closes
  }

  void read_one(const Range& r) {
    if (r.length == 0) return;
    std::string what = name(r.object);
    size_t n = sluice::detail::pread_full(fd(r.object), {r.dest, r.length}, r.offset, what);
    bytes_read_ += n;
    requests_ += 1;
    if (n != r.length)
      fail(ErrorCode::kCorruption,
           "read {} [{}+{}]: unexpected end of file after {} bytes (file truncated?)", what,
           r.offset, r.length, n);
  }

  std::string url_;
  unsigned max_in_flight_;
  std::vector<Object> objects_;
  std::vector<std::atomic<int>> fds_;
  std::atomic<uint64_t> bytes_read_{0}, requests_{0};
};

}  // namespace

std::unique_ptr<Source> detail::open_dir(const std::string& path, const SourceOptions& options) {
  return std::make_unique<DirSource>(path, options);
}

}  // namespace sluice::source
