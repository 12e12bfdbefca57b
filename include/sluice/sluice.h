#pragma once

/// sluice: a data loader that keeps GPUs fed. This header pulls in the whole public API.

#include <sluice/checkpoint.h>
#include <sluice/dataset.h>
#include <sluice/embedding.h>
#include <sluice/error.h>
#include <sluice/export.h>
#include <sluice/loader.h>
#include <sluice/options.h>
#include <sluice/sampler.h>
#include <sluice/server.h>

namespace sluice {

/// The library's version, "MAJOR.MINOR.PATCH".
SLUICE_EXPORT const char* version();

}  // namespace sluice
