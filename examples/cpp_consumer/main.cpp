// Reads the first batch of rank 0 in epoch 0 from a config, checksum-verified, and prints the
// global sample indices and record sizes.
//   consumer train.yaml
#include <sluice/sluice.h>

#include <cstdio>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CONFIG.yaml\n", argv[0]);
    return 2;
  }
  try {
    auto options = sluice::LoaderOptions::from_yaml(argv[1]);
    auto dataset = sluice::Dataset::open(options.dataset.path);
    sluice::Sampler sampler(options.sampler_options(), dataset->num_samples(),
                            dataset->shard_sizes());
    sluice::RankPlan plan =
        sampler.plan({0, 0}, options.resolved_rank(), options.resolved_world_size());
    std::vector<sluice::SampleRef> batch;
    if (plan.num_batches() > 0) plan.batch(0, batch);
    for (const auto& s : batch) {
      auto record = dataset->read_record(s.index);
      std::printf("%llu %zu\n", static_cast<unsigned long long>(s.index), record.size());
    }
  } catch (const sluice::Error& e) {
    std::fprintf(stderr, "consumer: %s\n", e.what());
    return 1;
  }
  return 0;
}
