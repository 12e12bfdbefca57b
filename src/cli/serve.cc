// `sluice serve`: a standalone shard server for storage-only nodes.

#include <sluice/dataset.h>
#include <sluice/error.h>
#include <sluice/server.h>

#include "cli/commands.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <csignal>
#include <cstdio>
#include <cstdlib>

namespace sluice::cli {

int run_serve(const ServeArgs& args) {
  ServerOptions options;
  options.listen = args.listen;
  options.read_threads = args.threads;
  options.io.direct = args.direct == "on"    ? DirectIo::kOn
                      : args.direct == "off" ? DirectIo::kOff
                                             : DirectIo::kAuto;
  // A token from --token-file, else $SLUICE_TOKEN; none at all only with --no-token.
  if (args.no_token && !args.token_file.empty())
    throw Error(ErrorCode::kInvalidArgument, "--no-token and --token-file: pick one");
  options.no_token = args.no_token;
  DistributedOptions from;  // resolved as a Loader's distributed section is
  from.token_file = args.token_file;
  from.no_token = args.no_token;
  options.token = from.resolved_token();
  if (options.token.empty() && !args.no_token)
    throw Error(ErrorCode::kInvalidArgument,
                "no token: give --token-file F (or set $SLUICE_TOKEN); --no-token serves without "
                "one, to anyone who can connect (a single trusted host only)");
  if (args.dataset.empty() && args.checkpoint_dir.empty())
    throw Error(ErrorCode::kInvalidArgument,
                "serve what? give a DATASET, --checkpoint-dir DIR, or both");
  if (!args.checkpoint_dir.empty() && options.token.empty())
    throw Error(ErrorCode::kInvalidArgument,
                "--checkpoint-dir takes copies only from the cluster's token holders: give "
                "--token-file F (or set $SLUICE_TOKEN), not --no-token");
  options.checkpoint_dir = args.checkpoint_dir;
  std::shared_ptr<const Dataset> dataset;
  if (!args.dataset.empty()) dataset = Dataset::open(args.dataset);
  // Signals are taken by sigwait below; block them before the server's threads start so that
  // none of those threads is picked to run a default handler.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  auto server = ShardServer::start(dataset, options);
  if (args.json) {
    nlohmann::json j{{"address", server->address()}, {"io", server->io_description()}};
    if (dataset) {
      j["dataset"] = dataset->path().string();
      j["samples"] = dataset->num_samples();
      j["shards"] = dataset->shards().size();
    }
    if (!args.checkpoint_dir.empty()) j["checkpoint_dir"] = args.checkpoint_dir.string();
    fmt::print("{}\n", j.dump());
  } else {
    std::string what = dataset ? fmt::format("{} ({} samples, {} shards)", dataset->path().string(),
                                             dataset->num_samples(), dataset->shards().size())
                               : std::string("no dataset");
    if (!args.checkpoint_dir.empty())
      what += fmt::format(", checkpoint copies in {}", args.checkpoint_dir.string());
    fmt::print("sluice serve: {} on {}{}; {}; Ctrl-C stops\n", what, server->address(),
               options.token.empty() ? ", no token" : ", token required", server->io_description());
  }
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop, &sig);
  ServerStats s = server->stats();
  server.reset();
  fmt::print(stderr,
             "sluice serve: stopped by {}: {} requests answered, {} rejected, {} busy, {} bytes "
             "sent; {} checkpoint ops ({} bytes in); {} clients served, {} connections refused\n",
             sig == SIGINT ? "SIGINT" : "SIGTERM", s.requests, s.rejected, s.busy, s.bytes_sent,
             s.checkpoint_ops, s.checkpoint_bytes, s.connections, s.refused);
  return 0;
}

}  // namespace sluice::cli
