// A C++ training loop fed by sluice: runs EPOCHS epochs of the config's dataset, does a stand-in
// "training step" on every batch (a checksum over the bytes), and prints per-epoch throughput.
// With a state file it resumes where the last run stopped and saves its place after every
// batch, so killing it mid-epoch loses nothing.
//
//   cpp_trainer CONFIG.yaml [EPOCHS] [STATE_FILE]

#include <sluice/sluice.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>

namespace {

// The stand-in for forward/backward: touch every byte of every field.
uint64_t train_step(const sluice::Batch& batch) {
  uint64_t sum = 0;
  for (size_t f = 0; f < batch.num_fields(); ++f)
    for (std::byte b : batch.field(f).data) sum += static_cast<uint8_t>(b);
  return sum;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s CONFIG.yaml [EPOCHS] [STATE_FILE]\n", argv[0]);
    return 2;
  }
  const uint64_t epochs = argc > 2 ? std::stoull(argv[2]) : 1;
  const std::string state_file = argc > 3 ? argv[3] : "";
  try {
    auto loader = sluice::Loader::open(sluice::LoaderOptions::from_yaml(argv[1]));
    if (std::ifstream in(state_file); !state_file.empty() && in) {
      sluice::SamplerState s;
      in >> s.epoch >> s.position;
      loader->load_state(s);
      std::printf("resumed at epoch %llu, position %llu\n", (unsigned long long)s.epoch,
                  (unsigned long long)s.position);
    }
    uint64_t checksum = 0;
    while (loader->epoch() < epochs) {
      const uint64_t epoch = loader->epoch();
      auto t0 = std::chrono::steady_clock::now();
      uint64_t samples = 0, batches = 0;
      while (auto batch = loader->next()) {
        checksum += train_step(*batch);
        samples += batch->size();
        ++batches;
        if (!state_file.empty()) {
          sluice::SamplerState s = loader->state();
          std::ofstream(state_file, std::ios::trunc) << s.epoch << " " << s.position << "\n";
        }
      }
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("epoch %llu: %llu batches, %llu samples, %.0f samples/s\n",
                  (unsigned long long)epoch, (unsigned long long)batches,
                  (unsigned long long)samples, samples / (secs > 0 ? secs : 1));
      loader->set_epoch(epoch + 1);
    }
    std::printf("checksum %llu\n", (unsigned long long)checksum);
  } catch (const sluice::Error& e) {
    std::fprintf(stderr, "cpp_trainer: %s\n", e.what());
    return 1;
  }
  return 0;
}
