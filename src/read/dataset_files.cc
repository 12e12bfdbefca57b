#include "read/dataset_files.h"
#include "common/thread.h"

#include "common/host.h"
#include "index/internals.h"

#include <sys/mman.h>
#include <sys/stat.h>

namespace sluice::read {

DatasetFiles::DatasetFiles(std::shared_ptr<const Dataset> dataset, DirectIo mode,
                           const std::string& setting, bool may_warm)
    : dataset_(std::move(dataset)),
      per_sample_(dataset_->format() == DatasetFormat::kFiles),
      direct_(open_direct(*dataset_, mode, setting, detail::memory_room())) {
  direct_.warm = direct_.warm && may_warm;
  if (direct_.warm) direct_.why += "; warming it in the background";
  if (per_sample_) {
    fds_ = {index::shard_fd(*dataset_, 0)};
  } else {
    for (uint32_t i = 0; i < dataset_->shards().size(); ++i)
      fds_.push_back(direct_.on ? direct_.fds[i].get() : index::shard_fd(*dataset_, i));
  }
}

DatasetFiles::~DatasetFiles() {
  warm_stop_ = true;
  if (warm_thread_.joinable()) warm_thread_.join();
  for (std::span<const std::byte> m : maps_)
    if (!m.empty()) ::munmap(const_cast<std::byte*>(m.data()), m.size());
}

uint64_t DatasetFiles::alignment() const { return direct_.on ? dataset_->alignment() : 1; }

void DatasetFiles::start_warming() {
  if (direct_.warm && !warm_thread_.joinable())
    warm_thread_ = std::thread([this] {
      detail::background_thread("sluice-warm");
      warm_page_cache(*dataset_, warm_stop_);
    });
}

void DatasetFiles::map_shards() {
  if (direct_.on || per_sample_ || !dataset_->packed() || !maps_.empty()) return;
  maps_.resize(fds_.size());
  for (size_t i = 0; i < fds_.size(); ++i) {
    struct stat st {};
    if (fds_[i] < 0 || ::fstat(fds_[i], &st) != 0 || st.st_size <= 0) continue;
    void* m = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, fds_[i], 0);
    if (m != MAP_FAILED)
      maps_[i] = {static_cast<const std::byte*>(m), static_cast<size_t>(st.st_size)};
  }
}

std::span<const std::byte> DatasetFiles::mapped(uint32_t shard) const {
  return shard < maps_.size() ? maps_[shard] : std::span<const std::byte>{};
}

}  // namespace sluice::read
