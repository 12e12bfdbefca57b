// The ceiling for sluice's image transforms: the same decode + crop steps as a config's
// `transforms:` (transform::ImageTransform), run on JPEG files already in memory by THREADS
// plain threads, no loader around them. benchmarks/transform_bench.py compares the Loader
// (Python and `sluice bench`) with it.
//
//   transform_loop DIR_OF_TARS THREADS SECONDS SIZE   -> {"images_per_s": x}

#include <sluice/dataset.h>

#include "transform/image.h"

#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 5) {
    fmt::print(stderr, "usage: transform_loop DIR_OF_TARS THREADS SECONDS SIZE\n");
    return 2;
  }
  using namespace sluice;
  DatasetOptions source;
  source.path = argv[1];
  source.format = DatasetFormat::kTar;
  auto ds = Dataset::open_source(source);
  size_t jpg = 0;
  while (ds->fields()[jpg].name != "jpg") ++jpg;
  std::vector<std::vector<std::byte>> images;  // every sample's JPEG, in memory
  for (uint64_t i = 0; i < ds->num_samples(); ++i) {
    const std::vector<std::byte> record = ds->read_record(i);
    auto field = ds->parse_record(i, record).fields[jpg];
    images.emplace_back(field.begin(), field.end());
  }
  const int threads = std::atoi(argv[2]);
  const double seconds = std::atof(argv[3]);
  const auto size = static_cast<uint32_t>(std::atoi(argv[4]));
  TransformStep decode, crop, flip;
  crop.kind = TransformStep::Kind::kRandomResizedCrop;
  crop.height = crop.width = size;
  flip.kind = TransformStep::Kind::kFlip;
  const transform::ImageTransform t(FieldTransform{"jpg", {decode, crop, flip}});
  std::atomic<uint64_t> next{0}, done{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> pool;
  const auto start = std::chrono::steady_clock::now();
  for (int k = 0; k < threads; ++k)
    pool.emplace_back([&] {
      std::vector<std::byte> out(t.output_bytes());
      while (!stop) {
        const uint64_t i = next++;
        t.apply(images[i % images.size()], transform::sample_key(0, 0, i), out);
        ++done;
      }
    });
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& th : pool) th.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("{{\"images_per_s\": {:.1f}, \"threads\": {}, \"images\": {}}}\n",
             static_cast<double>(done) / s, threads, done.load());
}
