// sluice._C.Dataset: a packed dataset opened for inspection and for tools that read samples
// one at a time (benchmark peers, converters).

#include <sluice/dataset.h>
#include <sluice/error.h>
#include <cstring>
#include <filesystem>

#include <pybind11/stl.h>

#include "bindings.h"

namespace py = pybind11;

namespace sluice::python {
namespace {

[[noreturn]] void bad_fields(const std::string& why) {
  throw py::type_error(
      "DatasetWriter fields: " + why +
      "; expected a list of {\"name\": N, \"dtype\": \"uint8\", \"shape\": [-1]} (in field "
      "order), or a dict {name: (dtype, shape)} (-1 in a shape: any length)");
}

// One field: {"name", "dtype", "shape"}, or with `name` given (a dict's key) (dtype, shape) or
// {"dtype", "shape"}. A dtype is its name ("float32") or anything whose str() is (np.dtype).
FieldSpec field_spec(const py::handle& f, const std::string& name = "") {
  FieldSpec spec;
  py::object dtype = py::none(), shape = py::none();
  if (py::isinstance<py::dict>(f)) {
    py::dict d = py::reinterpret_borrow<py::dict>(f);
    if (name.empty() && !d.contains("name")) bad_fields("a field without \"name\"");
    spec.name = name.empty() ? py::str(d["name"]).cast<std::string>() : name;
    if (d.contains("dtype")) dtype = d["dtype"];
    if (d.contains("shape")) shape = d["shape"];
  } else if (!name.empty() && py::isinstance<py::tuple>(f) && py::len(f) == 2) {
    spec.name = name;
    dtype = py::reinterpret_borrow<py::tuple>(f)[0];
    shape = py::reinterpret_borrow<py::tuple>(f)[1];
  } else {
    bad_fields("field " + (name.empty() ? py::repr(f).cast<std::string>() : "\"" + name + "\"") +
               " is a " + py::str(py::type::of(f).attr("__name__")).cast<std::string>());
  }
  if (!dtype.is_none()) {
    auto dname = py::str(dtype).cast<std::string>();
    auto parsed = dtype_from_name(dname);
    if (!parsed)
      throw Error(ErrorCode::kInvalidArgument,
                  "field \"" + spec.name + "\": unknown dtype \"" + dname + "\"");
    spec.dtype = *parsed;
  }
  if (!shape.is_none()) spec.shape = shape.cast<std::vector<int64_t>>();
  return spec;
}

std::vector<FieldSpec> field_specs(const py::object& fields) {
  std::vector<FieldSpec> specs;
  if (py::isinstance<py::dict>(fields)) {
    for (auto [k, v] : py::reinterpret_borrow<py::dict>(fields))
      specs.push_back(field_spec(v, py::str(k).cast<std::string>()));
  } else if (py::isinstance<py::list>(fields) || py::isinstance<py::tuple>(fields)) {
    for (auto f : fields) specs.push_back(field_spec(f));
  } else {
    bad_fields("a " + py::str(py::type::of(fields).attr("__name__")).cast<std::string>());
  }
  return specs;
}

// Element kinds as Python's struct format names them: 'i' signed, 'u' unsigned, 'f' float,
// 'b' bool; 0 for anything else.
char format_kind(std::string format) {
  while (!format.empty() && std::strchr("@=<>!", format[0])) format.erase(0, 1);
  if (format.size() != 1) return 0;
  switch (format[0]) {
    case 'b':
    case 'h':
    case 'i':
    case 'l':
    case 'q':
    case 'n':
      return 'i';
    case 'B':
    case 'H':
    case 'I':
    case 'L':
    case 'Q':
    case 'N':
      return 'u';
    case 'e':
    case 'f':
    case 'd':
      return 'f';
    case '?':
      return 'b';
    default:
      return 0;
  }
}

char dtype_kind(DType t) {
  switch (t) {
    case DType::kUInt8:
    case DType::kUInt16:
    case DType::kUInt32:
    case DType::kUInt64:
      return 'u';
    case DType::kInt8:
    case DType::kInt16:
    case DType::kInt32:
    case DType::kInt64:
      return 'i';
    case DType::kFloat16:
    case DType::kFloat32:
    case DType::kFloat64:
      return 'f';
    case DType::kBool:
      return 'b';
    case DType::kBFloat16:
      return 'x';  // no struct format: its raw 16-bit patterns
  }
  return 0;
}

std::string kind_name(char kind, size_t itemsize) {
  switch (kind) {
    case 'i':
      return "int" + std::to_string(itemsize * 8);
    case 'u':
      return "uint" + std::to_string(itemsize * 8);
    case 'f':
      return "float" + std::to_string(itemsize * 8);
    case 'b':
      return "bool";
    default:
      return "an unknown element type";
  }
}

// One field's value as contiguous bytes of the field's dtype and shape, or an error naming the
// field. Takes bytes-like objects and numpy arrays (any strides: copied when not contiguous),
// torch tensors (any device), numpy scalars and Python numbers.
class FieldValue {
 public:
  FieldValue(const FieldSpec& field, const py::handle& value) : field_(field) {
    const size_t itemsize = dtype_size(field.dtype);
    if (py::isinstance<py::bool_>(value) || py::isinstance<py::int_>(value) ||
        py::isinstance<py::float_>(value)) {
      number(value, itemsize);
      return;
    }
    py::object obj = py::reinterpret_borrow<py::object>(value);
    if (!py::isinstance<py::buffer>(obj)) {
      if (py::hasattr(obj, "detach") && py::hasattr(obj, "numpy")) {  // a torch tensor
        obj = obj.attr("detach")().attr("cpu")();
        if (field.dtype == DType::kBFloat16 &&
            py::str(obj.attr("dtype")).cast<std::string>() == "torch.bfloat16")
          obj = obj.attr("view")(py::module_::import("torch").attr("int16"));
        obj = obj.attr("numpy")();
      } else if (py::hasattr(obj, "__array__")) {
        obj = py::module_::import("numpy").attr("asarray")(obj);
      } else {
        fail(fmt("cannot take a {} (bytes, a numpy array, a torch tensor or a number)",
                 py::str(py::type::of(obj).attr("__name__")).cast<std::string>()));
      }
    }
    keep_ = obj;
    py::buffer_info info = py::reinterpret_borrow<py::buffer>(obj).request();
    check_type(info);
    check_shape(info);
    const size_t n = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
    if (contiguous(info)) {
      bytes_ = {static_cast<const std::byte*>(info.ptr), n};
    } else {  // x[::2] and the like: copied in C order, element by element
      copy_.resize(n);
      std::byte* out = copy_.data();
      copy_strided(info, 0, static_cast<const std::byte*>(info.ptr), out);
      bytes_ = copy_;
    }
  }

  std::span<const std::byte> bytes() const { return bytes_; }

 private:
  template <typename... Args>
  static std::string fmt(const char* f, Args&&... args) {
    return py::str(f).attr("format")(std::forward<Args>(args)...).template cast<std::string>();
  }

  [[noreturn]] void fail(const std::string& why) const {
    throw Error(ErrorCode::kInvalidArgument, "DatasetWriter.add: field \"" + field_.name + "\" (" +
                                                 std::string(dtype_name(field_.dtype)) +
                                                 "): " + why);
  }

  // A Python number into one element of the field's dtype, refusing what does not fit.
  void number(const py::handle& value, size_t itemsize) {
    bool scalar = field_.shape.empty() ||
                  (field_.shape.size() == 1 && (field_.shape[0] == 1 || field_.shape[0] == -1));
    if (!scalar) fail("a single number for a field of shape " + shape_text(field_.shape));
    const char kind = dtype_kind(field_.dtype);
    copy_.resize(itemsize);
    auto put = [&](auto v) { std::memcpy(copy_.data(), &v, sizeof v); };
    if (py::isinstance<py::float_>(value) && kind != 'f')
      fail(fmt("{} is a float; the field holds {}", py::repr(value).cast<std::string>(),
               std::string(dtype_name(field_.dtype))));
    if (kind == 'b') {
      if (!py::isinstance<py::bool_>(value) && !py::isinstance<py::int_>(value))
        fail("expected a bool");
      const long long v = value.cast<long long>();
      if (v != 0 && v != 1) fail(fmt("{} is not a bool", v));
      put(static_cast<uint8_t>(v));
    } else if (kind == 'f') {
      const double v = value.cast<double>();
      if (field_.dtype == DType::kFloat64)
        put(v);
      else if (field_.dtype == DType::kFloat32)
        put(static_cast<float>(v));
      else
        fail("give float16 values as a numpy array of float16");
    } else if (kind == 'i' || kind == 'u') {
      // Range checked by Python's own int.to_bytes: OverflowError -> our message.
      try {
        py::object b = py::reinterpret_borrow<py::object>(value).attr("to_bytes")(
            itemsize, "little", py::arg("signed") = kind == 'i');
        std::string raw = b.cast<std::string>();
        std::memcpy(copy_.data(), raw.data(), itemsize);
      } catch (const py::error_already_set&) {
        fail(fmt("{} does not fit {}", py::repr(value).cast<std::string>(),
                 std::string(dtype_name(field_.dtype))));
      }
    } else {
      fail("give bfloat16 values as a torch tensor");
    }
    bytes_ = copy_;
  }

  void check_type(const py::buffer_info& info) const {
    const char want = dtype_kind(field_.dtype);
    const char kind = format_kind(info.format);
    const auto size = static_cast<size_t>(info.itemsize);
    const bool ok = want == 'x' ? (size == 2 && (kind == 'i' || kind == 'u'))
                                : kind == want && size == dtype_size(field_.dtype);
    // Bytes-like data of a uint8 field may come as int8 ('b', e.g. a signed char buffer).
    const bool bytes = field_.dtype == DType::kUInt8 && size == 1 && kind == 'i';
    if (!ok && !bytes)
      fail("given " + kind_name(kind, size) + " (format \"" + info.format +
           "\"); convert it first, e.g. numpy's .astype(\"" +
           std::string(dtype_name(field_.dtype)) + "\")");
  }

  static std::string shape_text(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) {
      if (i) s += ", ";
      s += std::to_string(shape[i]);
    }
    return s + "]";
  }

  void check_shape(const py::buffer_info& info) const {
    const auto& want = field_.shape;
    if (want.empty() && (info.ndim == 0 || (info.ndim == 1 && info.shape[0] == 1))) return;
    bool ok = static_cast<size_t>(info.ndim) == want.size();
    for (size_t d = 0; ok && d < want.size(); ++d) ok = want[d] == -1 || want[d] == info.shape[d];
    if (!ok) fail("shape " + shape_text(info.shape) + ", the field's is " + shape_text(want));
  }

  static bool contiguous(const py::buffer_info& info) {
    py::ssize_t stride = info.itemsize;
    for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
      if (info.shape[d] > 1 && info.strides[d] != stride) return false;
      stride *= info.shape[d];
    }
    return true;
  }

  static void copy_strided(const py::buffer_info& info, py::ssize_t dim, const std::byte* in,
                           std::byte*& out) {
    if (dim == info.ndim) {
      std::memcpy(out, in, static_cast<size_t>(info.itemsize));
      out += info.itemsize;
      return;
    }
    for (py::ssize_t i = 0; i < info.shape[dim]; ++i)
      copy_strided(info, dim + 1, in + i * info.strides[dim], out);
  }

  const FieldSpec& field_;
  py::object keep_;  // what bytes_ points into
  std::vector<std::byte> copy_;
  std::span<const std::byte> bytes_;
};

// DatasetWriter with the GIL released while it writes. A sample is a dict by field name or a
// sequence in field order; each value is converted and checked by FieldValue.
class PyWriter {
 public:
  PyWriter(const std::string& path, const py::object& fields, uint64_t shard_bytes,
           uint32_t alignment, const std::vector<std::string>& classes, bool overwrite) {
    WriterOptions o;
    o.fields = field_specs(fields);
    o.shard_bytes = shard_bytes;
    o.alignment = alignment;
    o.classes = classes;
    o.overwrite = overwrite;
    fields_ = o.fields;
    writer_ = DatasetWriter::create(path, o);
  }

  uint64_t add(const py::object& sample) {
    std::vector<FieldValue> values;
    values.reserve(fields_.size());
    if (py::isinstance<py::dict>(sample)) {
      py::dict d = sample.cast<py::dict>();
      for (const auto& f : fields_) {
        if (!d.contains(f.name))
          throw Error(ErrorCode::kInvalidArgument,
                      "DatasetWriter.add: sample has no field \"" + f.name + "\"");
        values.emplace_back(f, d[py::str(f.name)]);
      }
      if (d.size() != fields_.size()) {
        for (auto item : d) {
          std::string key = py::str(item.first);
          bool known = false;
          for (const auto& f : fields_) known = known || f.name == key;
          if (!known)
            throw Error(ErrorCode::kInvalidArgument,
                        "DatasetWriter.add: sample has a field \"" + key + "\" the schema has not");
        }
      }
    } else {
      py::sequence seq = py::reinterpret_borrow<py::sequence>(sample);
      if (seq.size() != fields_.size())
        throw Error(ErrorCode::kInvalidArgument,
                    "DatasetWriter.add: sample has " + std::to_string(seq.size()) +
                        " fields, the schema " + std::to_string(fields_.size()));
      for (size_t i = 0; i < fields_.size(); ++i) values.emplace_back(fields_[i], seq[i]);
    }
    std::vector<std::span<const std::byte>> spans;
    for (const auto& v : values) spans.push_back(v.bytes());
    py::gil_scoped_release nogil;
    return writer().add(spans);
  }

  void finish() {
    py::gil_scoped_release nogil;
    writer().finish();
    bytes_written_ = writer_->bytes_written();
    writer_.reset();
  }

  uint64_t bytes_written() const { return writer_ ? writer_->bytes_written() : bytes_written_; }

  DatasetWriter& writer() {
    if (!writer_) throw Error(ErrorCode::kInvalidArgument, "DatasetWriter: used after finish()");
    return *writer_;
  }

 private:
  std::vector<FieldSpec> fields_;
  std::unique_ptr<DatasetWriter> writer_;
  uint64_t bytes_written_ = 0;  // after finish()
};

}  // namespace

void bind_dataset(py::module_& m) {
  py::class_<PyWriter>(m, "DatasetWriter")
      .def(py::init<const std::string&, const py::object&, uint64_t, uint32_t,
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
      .def_property_readonly("num_samples", [](PyWriter& w) { return w.writer().num_samples(); })
      .def_property_readonly("bytes_written", &PyWriter::bytes_written);

  py::class_<Dataset, std::shared_ptr<Dataset>>(m, "Dataset")
      // What the Loader reads with `dataset: PATH`: packed shards, or a source read in place (a
      // directory of .tar shards or one .tar, a tree of files, a .npy array).
      .def(py::init([](const std::string& path) {
             DatasetOptions source;
             source.path = path;
             return Dataset::open_source(source);
           }),
           py::arg("path"))
      .def("__len__", &Dataset::num_samples)
      .def_property_readonly("path", [](const Dataset& d) { return d.path().string(); })
      .def_property_readonly("total_bytes", &Dataset::total_bytes)
      .def_property_readonly("format",
                             [](const Dataset& d) { return std::string(to_string(d.format())); })
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
