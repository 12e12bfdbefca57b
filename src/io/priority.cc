#include "io/priority.h"

#include <sys/stat.h>

#include <map>
#include <mutex>

namespace sluice::io {

std::shared_ptr<DeviceTraffic> DeviceTraffic::for_device(dev_t device) {
  // Objects live while a loader or a writer holds them; the map only finds them.
  static std::mutex mu;
  static std::map<dev_t, std::weak_ptr<DeviceTraffic>> known;
  std::lock_guard lock(mu);
  std::erase_if(known, [](const auto& e) { return e.second.expired(); });
  auto& slot = known[device];
  auto traffic = slot.lock();
  if (!traffic) {
    traffic = std::make_shared<DeviceTraffic>();
    slot = traffic;
  }
  return traffic;
}

std::shared_ptr<DeviceTraffic> DeviceTraffic::for_path(const std::filesystem::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::make_shared<DeviceTraffic>();
  return for_device(st.st_dev);
}

std::shared_ptr<DeviceTraffic> DeviceTraffic::for_fd(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return std::make_shared<DeviceTraffic>();
  return for_device(st.st_dev);
}

}  // namespace sluice::io
