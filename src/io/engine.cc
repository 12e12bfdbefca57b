#include "io/engine.h"

#include "common/errors.h"

#include <cerrno>

namespace sluice::io {

namespace {
std::unique_ptr<Engine> choose_engine(const EngineOptions& options, std::span<const int> files,
                                      const std::function<void(const std::string&)>& on_choice);
}  // namespace

std::unique_ptr<Engine> make_engine(const EngineOptions& options, std::span<const int> files,
                                    const std::function<void(const std::string&)>& on_choice) {
  auto engine = choose_engine(options, files, on_choice);
  if (options.faults && options.faults->wrap_engine)
    engine = options.faults->wrap_engine(std::move(engine));
  if (options.layer) engine = options.layer(std::move(engine));
  return engine;
}

namespace {
std::unique_ptr<Engine> choose_engine(const EngineOptions& options, std::span<const int> files,
                                      const std::function<void(const std::string&)>& on_choice) {
  if (options.kind == EngineKind::kThreads) {
    auto engine = make_thread_engine(options.queue_depth, files);
    if (on_choice) on_choice("io engine: " + engine->describe() + " (io.engine: threads)");
    return engine;
  }
  int error = 0;
  std::string notes;
  auto engine = make_uring_engine(options.queue_depth, files, &error, &notes, options.faults.get());
  if (engine) {
    if (on_choice) on_choice("io engine: " + notes);
    return engine;
  }
  std::string why = "io_uring_setup: " + detail::errno_text(-error);
  if (error == -ENOSYS || error == -EPERM)
    why += " (blocked by seccomp or kernel.io_uring_disabled)";
  if (error == -ENOMEM) why += " (memlock limit too low)";
  if (options.kind == EngineKind::kUring)
    detail::fail(ErrorCode::kUnsupported, "io.engine: uring: io_uring is unavailable: {}", why);
  auto fallback = make_thread_engine(options.queue_depth, files);
  if (on_choice) on_choice("io engine: " + fallback->describe() + "; io_uring unavailable: " + why);
  return fallback;
}

}  // namespace

}  // namespace sluice::io
