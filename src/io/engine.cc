#include "io/engine.h"

#include "common/errors.h"

#include <cerrno>
#include <mutex>
#include <vector>

namespace sluice::io {

ReadFailure read_all(Engine& engine, std::span<const ReadOp> ops,
                     std::chrono::steady_clock::time_point deadline,
                     const std::atomic<bool>* cancel) {
  constexpr int kMaxRetries = 64;  // EAGAIN / EINTR on one op before it counts as an error
  std::vector<uint32_t> done(ops.size(), 0);
  std::vector<uint8_t> retries(ops.size(), 0);
  std::vector<Completion> completions(engine.queue_depth());
  ReadFailure failure;
  size_t next = 0, in_flight = 0, finished = 0;

  auto submit = [&](size_t i) {
    const ReadOp& op = ops[i];
    Request r{i, op.file, op.offset + done[i], op.length - done[i], op.dest + done[i]};
    int ret = engine.submit(r);
    if (ret < 0) return ret;
    ++in_flight;
    return 0;
  };

  while (finished < ops.size()) {
    if (cancel && cancel->load(std::memory_order_relaxed) && failure.error == 0)
      failure = {next, -ECANCELED};
    // Keep the queue full unless a failure stops new work; then only drain.
    while (failure.error == 0 && next < ops.size() && in_flight < engine.queue_depth()) {
      if (ops[next].length == 0) {
        ++next;
        ++finished;
        continue;
      }
      if (int ret = submit(next); ret < 0) {
        failure = {next, ret};
        break;
      }
      ++next;
    }
    if (int ret = engine.flush(); ret < 0 && failure.error == 0) failure = {next, ret};
    if (in_flight == 0) break;
    auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return {failure.error ? failure.op : next, -ETIMEDOUT};
    auto wait = std::min(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now),
                         std::chrono::milliseconds(100)) +
                std::chrono::milliseconds(1);
    int n = engine.reap(completions, wait);
    if (n < 0) return {next, n};
    for (int k = 0; k < n; ++k) {
      const Completion& c = completions[static_cast<size_t>(k)];
      auto i = static_cast<size_t>(c.tag);
      --in_flight;
      if (c.result == -EAGAIN || c.result == -EINTR) {
        if (++retries[i] <= kMaxRetries && failure.error == 0 && submit(i) == 0) continue;
        if (failure.error == 0) failure = {i, c.result};
        ++finished;
        continue;
      }
      if (c.result < 0) {
        if (failure.error == 0) failure = {i, c.result};
        ++finished;
        continue;
      }
      if (c.result == 0) {  // end of file before the op was complete
        if (failure.error == 0) failure = {i, -ENODATA};
        ++finished;
        continue;
      }
      done[i] += static_cast<uint32_t>(c.result);
      if (done[i] < ops[i].length && failure.error == 0) {  // short read: read the rest
        if (int ret = submit(i); ret < 0)
          failure = {i, ret};
        else
          continue;
      }
      ++finished;
    }
  }
  return failure;
}

namespace {
std::mutex g_wrapper_mu;
std::function<std::unique_ptr<Engine>(std::unique_ptr<Engine>)> g_wrapper;

std::unique_ptr<Engine> wrapped(std::unique_ptr<Engine> engine) {
  std::lock_guard lock(g_wrapper_mu);
  return g_wrapper ? g_wrapper(std::move(engine)) : std::move(engine);
}

std::unique_ptr<Engine> choose_engine(const IoOptions& options, std::span<const int> files,
                                      const std::function<void(const std::string&)>& on_choice);
}  // namespace

void set_engine_wrapper(std::function<std::unique_ptr<Engine>(std::unique_ptr<Engine>)> wrap) {
  std::lock_guard lock(g_wrapper_mu);
  g_wrapper = std::move(wrap);
}

std::unique_ptr<Engine> make_engine(const IoOptions& options, std::span<const int> files,
                                    const std::function<void(const std::string&)>& on_choice) {
  return wrapped(choose_engine(options, files, on_choice));
}

namespace {
std::unique_ptr<Engine> choose_engine(const IoOptions& options, std::span<const int> files,
                                      const std::function<void(const std::string&)>& on_choice) {
  if (options.engine == IoEngineKind::kThreads) {
    auto engine = make_thread_engine(options.queue_depth, files);
    if (on_choice) on_choice("io engine: " + engine->describe() + " (io.engine: threads)");
    return engine;
  }
  int error = 0;
  std::string notes;
  auto engine = make_uring_engine(options.queue_depth, files, &error, &notes);
  if (engine) {
    if (on_choice) on_choice("io engine: " + notes);
    return engine;
  }
  std::string why = "io_uring_setup: " + detail::errno_text(-error);
  if (error == -ENOSYS || error == -EPERM)
    why += " (blocked by seccomp or kernel.io_uring_disabled)";
  if (error == -ENOMEM) why += " (memlock limit too low)";
  if (options.engine == IoEngineKind::kUring)
    detail::fail(ErrorCode::kUnsupported, "io.engine: uring: io_uring is unavailable: {}", why);
  auto fallback = make_thread_engine(options.queue_depth, files);
  if (on_choice) on_choice("io engine: " + fallback->describe() + "; io_uring unavailable: " + why);
  return fallback;
}

}  // namespace

}  // namespace sluice::io
