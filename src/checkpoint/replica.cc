// Checkpoint copies on a peer (include/sluice/checkpoint.h, CheckpointReplica): the client side
// of net/replica_store.h, over the shard server's authenticated UCX connection.

#include <sluice/checkpoint.h>
#include <sluice/error.h>

#include "checkpoint/files.h"
#include "common/errors.h"
#include "common/file.h"
#include "common/partial_dir.h"
#include "net/client.h"
#include "net/wire.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cstring>
#include <future>
#include <map>
#include <thread>

namespace sluice {

namespace fs = std::filesystem;
using detail::fail;
using net::CheckpointHeader;
using net::CheckpointOp;
using net::RawCall;
using net::ReplyStatus;

namespace {

constexpr size_t kInFlight = 4;  // chunks on the wire at once
constexpr uint64_t kChunk = net::kMaxCheckpointChunk;
constexpr auto kLockWait = std::chrono::minutes(30);  // another process restoring the same dir

// One connection to the replica, and what its errors say.
class Replica {
  // Runs f, naming the peer, checkpoint and file in what it throws.
  template <typename F>
  auto guard(const std::string& file, F f) {
    try {
      return f();
    } catch (const Error& e) {
      throw Error(e.code(), what(file) + ": " + e.what(), e.sys_errno());
    }
  }

 public:
  Replica(const CheckpointReplica& r, std::string name) : r_(r), name_(std::move(name)) {
    if (r.address.empty())
      fail(ErrorCode::kInvalidArgument, "checkpoint copy of {}: no replica address", name_);
    if (!net::valid_checkpoint_name(name_, false))
      fail(ErrorCode::kInvalidArgument,
           "checkpoint copy of {} on peer {}: a checkpoint name is [A-Za-z0-9._-], not starting "
           "with '.'",
           name_, r.address);
    if (r.token.empty())
      fail(ErrorCode::kConfig,
           "checkpoint copy of {} on peer {}: no token (the peer takes copies only from the "
           "cluster's token holders: token, token_file or $SLUICE_TOKEN)",
           name_, r.address);
    net::ClientOptions o;
    o.token = r.token;
    o.timeout_ms = r.timeout_ms;
    client_ = guard("", [&] { return net::PeerClient::connect(r.address, o); });
  }

  // A call for `file` ("" : the checkpoint): its header, and its data (the name, then `payload`
  // bytes for the caller to fill).
  RawCall make(CheckpointOp op, const std::string& file, uint64_t offset, uint64_t length,
               std::vector<std::byte>& data, size_t payload = 0) const {
    const std::string name = file.empty() ? name_ : name_ + "/" + file;
    data.resize(name.size() + payload);
    std::memcpy(data.data(), name.data(), name.size());
    CheckpointHeader h;
    h.op = op;
    h.offset = offset;
    h.length = length;
    h.name_bytes = static_cast<uint32_t>(name.size());
    RawCall c;
    c.header.resize(sizeof h);
    std::memcpy(c.header.data(), &h, sizeof h);
    c.data = data;
    return c;
  }
  static std::span<std::byte> payload(RawCall& c, std::vector<std::byte>& data) {
    const size_t name = reinterpret_cast<const CheckpointHeader*>(c.header.data())->name_bytes;
    return std::span(data).subspan(name);
  }
  // Seals a kWrite's payload with its checksum.
  static void seal(RawCall& c, std::vector<std::byte>& data) {
    auto* h = reinterpret_cast<CheckpointHeader*>(c.header.data());
    h->checksum = net::checkpoint_chunk_checksum(payload(c, data), h->offset);
  }

  // Sends `calls`, throws for any refused.
  void call(std::span<RawCall> calls, const std::string& file) {
    guard(file, [&] { client_->call(calls); });
    for (const RawCall& c : calls) {
      if (c.status == ReplyStatus::kOk) continue;
      const std::string text(reinterpret_cast<const char*>(c.reply.data()),
                             std::min<size_t>(c.reply.size(), 1024));
      const ErrorCode code = c.status == ReplyStatus::kNotFound     ? ErrorCode::kNotFound
                             : c.status == ReplyStatus::kBadRequest ? ErrorCode::kInvalidArgument
                                                                    : ErrorCode::kIo;
      fail(code, "{}: peer says {}: {}", what(file), net::to_string(c.status), text);
    }
  }

  std::string what(const std::string& file) const {
    return fmt::format("checkpoint copy of {}{}{} on peer {}", name_, file.empty() ? "" : "/", file,
                       r_.address);
  }

 private:
  const CheckpointReplica& r_;
  std::string name_;
  std::unique_ptr<net::PeerClient> client_;
};

void check_file_name(const std::string& file, const std::string& where) {
  if (!net::valid_checkpoint_name(file, true))
    fail(ErrorCode::kInvalidArgument,
         "{}: file name \"{}\" is not [A-Za-z0-9._-] (or ends in .sluice)", where, file);
}

// A file of the replica's published copy: its size and the checksum taken at its commit.
struct CopyFile {
  uint64_t size = 0;
  uint64_t checksum = 0;
};

// The files of the replica's published copy (a "SIZE CHECKSUM FILE" line each).
std::map<std::string, CopyFile> list_copy(Replica& replica) {
  std::vector<std::byte> data;
  RawCall c = replica.make(CheckpointOp::kList, "", 0, 0, data);
  replica.call(std::span(&c, 1), "");
  std::map<std::string, CopyFile> files;
  std::string_view text(reinterpret_cast<const char*>(c.reply.data()), c.reply.size());
  while (!text.empty()) {
    const size_t nl = text.find('\n');
    const std::string_view line = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    const size_t a = line.find(' ');
    const size_t b = a == std::string_view::npos ? a : line.find(' ', a + 1);
    CopyFile f;
    const std::string file(b == std::string_view::npos ? "" : line.substr(b + 1));
    bool ok = b != std::string_view::npos && b - a - 1 == 16;  // the checksum: 16 hex digits
    if (ok) {
      auto [end, ec] = std::from_chars(line.data(), line.data() + a, f.size);
      auto [end2, ec2] = std::from_chars(line.data() + a + 1, line.data() + b, f.checksum, 16);
      ok = ec == std::errc() && end == line.data() + a && ec2 == std::errc() &&
           end2 == line.data() + b;
    }
    if (!ok || f.size > (uint64_t{1} << 50) || !net::valid_checkpoint_name(file, true))
      fail(ErrorCode::kCorruption, "{}: the peer lists \"{}\", not SIZE CHECKSUM FILE",
           replica.what(""), std::string(line.substr(0, 300)));
    files[file] = f;
  }
  if (files.empty()) fail(ErrorCode::kCorruption, "{}: the peer lists no file", replica.what(""));
  return files;
}

// Whether `dir` holds exactly `files` at their sizes.
bool matches(const fs::path& dir, const std::map<std::string, CopyFile>& files) {
  std::error_code ec;
  size_t seen = 0;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    auto it = files.find(e.path().filename().string());
    std::error_code sec;
    if (it == files.end() || !e.is_regular_file(sec) || e.file_size(sec) != it->second.size)
      return false;
    ++seen;
  }
  return !ec && seen == files.size();
}

// Holds an exclusive flock on `path` (made if missing) while alive; waits at most kLockWait.
class FileLock {
 public:
  explicit FileLock(const fs::path& path) : fd_(detail::open_file(path, O_RDWR | O_CREAT)) {
    const auto deadline = std::chrono::steady_clock::now() + kLockWait;
    while (::flock(fd_.get(), LOCK_EX | LOCK_NB) != 0) {
      if (errno != EWOULDBLOCK && errno != EINTR)
        detail::fail_errno(errno, "lock " + path.string());
      if (std::chrono::steady_clock::now() > deadline)
        fail(ErrorCode::kIo, "lock {}: held by another restore for over {} minutes", path.string(),
             std::chrono::duration_cast<std::chrono::minutes>(kLockWait).count());
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }

 private:
  detail::UniqueFd fd_;  // closing it releases the lock
};

// Fetches `files` of the replica's copy into `staging`, every chunk checked, each file fsynced.
void fetch(Replica& replica, const std::map<std::string, CopyFile>& files,
           const fs::path& staging) {
  std::vector<std::vector<std::byte>> data(kInFlight);
  std::vector<RawCall> calls;
  for (const auto& [file, listed] : files) {
    const uint64_t size = listed.size;
    net::FileChecksum whole;  // over the chunks in order: the file as its writer sent it?
    const fs::path path = staging / file;
    auto fd = detail::open_file(path, O_WRONLY | O_CREAT | O_TRUNC);
    for (uint64_t offset = 0; offset < size;) {
      calls.clear();
      std::vector<uint64_t> offsets;
      for (size_t k = 0; k < kInFlight && offset < size; ++k) {
        const uint64_t n = std::min(kChunk, size - offset);
        calls.push_back(replica.make(CheckpointOp::kRead, file, offset, n, data[k]));
        offsets.push_back(offset);
        offset += n;
      }
      replica.call(calls, file);
      for (size_t k = 0; k < calls.size(); ++k) {
        const uint64_t n =
            reinterpret_cast<const CheckpointHeader*>(calls[k].header.data())->length;
        const auto& reply = calls[k].reply;
        uint64_t sum = 0;
        if (reply.size() == n + sizeof sum) std::memcpy(&sum, reply.data() + n, sizeof sum);
        if (reply.size() != n + sizeof sum ||
            net::checkpoint_chunk_checksum(std::span(reply).first(n), offsets[k]) != sum)
          fail(ErrorCode::kCorruption,
               "{}: [{}+{}] came back damaged ({} bytes, checksum mismatch): the copy or the "
               "transfer is corrupt",
               replica.what(file), offsets[k], n, reply.size());
        whole.update(std::span(reply).first(n));
        detail::write_full(fd.get(), std::span(reply).first(n), path.string(),
                           static_cast<int64_t>(offsets[k]));
      }
    }
    if (whole.digest() != listed.checksum)
      fail(ErrorCode::kCorruption,
           "{}: the peer's copy is damaged: its {} bytes do not match the checksum taken when "
           "it was written",
           replica.what(file), size);
    detail::fsync_or_throw(fd.get(), path.string());
  }
  detail::fsync_dir(staging);
}

}  // namespace

std::string checkpoint_copy_name(const fs::path& dir) {
  fs::path abs = fs::absolute(dir).lexically_normal();
  if (abs.filename().empty()) abs = abs.parent_path();  // "a/b/" names b
  std::string base = abs.filename().string().substr(0, 200);
  for (char& c : base)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') c = '_';
  while (!base.empty() && base.front() == '.') base.front() = '_';
  const std::string& path = abs.native();
  return fmt::format("{}-{:016x}", base, XXH3_64bits(path.data(), path.size()));
}

void copy_checkpoint_files(const CheckpointReplica& r, const std::string& name, const fs::path& dir,
                           std::span<const std::string> files) {
  Replica replica(r, name);
  // Two sets of chunk buffers: one batch on the wire while the next is read from disk (the
  // read, the transfer and the peer's write took turns before).
  std::vector<std::vector<std::byte>> data[2] = {std::vector<std::vector<std::byte>>(kInFlight),
                                                 std::vector<std::vector<std::byte>>(kInFlight)};
  for (const std::string& file : files) {
    check_file_name(file, replica.what(file));
    const fs::path path = dir / file;
    auto fd = detail::open_file(path, O_RDONLY);
    const uint64_t size = detail::file_size(fd.get(), path.string());
    net::FileChecksum whole;  // fed in file order: batches are read one after another
    // The kWrite calls of the chunks from `from` on, read into buffer set `set`; an empty file
    // is one empty write (the peer makes it).
    auto read = [&](size_t set, uint64_t from) {
      std::vector<RawCall> calls;
      for (size_t k = 0; k < kInFlight && (from < size || (size == 0 && calls.empty())); ++k) {
        const uint64_t n = std::min(kChunk, size - from);
        RawCall c = replica.make(CheckpointOp::kWrite, file, from, 0, data[set][k], n);
        auto dest = Replica::payload(c, data[set][k]);
        if (detail::pread_full(fd.get(), dest, from, path.string()) != n)
          fail(ErrorCode::kIo, "{}: {} changed while being copied (ends before {} bytes)",
               replica.what(file), path.string(), size);
        Replica::seal(c, data[set][k]);
        whole.update(dest);
        calls.push_back(std::move(c));
        from += n;
      }
      return calls;
    };
    std::vector<RawCall> calls = read(0, 0);
    for (uint64_t from = 0, set = 0;; set ^= 1) {
      const uint64_t next = from + kInFlight * kChunk;
      std::future<std::vector<RawCall>> ahead;  // waited for by its destructor if call throws
      if (next < size) ahead = std::async(std::launch::async, read, set ^ 1, next);
      replica.call(calls, file);
      if (next >= size) break;
      calls = ahead.get();
      from = next;
    }
    std::vector<std::byte> commit_data;
    RawCall commit = replica.make(CheckpointOp::kCommit, file, 0, size, commit_data);
    reinterpret_cast<CheckpointHeader*>(commit.header.data())->checksum = whole.digest();
    replica.call(std::span(&commit, 1), file);
  }
}

void publish_checkpoint_copy(const CheckpointReplica& r, const std::string& name,
                             std::span<const std::string> files) {
  Replica replica(r, name);
  std::string list;
  for (const std::string& file : files) {
    check_file_name(file, replica.what(file));
    list += file + "\n";
  }
  std::vector<std::byte> data;
  RawCall c = replica.make(CheckpointOp::kPublish, "", 0, 0, data, list.size());
  std::memcpy(Replica::payload(c, data).data(), list.data(), list.size());
  replica.call(std::span(&c, 1), "");
}

bool restore_checkpoint_dir(const CheckpointReplica& r, const std::string& name,
                            const fs::path& dir) {
  Replica replica(r, name);
  const auto files = list_copy(replica);
  const fs::path parent = dir.parent_path().empty() ? fs::path(".") : dir.parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);
  FileLock lock(parent / fmt::format(".{}.restore-lock", dir.filename().string()));
  if (matches(dir, files)) return false;           // another process restored it meanwhile
  detail::remove_partial_dirs(dir, "checkpoint");  // what a killed restore or save left
  const detail::PartialDir staging_dir = detail::make_partial_dir(dir);
  const fs::path& staging = staging_dir.path();
  try {
    fetch(replica, files, staging);
  } catch (...) {
    std::error_code rec;
    fs::remove_all(staging, rec);
    throw;
  }
  publish_checkpoint_dir(staging, dir, /*durable=*/true);
  return true;
}

}  // namespace sluice
