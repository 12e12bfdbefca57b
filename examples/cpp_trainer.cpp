// A C++ training loop fed by sluice: runs EPOCHS epochs of the config's dataset, does a stand-in
// "training step" on every batch (a checksum over the bytes), and prints per-epoch throughput.
// With a state file it resumes where the last run stopped and saves its place after every
// batch, so killing it mid-epoch loses nothing. The state is written atomically (a temporary
// file, fsync, rename, fsync of the directory): after a crash the file holds the last place or
// the one before, never a torn or empty one. A state file that exists but cannot be read is an
// error, not a fresh start; only a file that does not exist yet starts at the beginning.
//
//   cpp_trainer CONFIG.yaml [EPOCHS] [STATE_FILE]

#include <sluice/sluice.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>

namespace {

// The stand-in for forward/backward: touch every byte of every field.
uint64_t train_step(const sluice::Batch& batch) {
  uint64_t sum = 0;
  for (size_t f = 0; f < batch.num_fields(); ++f)
    for (std::byte b : batch.field(f).data) sum += static_cast<uint8_t>(b);
  return sum;
}

[[noreturn]] void fail(const std::string& what) {
  throw std::runtime_error(what + ": " + std::strerror(errno));
}

// Replaces `path` with "EPOCH POSITION\n", all or nothing.
void save_state(const std::string& path, const sluice::SamplerState& s) {
  const std::string tmp = path + ".tmp";
  const std::string text = std::to_string(s.epoch) + " " + std::to_string(s.position) + "\n";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("open " + tmp);
  if (::write(fd, text.data(), text.size()) != static_cast<ssize_t>(text.size()) ||
      ::fsync(fd) != 0) {
    ::close(fd);
    fail("write " + tmp);
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename " + tmp);
  std::string dir = std::filesystem::path(path).parent_path().string();
  int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0 || ::fsync(dfd) != 0) fail("fsync the directory of " + path);
  ::close(dfd);
}

// The saved place; false when the file does not exist yet. Anything else unreadable throws.
bool load_state(const std::string& path, sluice::SamplerState& s) {
  std::ifstream in(path);
  if (!in) {
    if (errno == ENOENT) return false;
    fail("read " + path);
  }
  std::string rest;
  if (!(in >> s.epoch >> s.position) || (in >> rest))
    throw std::runtime_error(path + ": not a state file (expected \"EPOCH POSITION\")");
  return true;
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
    if (sluice::SamplerState s; !state_file.empty() && load_state(state_file, s)) {
      loader->load_state(s);
      std::printf("resumed at epoch %llu, position %llu\n", (unsigned long long)s.epoch,
                  (unsigned long long)s.position);
    } else if (!state_file.empty()) {
      std::printf("no state file yet: starting at epoch 0\n");
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
        if (!state_file.empty()) save_state(state_file, loader->state());
      }
      double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("epoch %llu: %llu batches, %llu samples, %.0f samples/s\n",
                  (unsigned long long)epoch, (unsigned long long)batches,
                  (unsigned long long)samples, samples / (secs > 0 ? secs : 1));
      loader->set_epoch(epoch + 1);
    }
    std::printf("checksum %llu\n", (unsigned long long)checksum);
  } catch (const std::exception& e) {  // sluice::Error, and the state file's errors
    std::fprintf(stderr, "cpp_trainer: %s\n", e.what());
    return 1;
  }
  return 0;
}
