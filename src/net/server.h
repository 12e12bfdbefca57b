#pragma once

// The shard server's internal entry point: ShardServer::start (include/sluice/server.h) with
// the test seams of one server.

#include <sluice/server.h>

#include "io/engine.h"
#include "net/wire.h"

#include <chrono>
#include <functional>
#include <memory>
#include <span>

namespace sluice::net {

/// Fault injection at the transport: each reply passes through it before it is sent. It may
/// change the header or the data (a peer that sends garbage) or set `delay` (a slow peer: the
/// server's reader thread sleeps that long).
using ReplyFault = std::function<void(ReplyHeader& header, std::span<std::byte> data,
                                      std::chrono::milliseconds& delay)>;

/// One server's test seams; empty: normal operation.
struct ServerFaults {
  std::shared_ptr<const io::Faults> io;  // its engines'
  ReplyFault reply;
};

std::unique_ptr<ShardServer> start_server(std::shared_ptr<const Dataset> dataset,
                                          const ServerOptions& options, ServerFaults faults);

}  // namespace sluice::net
