#include "pipeline/worker_stats.h"

#include <algorithm>

namespace sluice::pipeline {

void add_up(const io::QueueStats* service, std::span<const WorkerStats> workers, LoaderStats& out) {
  io::QueueStats::Snapshot q;
  double longest = 0;  // the queues ran side by side: their means add up over the same time
  auto add = [&](const io::QueueStats& stats) {
    io::QueueStats::Snapshot one = stats.snapshot();
    longest = std::max(longest, one.total_seconds());
    q += one;
  };
  if (service) add(*service);
  for (const WorkerStats& w : workers) {
    add(w.queue);
    size_t k = 0;
    LoaderStats::Stages::each(out.stage_seconds, [&](const char*, double& seconds) {
      seconds += static_cast<double>(w.ns[k++].load(std::memory_order_relaxed)) / 1e9;
    });
  }
  const double total = q.total_seconds();
  out.io_inflight_mean = longest > 0 ? q.read_seconds / longest : 0;
  out.io_inflight_hist.assign(q.seconds.size(), 0);
  if (total > 0)
    for (size_t i = 0; i < q.seconds.size(); ++i) out.io_inflight_hist[i] = q.seconds[i] / total;
  out.io_idle_fraction = out.io_inflight_hist[0];
  out.io_completions = q.completions;
}

}  // namespace sluice::pipeline
