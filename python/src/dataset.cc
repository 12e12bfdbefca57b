// sluice._C.Dataset: a packed dataset opened for inspection and for tools that read samples
// one at a time (benchmark peers, converters).

#include <sluice/dataset.h>
#include <sluice/error.h>
#include <filesystem>

#include <pybind11/stl.h>

#include "bindings.h"

namespace py = pybind11;

namespace sluice::python {
namespace {

FieldSpec field_spec(const py::handle& f) {
  py::dict d = py::reinterpret_borrow<py::dict>(f);
  FieldSpec spec;
  spec.name = d["name"].cast<std::string>();
  if (d.contains("dtype")) {
    auto name = d["dtype"].cast<std::string>();
    auto dtype = dtype_from_name(name);
    if (!dtype)
      throw Error(ErrorCode::kInvalidArgument,
                  "field \"" + spec.name + "\": unknown dtype \"" + name + "\"");
    spec.dtype = *dtype;
  }
  if (d.contains("shape")) spec.shape = d["shape"].cast<std::vector<int64_t>>();
  return spec;
}

// DatasetWriter with the GIL released while it writes; samples are any buffer objects
// (bytes, numpy arrays, contiguous tensors' .numpy()).
class PyWriter {
 public:
  PyWriter(const std::string& path, const py::list& fields, uint64_t shard_bytes,
           uint32_t alignment, const std::vector<std::string>& classes, bool overwrite) {
    WriterOptions o;
    for (auto f : fields) o.fields.push_back(field_spec(f));
    o.shard_bytes = shard_bytes;
    o.alignment = alignment;
    o.classes = classes;
    o.overwrite = overwrite;
    names_.reserve(o.fields.size());
    for (const auto& f : o.fields) names_.push_back(f.name);
    writer_ = DatasetWriter::create(path, o);
  }

  uint64_t add(const py::object& sample) {
    std::vector<py::buffer_info> infos;
    infos.reserve(names_.size());
    if (py::isinstance<py::dict>(sample)) {
      py::dict d = sample.cast<py::dict>();
      if (d.size() != names_.size())
        throw Error(ErrorCode::kInvalidArgument, "DatasetWriter.add: sample has " +
                                                     std::to_string(d.size()) + " fields, schema " +
                                                     std::to_string(names_.size()));
      for (const auto& name : names_) {
        if (!d.contains(name))
          throw Error(ErrorCode::kInvalidArgument,
                      "DatasetWriter.add: sample has no field \"" + name + "\"");
        infos.push_back(py::buffer(d[py::str(name)]).request());
      }
    } else {
      for (auto item : sample) infos.push_back(py::reinterpret_borrow<py::buffer>(item).request());
    }
    std::vector<std::span<const std::byte>> spans;
    for (const auto& info : infos) {
      if (info.ndim > 0 && info.strides.back() != info.itemsize)
        throw Error(ErrorCode::kInvalidArgument, "DatasetWriter.add: fields must be contiguous");
      spans.emplace_back(static_cast<const std::byte*>(info.ptr),
                         static_cast<size_t>(info.size * info.itemsize));
    }
    py::gil_scoped_release nogil;
    return writer().add(spans);
  }

  void finish() {
    py::gil_scoped_release nogil;
    writer().finish();
    writer_.reset();
  }

  DatasetWriter& writer() {
    if (!writer_) throw Error(ErrorCode::kInvalidArgument, "DatasetWriter: used after finish()");
    return *writer_;
  }

 private:
  std::vector<std::string> names_;
  std::unique_ptr<DatasetWriter> writer_;
};

}  // namespace

void bind_dataset(py::module_& m) {
  py::class_<PyWriter>(m, "DatasetWriter")
      .def(py::init<const std::string&, const py::list&, uint64_t, uint32_t,
                    const std::vector<std::string>&, bool>(),
           py::arg("path"), py::arg("fields"), py::arg("shard_bytes") = 256ull << 20,
           py::arg("alignment") = 4096, py::arg("classes") = std::vector<std::string>{},
           py::arg("overwrite") = false)
      .def("add", &PyWriter::add, py::arg("sample"))
      .def("finish", &PyWriter::finish)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__",
           [](PyWriter& w, const py::object& type, const py::object&, const py::object&) {
             // Publish only a complete dataset: on an exception nothing appears at `path`.
             if (type.is_none()) w.finish();
           })
      .def_property_readonly("num_samples", [](PyWriter& w) { return w.writer().num_samples(); });

  py::class_<Dataset, std::shared_ptr<Dataset>>(m, "Dataset")
      // A directory is a packed dataset; a file is a source read in place (a .tar or .npy).
      .def(py::init([](const std::string& path) {
             if (std::filesystem::is_directory(path)) return Dataset::open(path);
             DatasetOptions source;
             source.path = path;
             return Dataset::open_source(source);
           }),
           py::arg("path"))
      .def("__len__", &Dataset::num_samples)
      .def_property_readonly("path", [](const Dataset& d) { return d.path().string(); })
      .def_property_readonly("total_bytes", &Dataset::total_bytes)
      .def_property_readonly("classes", &Dataset::classes)
      .def_property_readonly("shards",
                             [](const Dataset& d) {
                               std::vector<std::string> out;
                               for (const auto& s : d.shards()) out.push_back(s.path.string());
                               return out;
                             })
      .def_property_readonly(
          "fields",
          [](const Dataset& d) {
            py::list out;
            for (const FieldSpec& f : d.fields())
              out.append(py::dict(py::arg("name") = f.name, py::arg("dtype") = dtype_name(f.dtype),
                                  py::arg("shape") = f.shape));
            return out;
          })
      .def(
          "extent",
          [](const Dataset& d, uint64_t index) {
            SampleExtent e = d.extent(index);
            return py::make_tuple(d.shards()[e.shard].path.string(), e.offset, e.size);
          },
          py::arg("index"))
      .def(
          "sample",
          [](const Dataset& d, uint64_t index) {
            std::vector<std::byte> record;
            {
              py::gil_scoped_release nogil;
              record = d.read_record(index);
            }
            SampleFields parts = d.parse_record(index, record);
            py::dict out;
            for (size_t i = 0; i < parts.fields.size(); ++i)
              out[py::str(d.fields()[i].name)] = py::bytes(
                  reinterpret_cast<const char*>(parts.fields[i].data()), parts.fields[i].size());
            return out;
          },
          py::arg("index"));
}

}  // namespace sluice::python
