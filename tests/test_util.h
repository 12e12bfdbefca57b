#pragma once

#include <sluice/sluice.h>

#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace sluice::testing {

/// What f() threw as a sluice::Error ("" when nothing), its code into `code`.
inline std::string message_of(const std::function<void()>& f, ErrorCode* code = nullptr) {
  try {
    f();
  } catch (const Error& e) {
    if (code) *code = e.code();
    return e.what();
  }
  return "";
}

/// A disk that fills up: a tmpfs of `size` ("1m") at `at`, in a mount namespace of this test
/// process's own (nothing outside sees it; it goes with the process; ctest runs each test in a
/// process of its own). Needs CAP_SYS_ADMIN, as root has. Returns "" or why it could not.
inline std::string mount_small_disk(const std::filesystem::path& at, const std::string& size) {
  std::filesystem::create_directories(at);
  if (unshare(CLONE_NEWNS) != 0) return std::string("unshare(CLONE_NEWNS): ") + strerror(errno);
  if (mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0)
    return std::string("mount --make-rprivate /: ") + strerror(errno);
  if (mount("tmpfs", at.c_str(), "tmpfs", 0, ("size=" + size).c_str()) != 0)
    return std::string("mount tmpfs: ") + strerror(errno);
  return "";
}

/// A fresh directory under $TMPDIR, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "sluice-test-XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

/// Deterministic sample bytes: sample i's field f has length and content derived from (i, f).
inline std::vector<std::byte> sample_bytes(uint64_t index, size_t field, size_t length) {
  std::vector<std::byte> out(length);
  std::mt19937_64 rng(index * 1315423911u + field);
  for (auto& b : out) b = static_cast<std::byte>(rng());
  return out;
}

/// Writes a dataset of `n` samples with a variable-size "data" field (0..max_bytes bytes) and
/// an int64 "label"; returns the bytes written per sample for checking.
inline std::vector<std::vector<std::byte>> write_dataset(const std::filesystem::path& dir,
                                                         uint64_t n, size_t max_bytes,
                                                         uint64_t shard_bytes = 64 << 10,
                                                         uint32_t alignment = 4096) {
  WriterOptions options;
  options.fields = {{"data", DType::kUInt8, {-1}}, {"label", DType::kInt64, {}}};
  options.shard_bytes = shard_bytes;
  options.alignment = alignment;
  auto writer = DatasetWriter::create(dir, options);
  std::vector<std::vector<std::byte>> data;
  for (uint64_t i = 0; i < n; ++i) {
    data.push_back(sample_bytes(i, 0, (i * 7919) % (max_bytes + 1)));
    auto label = static_cast<int64_t>(i % 10);
    std::span<const std::byte> fields[] = {data.back(), std::as_bytes(std::span(&label, 1))};
    EXPECT_EQ(writer->add(fields), i);
  }
  writer->finish();
  return data;
}

/// DirectIo::kOn where `dir`'s file system takes O_DIRECT reads, else kOff: for tests of the
/// O_DIRECT paths, which `auto` no longer picks for data that fits in memory.
inline DirectIo direct_where_possible(const std::filesystem::path& dir) {
  const std::string probe = (dir / ".direct-probe").string();
  int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return DirectIo::kOff;
  std::vector<char> block(4096, 'x');
  bool ok = ::write(fd, block.data(), block.size()) == 4096;
  ::close(fd);
  fd = ::open(probe.c_str(), O_RDONLY | O_DIRECT);
  void* buf = nullptr;
  ok =
      ok && fd >= 0 && ::posix_memalign(&buf, 4096, 4096) == 0 && ::pread(fd, buf, 4096, 0) == 4096;
  std::free(buf);
  if (fd >= 0) ::close(fd);
  ::unlink(probe.c_str());
  return ok ? DirectIo::kOn : DirectIo::kOff;
}

/// "127.0.0.1:PORT" for a port that was free a moment ago (bound, then closed), and nobody
/// listens on.
inline std::string free_loopback_address() {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
      ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) != 0)
    throw std::runtime_error("free_loopback_address: bind failed");
  ::close(s);
  return "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
}

}  // namespace sluice::testing
