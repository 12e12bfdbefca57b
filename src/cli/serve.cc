// `sluice serve`: a standalone shard server for storage-only nodes.

#include <sluice/dataset.h>
#include <sluice/error.h>
#include <sluice/server.h>

#include "cli/commands.h"
#include "common/file.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>

namespace sluice::cli {

int run_serve(const ServeArgs& args) {
  ServerOptions options;
  options.listen = args.listen;
  options.read_threads = args.threads;
  options.io.direct = args.direct == "on"    ? DirectIo::kOn
                      : args.direct == "off" ? DirectIo::kOff
                                             : DirectIo::kAuto;
  if (!args.token_file.empty()) {
    std::ifstream in(args.token_file);
    if (!in)
      throw Error(ErrorCode::kNotFound, args.token_file.string() + ": cannot read the token file");
    std::getline(in, options.token);
  } else if (const char* token = std::getenv("SLUICE_TOKEN")) {
    options.token = token;
  }
  auto dataset = Dataset::open(args.dataset);
  // Signals are taken by sigwait below; block them before the server's threads start so that
  // none of those threads is picked to run a default handler.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  auto server = ShardServer::start(dataset, options);
  if (args.json) {
    fmt::print("{}\n", nlohmann::json{{"address", server->address()},
                                      {"dataset", dataset->path().string()},
                                      {"samples", dataset->num_samples()},
                                      {"shards", dataset->shards().size()},
                                      {"io", server->io_description()}}
                           .dump());
  } else {
    fmt::print("sluice serve: {} ({} samples, {} shards) on {}{}; {}; Ctrl-C stops\n",
               dataset->path().string(), dataset->num_samples(), dataset->shards().size(),
               server->address(), options.token.empty() ? ", no token" : ", token required",
               server->io_description());
  }
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop, &sig);
  ServerStats s = server->stats();
  server.reset();
  fmt::print(stderr,
             "sluice serve: stopped by {}: {} requests answered, {} refused, {} bytes sent\n",
             sig == SIGINT ? "SIGINT" : "SIGTERM", s.requests, s.rejected, s.bytes_sent);
  return 0;
}

}  // namespace sluice::cli
