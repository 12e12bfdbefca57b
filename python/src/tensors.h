#pragma once

// Batches as DLPack capsules: zero-copy views that keep the batch (and so its pooled buffer)
// alive until the consumer's tensor lets go.

#include <sluice/loader.h>

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace sluice::python {

/// A "dltensor" capsule viewing `data` (dtype, shape) in `batch`'s buffer, on GPU
/// `cuda_device` or in host memory (-1); the tensor made from it keeps the batch alive.
pybind11::capsule to_dlpack(std::shared_ptr<const Batch> batch, const void* data, DType dtype,
                            std::vector<int64_t> shape, int cuda_device = -1);
/// A "dltensor" capsule owning `bytes` (for small per-batch metadata: indices, offsets, which
/// should not pin the batch's buffer when a consumer keeps only them).
pybind11::capsule to_dlpack(std::vector<std::byte> bytes, DType dtype, std::vector<int64_t> shape);

}  // namespace sluice::python
