// Sources read in place: a tar's headers (WebDataset shards) and a .npy header, from a memfd.
#include <sluice/dataset.h>

#include "fuzz_common.h"
#include "index/tar_index.h"

#include <sys/mman.h>
#include <unistd.h>

#include <string>

using namespace sluice;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("fuzz", 0);
  if (ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != static_cast<ssize_t>(size)) return 0;
  fuzz::expect_only_errors([&] {
    index::TarIndex t = index::scan_tar("fuzz.tar", fd, size);
    for (size_t i = 0; i < t.num_samples(); ++i)
      if (t.start[i] + t.span[i] > size) __builtin_trap();  // every span inside the tar
  });
  DatasetOptions npy;
  npy.path = "/proc/self/fd/" + std::to_string(fd);
  npy.format = DatasetFormat::kNpy;
  fuzz::expect_only_errors([&] {
    auto ds = Dataset::open_source(npy);
    if (ds->num_samples() > 0) {
      SampleExtent last = ds->extent(ds->num_samples() - 1);
      if (last.offset + last.size > size) __builtin_trap();  // every sample inside the file
    }
  });
  return 0;
}
