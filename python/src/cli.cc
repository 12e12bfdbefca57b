// sluice._C.cli: the command line in this process, for the `sluice` command the wheel installs
// (sluice/_cli.py). Arrow sources of `sluice pack` go back to Python (sluice/_arrow.py).

#include "bindings.h"
#include "cli/commands.h"

#include <sluice/sluice.h>

#include <pybind11/stl.h>

#include <cstdio>
#include <iostream>

namespace py = pybind11;

namespace sluice::python {

void bind_cli(py::module_& m) {
  m.def(
      "cli",
      [](std::vector<std::string> args, py::object arrow_pack) {
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(a.data());
        argv.push_back(nullptr);
        cli::ArrowPack arrow = [&](const cli::PackArgs& p) {
          py::gil_scoped_acquire gil;
          std::vector<std::string> sources;
          for (const auto& s : p.sources) sources.push_back(s.string());
          try {
            return arrow_pack(sources, p.output.string(), py::arg("shard_bytes") = p.shard_bytes,
                              py::arg("alignment") = p.alignment, py::arg("force") = p.force,
                              py::arg("as_json") = p.json)
                .cast<int>();
          } catch (py::error_already_set& e) {  // the message alone, as the CLI prints its own
            const auto code = e.matches(PyExc_FileNotFoundError) ? ErrorCode::kNotFound
                              : e.matches(PyExc_ValueError) || e.matches(PyExc_TypeError)
                                  ? ErrorCode::kInvalidArgument
                                  : ErrorCode::kIo;
            throw Error(code, py::str(e.value()).cast<std::string>());
          }
        };
        int rc;
        {
          py::gil_scoped_release nogil;
          rc = cli::run(static_cast<int>(args.size()), argv.data(), arrow);
          std::cout.flush();
          std::fflush(stdout);
        }
        return rc;
      },
      py::arg("argv"), py::arg("arrow_pack"),
      "Runs the `sluice` command line (argv[0] is the program name); returns its exit code.");
}

}  // namespace sluice::python
