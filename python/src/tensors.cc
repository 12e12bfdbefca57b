#include "tensors.h"

#include <dlpack/dlpack.h>

namespace py = pybind11;

namespace sluice::python {
namespace {

struct Export {
  DLManagedTensor tensor{};
  std::shared_ptr<const Batch> batch;
  std::vector<int64_t> shape;
  std::vector<std::byte> owned;
};

DLDataType dl_type(DType t) {
  auto of = [](uint8_t code, uint8_t bits) { return DLDataType{code, bits, 1}; };
  switch (t) {
    case DType::kUInt8:
      return of(kDLUInt, 8);
    case DType::kInt8:
      return of(kDLInt, 8);
    case DType::kUInt16:
      return of(kDLUInt, 16);
    case DType::kInt16:
      return of(kDLInt, 16);
    case DType::kUInt32:
      return of(kDLUInt, 32);
    case DType::kInt32:
      return of(kDLInt, 32);
    case DType::kUInt64:
      return of(kDLUInt, 64);
    case DType::kInt64:
      return of(kDLInt, 64);
    case DType::kFloat16:
      return of(kDLFloat, 16);
    case DType::kBFloat16:
      return of(kDLBfloat, 16);
    case DType::kFloat32:
      return of(kDLFloat, 32);
    case DType::kFloat64:
      return of(kDLFloat, 64);
    case DType::kBool:
      return of(6, 8);  // kDLBool, added in DLPack 0.8 (Debian ships 0.6)
  }
  return of(kDLUInt, 8);
}

void delete_export(DLManagedTensor* t) { delete static_cast<Export*>(t->manager_ctx); }

// Runs when the capsule dies. A consumer that took the tensor renamed the capsule to
// "used_dltensor" and calls the deleter itself; otherwise it is ours to free.
void capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* t = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (t && t->deleter) t->deleter(t);
  } else {
    PyErr_Clear();
  }
}

}  // namespace

namespace {

py::capsule make_capsule(std::unique_ptr<Export> e, const void* data, DType dtype,
                         int cuda_device = -1) {
  DLTensor& t = e->tensor.dl_tensor;
  t.data = const_cast<void*>(data);
  t.device = cuda_device >= 0 ? DLDevice{kDLCUDA, cuda_device} : DLDevice{kDLCPU, 0};
  t.ndim = static_cast<int32_t>(e->shape.size());
  t.dtype = dl_type(dtype);
  t.shape = e->shape.data();
  t.strides = nullptr;  // compact, row-major
  t.byte_offset = 0;
  e->tensor.manager_ctx = e.get();
  e->tensor.deleter = delete_export;
  PyObject* capsule = PyCapsule_New(&e->tensor, "dltensor", capsule_destructor);
  if (!capsule) throw py::error_already_set();
  e.release();  // owned by the capsule, then by the consumer's tensor
  return py::reinterpret_steal<py::capsule>(capsule);
}

}  // namespace

py::capsule to_dlpack(std::shared_ptr<const Batch> batch, const void* data, DType dtype,
                      std::vector<int64_t> shape, int cuda_device) {
  auto e = std::make_unique<Export>();
  e->batch = std::move(batch);
  e->shape = std::move(shape);
  return make_capsule(std::move(e), data, dtype, cuda_device);
}

py::capsule to_dlpack(std::vector<std::byte> bytes, DType dtype, std::vector<int64_t> shape) {
  auto e = std::make_unique<Export>();
  e->owned = std::move(bytes);
  e->shape = std::move(shape);
  const void* data = e->owned.data();
  return make_capsule(std::move(e), data, dtype);
}

}  // namespace sluice::python
