#include "index/direct.h"

#include "common/errors.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <memory>

namespace sluice {

DirectFiles open_direct(const Dataset& dataset, DirectIo mode, const std::string& setting) {
  DirectFiles out;
  const auto& shards = dataset.shards();
  if (mode == DirectIo::kOff || shards.empty()) return out;
  try {
    const size_t align = dataset.alignment();
    std::unique_ptr<void, decltype(&std::free)> probe(std::aligned_alloc(align, align), &std::free);
    if (!probe) detail::fail_errno(ENOMEM, "O_DIRECT probe buffer");
    auto probe_read = [&](int fd, const std::string& name) {
      if (::pread(fd, probe.get(), align, 0) < 0)
        detail::fail_errno(errno, "O_DIRECT read of " + name);
    };
    if (!dataset.sample_file(0).empty()) {
      detail::UniqueFd first(dataset.open_sample(0, true));
      probe_read(first.get(), std::string(dataset.sample_file(0)));
    } else {
      detail::reserve_descriptors(
          shards.size(), fmt::format("{} with O_DIRECT ({} shards, a second descriptor each)",
                                     dataset.path().string(), shards.size()));
      for (const auto& s : shards)
        out.fds.push_back(s.local ? detail::open_file(s.path, O_RDONLY | O_DIRECT)
                                  : detail::UniqueFd{});
      for (size_t i = 0; i < shards.size(); ++i)
        if (shards[i].local) {
          probe_read(out.fds[i].get(), shards[i].path.string());
          break;
        }
    }
    out.on = true;
  } catch (const Error& e) {
    out.fds.clear();
    out.why_not = e.what();
    if (mode == DirectIo::kOn)
      detail::fail(ErrorCode::kUnsupported, "{}: true, but {}", setting, e.what());
  }
  return out;
}

}  // namespace sluice
