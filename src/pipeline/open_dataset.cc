// sluice::open_dataset: a dataset opened as the Loader opens it, for tools.

#include <sluice/loader.h>

#include "cache/mirror.h"
#include "source/source.h"

namespace sluice {

std::shared_ptr<Dataset> open_dataset(const LoaderOptions& options, bool fetch_all) {
  if (!source::is_remote(options.dataset.path.string()))
    return Dataset::open_source(options.dataset);
  // The dataset is the mirror's: it lives as long as its source and mirror, which go with it.
  struct Held {
    cache::RemoteDataset remote;
    ~Held() { cache::remove_mirror(remote.mirror); }
  };
  auto held = std::make_shared<Held>();
  held->remote = cache::open_remote_dataset(options);
  // Opened: a loader sharing the cache may go on (this process reads no sample of the mirror).
  held->remote.mirror.open_lock.reset();
  if (fetch_all) cache::fill_mirror(*held->remote.source, held->remote.mirror);
  Dataset* dataset = held->remote.dataset.get();
  return std::shared_ptr<Dataset>(std::move(held), dataset);
}

}  // namespace sluice
