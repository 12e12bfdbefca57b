#include <sluice/sluice.h>

#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "sluice's compiled core; use the `sluice` package, not this module";
  m.attr("__version__") = std::string(sluice::version());
  sluice::python::bind_errors(m);
  sluice::python::bind_dataset(m);
  sluice::python::bind_loader(m);
  sluice::python::bind_checkpoint(m);
  sluice::python::bind_embedding(m);
  sluice::python::bind_cli(m);
}
