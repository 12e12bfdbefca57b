#include <sluice/checkpoint.h>
#include <sluice/error.h>

#include "checkpoint/files.h"
#include "common/errors.h"
#include "common/file.h"
#include "common/json_number.h"
#include "common/keep.h"
#include "common/log.h"
#include "common/partial_dir.h"
#include "format/layout.h"
#include "io/engine.h"
#include "io/priority.h"
#include "io/read_queue.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <thread>
#include <utility>

namespace sluice {

namespace fs = std::filesystem;
using detail::fail;
using Clock = std::chrono::steady_clock;

namespace {

constexpr uint64_t kAlign = 4096;  // O_DIRECT: offsets, lengths and memory
constexpr auto kReapWait = std::chrono::milliseconds(1000);
// While a Loader's reads wait: the largest write, so that a read waits behind little.
constexpr uint64_t kYieldIo = 1 << 20;
// A device that completes nothing for this long has hung: the save or load fails, naming it.
constexpr auto kStall = std::chrono::seconds(120);

uint64_t round_up(uint64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
uint64_t round_down(uint64_t x) { return x / kAlign * kAlign; }

struct FreeDeleter {
  void operator()(std::byte* p) const { std::free(p); }
};
using Staging = std::unique_ptr<std::byte, FreeDeleter>;

Staging aligned_buffer(uint64_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, kAlign, bytes) != 0) throw std::bad_alloc();
  return Staging(static_cast<std::byte*>(p));
}

std::atomic<bool> said_buffered{false};

// Opens with O_DIRECT when asked and the file system takes it; else through the page cache,
// saying so once per process.
detail::UniqueFd open_checkpoint(const fs::path& path, int flags, bool want_direct, bool* direct) {
  *direct = false;
  if (want_direct) {
    int fd = ::open(path.c_str(), flags | O_DIRECT | O_CLOEXEC, 0644);
    if (fd >= 0) {
      *direct = true;
      return detail::UniqueFd(fd);
    }
    if (errno != EINVAL) detail::fail_errno(errno, "open " + path.string());
    if (!said_buffered.exchange(true))
      detail::log_line(
          fmt::format("checkpoint: {}: O_DIRECT refused by the file system; writing "
                      "and reading through the page cache",
                      path.parent_path().string()));
  }
  return detail::open_file(path, flags);
}

std::unique_ptr<io::Engine> make_checkpoint_engine(int fd, uint32_t depth) {
  io::EngineOptions eo;
  eo.queue_depth = depth;
  int files[1] = {fd};
  return io::make_engine(eo, files, nullptr);
}

// The range a failed IO covered, in the words of every error here.
std::string range(const fs::path& path, uint64_t offset, uint64_t length) {
  return fmt::format("{} [{}+{}]", path.string(), offset, length);
}

// Throws what the io driver's failure of `op` ("write" or "read") says, naming file and range.
[[noreturn]] void fail_io(const fs::path& path, const char* what, const io::ReadOp& op,
                          const io::ReadFailure& f) {
  const std::string where = range(path, op.offset, op.length);
  if (f.error == -ETIMEDOUT)
    fail(ErrorCode::kIo, "{} {}: not done in {} s (device hung?)", what, where, kStall.count());
  if (f.error == -ENODATA)
    fail(ErrorCode::kCorruption, "{}: ends before {} bytes while reading (truncated meanwhile?)",
         path.string(), op.offset + op.required);
  detail::fail_errno(-f.error, fmt::format("{} {}", what, where));
}

}  // namespace

CheckpointWriteResult write_checkpoint_file(const fs::path& path,
                                            std::span<const CheckpointPart> parts,
                                            const CheckpointOptions& options,
                                            io::DeviceTraffic* traffic) {
  const auto start = Clock::now();
  const uint32_t depth = std::max<uint32_t>(1, options.queue_depth);
  const uint64_t chunk = std::clamp<uint64_t>(round_down(options.chunk_bytes), kAlign, 1ull << 30);
  CheckpointWriteResult result;
  uint64_t total = 0;
  for (const auto& p : parts) {
    result.parts.push_back(
        {total, p.bytes.size(), format::record_checksum(p.bytes.data(), p.bytes.size(), 0)});
    total += p.bytes.size();
  }
  detail::UniqueFd fd =
      open_checkpoint(path, O_WRONLY | O_CREAT | O_TRUNC, options.direct, &result.direct);
  const uint64_t padded = round_up(total);
  if (padded > 0) {
    // Reserve the space first: a full disk fails here, before a byte is written.
    // fallocate itself, not posix_fallocate: where the file system has no fallocate, glibc's
    // emulation would write every byte twice.
    int rc = fallocate(fd.get(), 0, 0, static_cast<off_t>(padded)) == 0 ? 0 : errno;
    if (rc == ENOSPC || rc == EDQUOT)
      throw Error(ErrorCode::kIo,
                  fmt::format("write {}: {} bytes do not fit: {}", path.string(), total,
                              detail::errno_text(rc)),
                  rc);
    if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL)
      detail::fail_errno(rc, "reserve " + std::to_string(total) + " bytes for " + path.string());
  }

  // Each write is a job of the io driver's queue (io/read_queue.h: short writes continued,
  // EAGAIN retried, a write that does not complete within kStall fails); a job per staging
  // buffer, so that a buffer is refilled as soon as its write is done.
  auto engine = make_checkpoint_engine(fd.get(), depth);
  io::ReadQueue queue(*engine);
  struct Write {
    Staging buffer;
    io::ReadOp op;
    io::ReadJob job;
    Clock::time_point submitted;
    bool busy = false;
  };
  std::vector<Write> writes(depth);
  size_t part = 0;
  uint64_t part_at = 0, file_at = 0, in_flight = 0;
  std::shared_ptr<io::DeviceTraffic> own_traffic;
  if (!traffic) own_traffic = io::DeviceTraffic::for_fd(fd.get());
  io::DeviceTraffic& t = traffic ? *traffic : *own_traffic;
  // The loader's reads first. While a Loader's reads wait, one write of at most kYieldIo is in
  // flight at a time, and after each the writer holds for as long as the write took times
  // (1 - share) / share: the writes take at most `share` of the device's time, the reads the
  // rest. When no reads wait, the full queue.
  const double share = std::clamp(options.share, 0.01, 1.0);
  auto next_write = Clock::now();
  auto hold = [&] {
    const auto begin = Clock::now();
    while (Clock::now() < next_write && t.reads_waiting() > 0)
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - begin);
    result.held_seconds += std::chrono::duration<double>(ns).count();
    t.held_ns += static_cast<uint64_t>(ns.count());
  };
  while (file_at < padded || in_flight > 0) {
    bool yield = share < 1 && t.reads_waiting() > 0;
    if (yield && in_flight == 0 && file_at < padded) {
      hold();
      yield = t.reads_waiting() > 0;
    }
    const uint64_t limit = yield ? 1 : depth;
    const uint64_t io_size = yield ? std::min(chunk, kYieldIo) : chunk;
    for (Write& w : writes) {
      if (file_at >= padded || in_flight >= limit) break;
      if (w.busy) continue;
      if (!w.buffer) w.buffer = aligned_buffer(chunk);
      // Fill the buffer from the parts, one after another; the last write is padded to the
      // alignment with zeros, cut off again by ftruncate.
      const uint64_t want = std::min(io_size, total - file_at);
      uint64_t filled = 0;
      while (filled < want) {
        const auto& bytes = parts[part].bytes;
        uint64_t n = std::min(want - filled, bytes.size() - part_at);
        if (n > 0) std::memcpy(w.buffer.get() + filled, bytes.data() + part_at, n);
        filled += n;
        part_at += n;
        if (part_at == bytes.size()) {
          ++part;
          part_at = 0;
        }
      }
      const uint64_t length = round_up(want);
      std::memset(w.buffer.get() + want, 0, length - want);
      w.op = {};
      w.op.offset = file_at;
      w.op.length = static_cast<uint32_t>(length);
      w.op.dest = w.buffer.get();
      w.op.write = true;
      w.job.ops = std::span(&w.op, 1);
      w.submitted = Clock::now();
      w.job.deadline = w.submitted + kStall;
      queue.add(&w.job);
      w.busy = true;
      file_at += length;
      ++in_flight;
    }
    if (queue.run_once(kReapWait) == 0) continue;
    for (Write& w : writes) {
      if (!w.busy || !w.job.complete) continue;
      if (w.job.failure.error != 0) {
        if (w.job.failure.in_flight) {  // writes may still read their buffers: leave them be
          detail::keep_forever(engine.release());
          for (Write& x : writes) detail::keep_forever(x.buffer.release());
        }
        fail_io(path, "write", w.op, w.job.failure);
      }
      w.busy = false;
      --in_flight;
      t.written_bytes += w.op.length;
      if (yield) {
        const auto took = Clock::now() - w.submitted;
        next_write = Clock::now() +
                     std::chrono::duration_cast<Clock::duration>(took * ((1 - share) / share));
      }
    }
  }
  if (padded != total && ftruncate(fd.get(), static_cast<off_t>(total)) != 0)
    detail::fail_errno(errno, "truncate " + path.string());
  if (options.durable) detail::fsync_or_throw(fd.get(), path.string());
  result.bytes = total;
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

void read_checkpoint_file(const fs::path& path, std::span<const CheckpointReadPart> parts,
                          const CheckpointOptions& options) {
  const uint32_t depth = std::max<uint32_t>(1, options.queue_depth);
  const uint64_t chunk = std::clamp<uint64_t>(round_down(options.chunk_bytes), kAlign, 1ull << 30);
  bool direct = false;
  detail::UniqueFd fd = open_checkpoint(path, O_RDONLY, options.direct, &direct);
  const uint64_t size = detail::file_size(fd.get(), path.string());
  std::vector<size_t> order;  // the parts with bytes, by offset (disjoint: ends ascend too)
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& p = parts[i];
    if (p.dest.size() != p.extent.length)
      fail(ErrorCode::kInvalidArgument, "read {}: part {}: {} bytes to read into {}",
           range(path, p.extent.offset, p.extent.length), p.name, p.extent.length, p.dest.size());
    if (p.extent.offset > size || p.extent.length > size - p.extent.offset)
      fail(ErrorCode::kCorruption, "{}: part {} [{}+{}]: the file ends at {} bytes (truncated?)",
           path.string(), p.name, p.extent.offset, p.extent.length, size);
    if (p.extent.length > 0) order.push_back(i);
  }
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return parts[a].extent.offset < parts[b].extent.offset; });
  // The aligned covers of the parts, merged where they touch, cut into chunk-sized IOs.
  struct Io {
    uint64_t offset = 0, length = 0, needed = 0;
  };
  std::vector<Io> plan;
  for (size_t i : order) {
    const auto& e = parts[i].extent;
    uint64_t begin = round_down(e.offset), end = round_up(e.offset + e.length);
    if (!plan.empty() && begin <= plan.back().offset + plan.back().length)
      begin = plan.back().offset + plan.back().length;
    for (uint64_t at = begin; at < end; at += chunk) {
      uint64_t length = std::min(chunk, end - at);
      plan.push_back({at, length, std::min(at + length, size) - at});
    }
  }
  // Each read a job of the io driver's queue, as the writes above.
  auto engine = make_checkpoint_engine(fd.get(), depth);
  io::ReadQueue queue(*engine);
  struct Read {
    Staging buffer;
    io::ReadOp op;
    io::ReadJob job;
    bool busy = false;
  };
  std::vector<Read> reads(depth);
  size_t next = 0, in_flight = 0;
  while (next < plan.size() || in_flight > 0) {
    for (Read& r : reads) {
      if (next >= plan.size()) break;
      if (r.busy) continue;
      if (!r.buffer) r.buffer = aligned_buffer(chunk);
      const Io& io = plan[next++];
      r.op = {};
      r.op.offset = io.offset;
      r.op.length = static_cast<uint32_t>(io.length);
      r.op.required = static_cast<uint32_t>(io.needed);
      r.op.dest = r.buffer.get();
      r.job.ops = std::span(&r.op, 1);
      r.job.deadline = Clock::now() + kStall;
      queue.add(&r.job);
      r.busy = true;
      ++in_flight;
    }
    if (queue.run_once(kReapWait) == 0) continue;
    for (Read& r : reads) {
      if (!r.busy || !r.job.complete) continue;
      if (r.job.failure.error != 0) {
        if (r.job.failure.in_flight) {  // reads may still land in their buffers
          detail::keep_forever(engine.release());
          for (Read& x : reads) detail::keep_forever(x.buffer.release());
        }
        fail_io(path, "read", r.op, r.job.failure);
      }
      r.busy = false;
      --in_flight;
      // Hand the bytes to every part they overlap (parts sorted by offset, disjoint).
      const uint64_t io_offset = r.op.offset, io_end = r.op.offset + r.op.length;
      auto first = std::partition_point(order.begin(), order.end(), [&](size_t k) {
        return parts[k].extent.offset + parts[k].extent.length <= io_offset;
      });
      for (size_t k = static_cast<size_t>(first - order.begin()); k < order.size(); ++k) {
        const auto& p = parts[order[k]];
        if (p.extent.offset >= io_end) break;
        uint64_t from = std::max(p.extent.offset, io_offset);
        uint64_t to = std::min(p.extent.offset + p.extent.length, io_end);
        if (from < to)
          std::memcpy(p.dest.data() + (from - p.extent.offset), r.buffer.get() + (from - io_offset),
                      to - from);
      }
    }
  }
  for (const auto& p : parts) {
    uint32_t sum = format::record_checksum(p.dest.data(), p.dest.size(), 0);
    if (sum != p.extent.checksum)
      fail(ErrorCode::kCorruption,
           "{}: part {} [{}+{}]: checksum mismatch (stored {:08x}, read {:08x}): the file was "
           "damaged after it was written",
           path.string(), p.name, p.extent.offset, p.extent.length, p.extent.checksum, sum);
  }
}

void publish_checkpoint_dir(const fs::path& staging, const fs::path& dir, bool durable) {
  detail::replace_dir(staging, dir, durable);
}

namespace {
constexpr const char* kIndex = "index.json";
constexpr uint64_t kIndexVersion = 1;

}  // namespace

CheckpointWriteResult save_checkpoint(const fs::path& dir, std::span<const CheckpointPart> parts,
                                      const CheckpointOptions& options) {
  detail::remove_partial_dirs(dir, "checkpoint");
  const detail::PartialDir staging_dir = detail::make_partial_dir(dir);
  const fs::path& staging = staging_dir.path();
  CheckpointWriteResult r = write_checkpoint_file(staging / "data", parts, options);
  nlohmann::json index = {{"version", kIndexVersion}, {"parts", nlohmann::json::array()}};
  for (size_t i = 0; i < parts.size(); ++i)
    index["parts"].push_back({{"name", parts[i].name},
                              {"offset", r.parts[i].offset},
                              {"length", r.parts[i].length},
                              {"checksum", r.parts[i].checksum}});
  std::string text = index.dump(1);
  {
    auto fd = detail::open_file(staging / kIndex, O_WRONLY | O_CREAT | O_TRUNC);
    detail::write_full(fd.get(), std::as_bytes(std::span(text)), (staging / kIndex).string());
    if (options.durable) detail::fsync_or_throw(fd.get(), (staging / kIndex).string());
  }
  if (options.durable) detail::fsync_dir(staging);
  publish_checkpoint_dir(staging, dir, options.durable);
  if (!options.replica.address.empty()) {
    const std::vector<std::string> files = {"data", kIndex};
    const std::string name =
        options.replica.name.empty() ? checkpoint_copy_name(dir) : options.replica.name;
    try {
      copy_checkpoint_files(options.replica, name, dir, files);
      publish_checkpoint_copy(options.replica, name, files);
    } catch (const Error& e) {
      r.replica_error = e.what();
      detail::log_line(
          fmt::format("checkpoint: {} saved, its copy missing: {}", dir.string(), r.replica_error));
    }
  }
  return r;
}

std::vector<LoadedPart> load_checkpoint(const fs::path& dir, const CheckpointOptions& options) {
  const fs::path index_path = dir / kIndex;
  std::error_code ec;
  if (!options.replica.address.empty() && !fs::exists(index_path, ec) &&
      restore_checkpoint_dir(
          options.replica,
          options.replica.name.empty() ? checkpoint_copy_name(dir) : options.replica.name, dir))
    detail::log_line(fmt::format("checkpoint: {} restored from its copy on peer {}", dir.string(),
                                 options.replica.address));
  auto fd = detail::open_file(index_path, O_RDONLY);
  std::string text(detail::file_size(fd.get(), index_path.string()), '\0');
  detail::pread_full(fd.get(), std::as_writable_bytes(std::span(text)), 0, index_path.string());
  std::vector<LoadedPart> out;
  std::vector<CheckpointReadPart> reads;
  try {
    auto index = nlohmann::json::parse(text);
    if (const uint64_t version = detail::json_number(index, "version", index_path);
        version != kIndexVersion)
      fail(ErrorCode::kUnsupported, "{}: index version {} (this sluice reads {})",
           index_path.string(), version, kIndexVersion);
    for (const auto& p : index.at("parts")) {
      out.push_back({p.at("name").get<std::string>(), {}});
      reads.push_back(
          {out.back().name,
           {detail::json_number(p, "offset", index_path),
            detail::json_number(p, "length", index_path),
            static_cast<uint32_t>(detail::json_number(p, "checksum", index_path, UINT32_MAX))},
           {}});
    }
  } catch (const nlohmann::json::exception& e) {
    fail(ErrorCode::kCorruption, "{}: not a sluice checkpoint index: {}", index_path.string(),
         e.what());
  }
  for (size_t i = 0; i < out.size(); ++i) {
    out[i].bytes.resize(reads[i].extent.length);
    reads[i].dest = out[i].bytes;
  }
  read_checkpoint_file(dir / "data", reads, options);
  return out;
}

}  // namespace sluice
