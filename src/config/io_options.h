#pragma once

// The config's io section in the io layer's own terms (io::EngineOptions), for the layers that
// hold a LoaderOptions or ServerOptions and start engines (the loader, the shard server).

#include <sluice/options.h>

#include "io/engine.h"

namespace sluice::config {

inline io::EngineOptions engine_options(const IoOptions& io) {
  io::EngineOptions out;
  out.kind = io.engine == IoEngineKind::kUring     ? io::EngineKind::kUring
             : io.engine == IoEngineKind::kThreads ? io::EngineKind::kThreads
                                                   : io::EngineKind::kAuto;
  out.queue_depth = io.queue_depth;
  return out;
}

}  // namespace sluice::config
