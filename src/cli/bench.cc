// `sluice bench`: the loader with a C++ consumer that touches every sample.

#include <sluice/sluice.h>

#include "cli/commands.h"
#include "cli/progress.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <csignal>
#include <iostream>
#include <string>

namespace sluice::cli {

namespace {
std::atomic<bool> g_interrupted{false};
void on_sigint(int) { g_interrupted = true; }

nlohmann::json stage_json(const LoaderStats::Stages& s) {
  nlohmann::json out = nlohmann::json::object();
  LoaderStats::Stages::each(s, [&](const char* name, double seconds) { out[name] = seconds; });
  return out;
}
}  // namespace

int run_bench(const BenchArgs& args) {
  LoaderOptions options = LoaderOptions::from_yaml(args.config);
  auto loader = Loader::open(options);
  std::signal(SIGINT, on_sigint);  // Ctrl-C: stop, shut the loader down, print what was done

  const bool by_epochs = args.epochs > 0;
  Progress progress(
      "bench",
      by_epochs ? args.epochs * loader->num_batches() : static_cast<uint64_t>(args.seconds),
      by_epochs ? "batches" : "s", !args.json);
  auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  uint64_t checksum = 0, epochs_done = 0, batches = 0;
  while (!g_interrupted) {
    auto batch = loader->next();
    if (!batch) {
      if (by_epochs && ++epochs_done >= args.epochs) break;
      continue;
    }
    // Touch every sample: one load per 4 KiB page of every field of every sample.
    for (size_t f = 0; f < batch->num_fields(); ++f) {
      FieldView v = batch->field(f);
      for (size_t i = 0; i < v.data.size(); i += 4096) checksum += static_cast<uint8_t>(v.data[i]);
      if (!v.data.empty()) checksum += static_cast<uint8_t>(v.data.back());
    }
    ++batches;
    if (by_epochs)
      progress.update(batches);
    else
      progress.update(static_cast<uint64_t>(elapsed()));
    if (!by_epochs && elapsed() >= args.seconds) break;
  }
  double seconds = elapsed();
  progress.finish();
  LoaderStats stats = loader->stats();
  const double cpu = stats.cpu_seconds;  // the process's, since the loader opened
  loader.reset();                        // joins the loader threads before we report
  double sps = static_cast<double>(stats.samples) / seconds,
         bps = static_cast<double>(stats.bytes) / seconds;
  double wait = seconds > 0 ? stats.wait_seconds / seconds : 0;
  const double cpu_us = stats.samples ? cpu / static_cast<double>(stats.samples) * 1e6 : 0.0;
  const bool cached = stats.source_bytes + stats.cache_hits + stats.cache_misses > 0;
  if (args.json) {
    nlohmann::json out{{"samples_per_s", sps},
                       {"bytes_per_s", bps},
                       {"batches", stats.batches},
                       {"wait_fraction", wait},
                       {"samples", stats.samples},
                       {"bytes", stats.bytes},
                       {"seconds", seconds},
                       {"engine", stats.engine},
                       {"direct_io", stats.direct_io},
                       {"interrupted", g_interrupted.load()},
                       {"touch", checksum},
                       {"cpu_us_per_sample", cpu_us},
                       {"cpu_cores", seconds > 0 ? cpu / seconds : 0.0},
                       {"io_inflight_mean", stats.io_inflight_mean},
                       {"io_idle_fraction", stats.io_idle_fraction},
                       {"io_inflight_hist", stats.io_inflight_hist},
                       {"io_completions", stats.io_completions},
                       {"stage_seconds", stage_json(stats.stage_seconds)}};
    if (cached) {
      out["source_bytes"] = stats.source_bytes;
      out["source_requests"] = stats.source_requests;
      out["cache_hits"] = stats.cache_hits;
      out["cache_misses"] = stats.cache_misses;
    }
    std::cout << out << "\n";
  } else {
    fmt::print("{} batches, {} samples, {} bytes in {:.2f} s{}\n", stats.batches, stats.samples,
               stats.bytes, seconds, g_interrupted ? " (interrupted)" : "");
    fmt::print("samples/s     {:.0f}\nbytes/s       {:.0f} ({:.1f} MiB/s)\nwait fraction {:.3f}\n",
               sps, bps, bps / (1 << 20), wait);
    fmt::print("engine        {}{}\n", stats.engine,
               stats.direct_io ? ", O_DIRECT" : ", page cache");
    fmt::print("cpu           {:.2f} us per sample, {:.2f} cores\n", cpu_us,
               seconds > 0 ? cpu / seconds : 0.0);
    fmt::print("in flight     {:.1f} reads on average, none {:.1f}% of the time\n",
               stats.io_inflight_mean, 100 * stats.io_idle_fraction);
    std::string stages;
    LoaderStats::Stages::each(stats.stage_seconds, [&](const char* name, double s) {
      stages += fmt::format("{}{} {:.2f}", stages.empty() ? "" : ", ", name, s);
    });
    fmt::print("loader s      {}\n", stages);
    if (cached)
      fmt::print("source        {} bytes in {} requests; cache hits {}, misses {}\n",
                 stats.source_bytes, stats.source_requests, stats.cache_hits, stats.cache_misses);
  }
  return g_interrupted ? 130 : 0;
}

}  // namespace sluice::cli
