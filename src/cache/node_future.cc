#include "cache/node_future.h"

#include "common/errors.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>

namespace sluice::cache {

namespace fs = std::filesystem;
using detail::fail;

namespace {
constexpr char kMagic[8] = {'s', 'l', 'f', 'u', 't', 'u', 'r', 'e'};

fs::path future_path(const fs::path& dir, uint32_t slot) {
  return dir / "futures" / fmt::format("{}", slot);
}

// Whether the process of slot `slot` lives: it holds the slot's lock.
bool alive(const fs::path& dir, uint32_t slot) {
  int fd = ::open((dir / "futures" / fmt::format("{}.lock", slot)).c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  const bool busy = flock(fd, LOCK_EX | LOCK_NB) != 0;
  ::close(fd);
  return busy;
}
}  // namespace

NodeFuture::NodeFuture(fs::path dir, uint64_t samples)
    : dir_(std::move(dir)),
      samples_(samples),
      futures_(SharedState::kMaxProcesses),
      next_(samples, kNever) {}

detail::UniqueFd NodeFuture::claim_slot(const fs::path& dir, uint32_t& slot, bool& alone) {
  std::error_code ec;
  fs::create_directories(dir / "futures", ec);
  detail::UniqueFd mine;
  alone = true;
  for (uint32_t i = 0; i < SharedState::kMaxProcesses; ++i) {
    auto fd = detail::open_file(dir / "futures" / fmt::format("{}.lock", i), O_RDWR | O_CREAT);
    if (flock(fd.get(), LOCK_EX | LOCK_NB) != 0) {
      alone = false;
    } else if (!mine) {
      slot = i;
      mine = std::move(fd);
    }
  }
  if (!mine)
    fail(ErrorCode::kIo, "cache: {} processes share {} already", SharedState::kMaxProcesses,
         dir.string());
  return mine;
}

void NodeFuture::write(const fs::path& dir, uint32_t slot, uint32_t gen,
                       const std::vector<uint64_t>& steps, const std::vector<uint64_t>& order) {
  const uint64_t head[3] = {gen, steps.size() - 1, order.size()};
  const fs::path path = future_path(dir, slot);
  const fs::path tmp = path.string() + ".tmp";
  try {
    auto fd = detail::open_file(tmp, O_WRONLY | O_CREAT | O_TRUNC);
    detail::write_full(fd.get(), std::as_bytes(std::span(kMagic)), tmp.string());
    detail::write_full(fd.get(), std::as_bytes(std::span(head)), tmp.string());
    detail::write_full(fd.get(), std::as_bytes(std::span(steps)), tmp.string());
    detail::write_full(fd.get(), std::as_bytes(std::span(order)), tmp.string());
    std::error_code ec;
    fs::rename(tmp, path, ec);
    if (ec) fail(ErrorCode::kIo, "rename {}: {}", tmp.string(), ec.message());
  } catch (const Error&) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
}

void NodeFuture::read(uint32_t slot, const ProcessRecord& p) {
  Future& f = futures_[slot];
  f = {};
  const fs::path path = future_path(dir_, slot);
  std::ifstream in(path, std::ios::binary);
  char magic[8] = {};
  uint64_t head[3] = {};
  in.read(magic, 8);
  in.read(reinterpret_cast<char*>(head), sizeof head);
  if (!in || std::memcmp(magic, kMagic, 8) != 0 || head[0] != p.gen || head[1] >= kNever ||
      head[2] >= kNever)
    fail(ErrorCode::kIo, "cache: {}: not the future of process {} (generation {})", path.string(),
         p.pid, p.gen);
  f.gen = p.gen;
  f.steps.resize(head[1] + 1);
  f.order.resize(head[2]);
  in.read(reinterpret_cast<char*>(f.steps.data()),
          static_cast<std::streamsize>(f.steps.size() * 8));
  in.read(reinterpret_cast<char*>(f.order.data()),
          static_cast<std::streamsize>(f.order.size() * 8));
  bool ok = static_cast<bool>(in) && f.steps.front() == 0 && f.steps.back() == f.order.size() &&
            std::is_sorted(f.steps.begin(), f.steps.end());
  for (uint64_t s : f.order) ok = ok && s < samples_;
  if (!ok) {
    f = {};
    fail(ErrorCode::kIo, "cache: {}: the future of process {} is damaged", path.string(), p.pid);
  }
}

bool NodeFuture::refresh(ProcessRecord* processes, uint32_t self, bool check_alive) {
  bool changed = false;
  for (uint32_t i = 0; i < SharedState::kMaxProcesses; ++i) {
    ProcessRecord& p = processes[i];
    if (p.pid != 0 && check_alive && i != self && !alive(dir_, i)) p = {};
    Future& f = futures_[i];
    if (p.pid == 0 || p.gen == 0) {
      changed |= !f.steps.empty();
      f = {};
    } else if (f.gen != p.gen) {
      changed = true;
      read(i, p);
    }
  }
  if (changed) build(processes);
  return changed;
}

uint64_t NodeFuture::processes() const {
  uint64_t n = 0;
  for (const Future& f : futures_) n += !f.steps.empty();
  return n;
}

void NodeFuture::build(const ProcessRecord* processes) {
  order_.clear();
  union_steps_.clear();
  uint64_t steps = 0;
  for (uint32_t i = 0; i < futures_.size(); ++i) {
    Future& f = futures_[i];
    if (f.steps.empty()) continue;
    const uint64_t count = f.steps.size() - 1;
    f.base = std::min<uint64_t>(processes[i].first_unbuilt, count);
    steps = std::max(steps, count - f.base);
  }
  for (uint64_t u = 0; u < steps; ++u) {
    union_steps_.push_back(order_.size());
    for (const Future& f : futures_) {
      if (f.steps.empty() || f.base + u + 1 >= f.steps.size()) continue;
      const uint64_t t = f.base + u;
      order_.insert(order_.end(), f.order.begin() + static_cast<ptrdiff_t>(f.steps[t]),
                    f.order.begin() + static_cast<ptrdiff_t>(f.steps[t + 1]));
    }
  }
  union_steps_.push_back(order_.size());
  if (order_.size() >= kNever)
    fail(ErrorCode::kUnsupported, "cache: {}: at most {} samples planned per node and two epochs",
         dir_.string(), kNever - 1);
  std::fill(next_.begin(), next_.end(), kNever);
  succ_.assign(order_.size(), kNever);
  for (size_t t = order_.size(); t-- > 0;) {
    succ_[t] = next_[order_[t]];
    next_[order_[t]] = static_cast<uint32_t>(t);
  }
  done_ = now_ = 0;
}

void NodeFuture::advance(const ProcessRecord* processes,
                         const std::function<void(uint64_t)>& moved) {
  uint64_t built = UINT64_MAX;
  for (uint32_t i = 0; i < futures_.size(); ++i) {
    const Future& f = futures_[i];
    if (f.steps.empty()) continue;
    const uint64_t at = processes[i].first_unbuilt;
    built = std::min(built, at - std::min(at, f.base));
  }
  if (built == UINT64_MAX || union_steps_.empty()) return;
  built = std::min<uint64_t>(built, union_steps_.size() - 1);
  for (; done_ < built; ++done_) {
    for (uint64_t t = union_steps_[done_]; t < union_steps_[done_ + 1]; ++t) {
      const uint64_t s = order_[t];
      if (next_[s] == t) next_[s] = succ_[t];
      moved(s);
    }
  }
  now_ = union_steps_[done_];
}

}  // namespace sluice::cache
