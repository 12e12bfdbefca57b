#pragma once

// The sluice._C module: one binding file per area, all called from module.cc.

#include <pybind11/pybind11.h>

namespace sluice::python {

void bind_errors(pybind11::module_& m);
void bind_dataset(pybind11::module_& m);
void bind_loader(pybind11::module_& m);
void bind_checkpoint(pybind11::module_& m);
void bind_embedding(pybind11::module_& m);
void bind_cli(pybind11::module_& m);

}  // namespace sluice::python
