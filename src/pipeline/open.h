#pragma once

// The Loader's internal entry point: Loader::open (include/sluice/loader.h) with the test
// seams of one loader (its engines' faults).

#include <sluice/loader.h>

#include "io/engine.h"

#include <memory>

namespace sluice::pipeline {

std::unique_ptr<Loader> open_loader(const LoaderOptions& options,
                                    std::shared_ptr<const io::Faults> faults);

}  // namespace sluice::pipeline
