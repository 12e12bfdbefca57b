// What a trainer waits for: next() of a Loader feeding a step of STEP_MS milliseconds (a sleep,
// as a step whose time is on the GPU). Prints next()'s median, p90 and max, and the share of
// the loop's time spent in next(); the first 10 batches (the pipeline filling) are left out.
//   next_wait DATASET [BATCH_SIZE=2048] [STEP_MS=20] [STEPS=200]

#include <sluice/loader.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: next_wait DATASET [BATCH_SIZE] [STEP_MS] [STEPS]\n");
    return 2;
  }
  using Clock = std::chrono::steady_clock;
  sluice::LoaderOptions o;
  o.dataset.path = argv[1];
  o.batch_size = argc > 2 ? std::stoull(argv[2]) : 2048;
  const auto step = std::chrono::milliseconds(argc > 3 ? std::stoll(argv[3]) : 20);
  const int steps = argc > 4 ? std::stoi(argv[4]) : 200;
  auto loader = sluice::Loader::open(o);
  std::vector<double> waits;
  double waited = 0;
  Clock::time_point start = Clock::now();
  for (int i = 0; i < steps;) {
    const auto t0 = Clock::now();
    auto batch = loader->next();
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    if (!batch) {  // the epoch's end: the next one
      loader->set_epoch(loader->epoch() + 1);
      continue;
    }
    if (i == 10) start = t0;
    if (i >= 10) {
      waits.push_back(ms);
      waited += ms;
    }
    ++i;
    std::this_thread::sleep_for(step);
  }
  const double total = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  std::sort(waits.begin(), waits.end());
  std::printf("next(): median %.3f ms, p90 %.3f ms, max %.2f ms; wait %.4f of the loop\n",
              waits[waits.size() / 2], waits[waits.size() * 9 / 10], waits.back(),
              waited / total);
}
