#include "io/engine.h"

#include <fmt/format.h>
#include <liburing.h>

#include <cerrno>
#include <vector>

namespace sluice::io {

namespace {

class UringEngine final : public Engine {
 public:
  explicit UringEngine(const Faults* faults)
      : setup_fault_(faults ? faults->uring_setup : 0),
        register_fault_(faults ? faults->register_buffers : 0) {}
  ~UringEngine() override {
    if (ready_) io_uring_queue_exit(&ring_);
  }

  int init(uint32_t depth, std::span<const int> files, std::string* notes) {
    if (setup_fault_ != 0) return setup_fault_;
    depth_ = depth;
    // Newest flags first; older kernels reject them with EINVAL, so step down.
    const unsigned kFlagSets[] = {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
                                  IORING_SETUP_COOP_TASKRUN, 0};
    int ret = -EINVAL;
    for (unsigned flags : kFlagSets) {
      io_uring_params params{};
      params.flags = flags;
      ret = io_uring_queue_init_params(depth, &ring_, &params);
      if (ret == 0) {
        flags_ = flags;
        break;
      }
      if (ret != -EINVAL) return ret;
    }
    if (ret != 0) return ret;
    ready_ = true;
    files_.assign(files.begin(), files.end());
    if (!files_.empty() &&
        io_uring_register_files(&ring_, files_.data(), static_cast<unsigned>(files_.size())) == 0)
      fixed_files_ = true;
    *notes = describe();
    return 0;
  }

  std::string describe() const override {
    std::string s = fmt::format("io_uring, queue depth {}", depth_);
    if (flags_ & IORING_SETUP_DEFER_TASKRUN)
      s += ", single issuer + deferred task run";
    else if (flags_ & IORING_SETUP_COOP_TASKRUN)
      s += ", cooperative task run";
    s += fixed_files_ ? ", registered files" : ", unregistered files";
    s += buffer_.empty() ? "" : ", registered buffers";
    return s;
  }

  uint32_t queue_depth() const override { return depth_; }

  bool register_buffer(std::span<std::byte> buffer) override {
    if (!buffer_.empty()) {
      io_uring_unregister_buffers(&ring_);
      buffer_ = {};
    }
    int ret = register_fault_;
    iovec iov{buffer.data(), buffer.size()};
    if (ret == 0) ret = io_uring_register_buffers(&ring_, &iov, 1);
    if (ret != 0) return false;  // ENOMEM: memlock limit; plain reads work the same
    buffer_ = buffer;
    return true;
  }

  int submit(const Request& r) override {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (!sqe) {
      int ret = io_uring_submit(&ring_);
      if (ret < 0) return ret;
      sqe = io_uring_get_sqe(&ring_);
      if (!sqe) return -EBUSY;
    }
    const bool fixed = fixed_files_ && r.fd < 0;
    int fd = r.fd >= 0 ? r.fd : fixed ? static_cast<int>(r.file) : files_[r.file];
    bool in_buffer = !buffer_.empty() && r.dest >= buffer_.data() &&
                     r.dest + r.length <= buffer_.data() + buffer_.size();
    if (r.write && in_buffer)
      io_uring_prep_write_fixed(sqe, fd, r.dest, r.length, r.offset, 0);
    else if (r.write)
      io_uring_prep_write(sqe, fd, r.dest, r.length, r.offset);
    else if (in_buffer)
      io_uring_prep_read_fixed(sqe, fd, r.dest, r.length, r.offset, 0);
    else
      io_uring_prep_read(sqe, fd, r.dest, r.length, r.offset);
    if (fixed) sqe->flags |= IOSQE_FIXED_FILE;
    io_uring_sqe_set_data64(sqe, r.tag);
    return 0;
  }

  int flush() override {
    int ret = io_uring_submit(&ring_);
    return ret < 0 ? ret : 0;
  }

  int reap(std::span<Completion> out, std::chrono::milliseconds timeout) override {
    io_uring_cqe* cqe = nullptr;
    __kernel_timespec ts{};
    ts.tv_sec = timeout.count() / 1000;
    ts.tv_nsec = (timeout.count() % 1000) * 1000000;
    int ret = io_uring_wait_cqe_timeout(&ring_, &cqe, &ts);
    if (ret == -ETIME || ret == -EINTR) return 0;
    if (ret < 0) return ret;
    size_t n = 0;
    unsigned head;
    io_uring_for_each_cqe(&ring_, head, cqe) {
      if (n == out.size()) break;
      out[n++] = {io_uring_cqe_get_data64(cqe), cqe->res};
    }
    io_uring_cq_advance(&ring_, static_cast<unsigned>(n));
    return static_cast<int>(n);
  }

 private:
  io_uring ring_{};
  bool ready_ = false;
  unsigned flags_ = 0;
  uint32_t depth_ = 0;
  std::vector<int> files_;
  bool fixed_files_ = false;
  std::span<std::byte> buffer_;
  int setup_fault_, register_fault_;  // Faults (tests)
};

}  // namespace

std::unique_ptr<Engine> make_uring_engine(uint32_t queue_depth, std::span<const int> files,
                                          int* error, std::string* notes, const Faults* faults) {
  auto engine = std::make_unique<UringEngine>(faults);
  *error = engine->init(queue_depth, files, notes);
  if (*error != 0) return nullptr;
  return engine;
}

}  // namespace sluice::io
