// sluice::Error -> the Python exception a user expects: ValueError for bad config or
// arguments, FileNotFoundError, OSError with errno, sluice.CorruptionError for checksum and
// format damage, RuntimeError for what this build or machine cannot do.

#include <sluice/error.h>

#include <cerrno>

#include "bindings.h"

namespace py = pybind11;

namespace sluice::python {

void bind_errors(py::module_& m) {
  // Leaked on purpose: the type lives as long as the interpreter, and the translator below may
  // run during interpreter shutdown.
  static PyObject* corruption = PyErr_NewExceptionWithDoc(
      "sluice.CorruptionError",
      "Stored bytes do not match their checksum, or a dataset file is damaged. The message names "
      "the file and, where it applies, the sample index.",
      PyExc_RuntimeError, nullptr);
  m.attr("CorruptionError") = py::handle(corruption);

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      auto os_error = [&](PyObject* type, int err) {
        py::object args = py::make_tuple(err, e.what());
        PyErr_SetObject(type, args.ptr());
      };
      switch (e.code()) {
        case ErrorCode::kInvalidArgument:
        case ErrorCode::kConfig:
          PyErr_SetString(PyExc_ValueError, e.what());
          return;
        case ErrorCode::kNotFound:
          os_error(PyExc_FileNotFoundError, ENOENT);
          return;
        case ErrorCode::kIo:
          if (e.sys_errno() != 0)
            os_error(PyExc_OSError, e.sys_errno());
          else
            PyErr_SetString(PyExc_OSError, e.what());
          return;
        case ErrorCode::kCorruption:
          PyErr_SetString(corruption, e.what());
          return;
        case ErrorCode::kUnsupported:
          PyErr_SetString(PyExc_RuntimeError, e.what());
          return;
      }
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });
}

}  // namespace sluice::python
