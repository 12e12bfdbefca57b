// sluice._C.Loader: the C++ Loader behind the Python iterator. Waits for batches with the GIL
// released, in short slices so that Ctrl-C is seen promptly; hands each batch out as DLPack
// capsules that keep it alive. Loader threads never touch a Python object.

#include <sluice/error.h>
#include <sluice/loader.h>

#include <pybind11/stl.h>

#include <chrono>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "bindings.h"
#include "tensors.h"

namespace py = pybind11;

namespace sluice::python {
namespace {

// A keyword argument's value as the typed config value LoaderOptions::set takes: bool, int,
// float, str, os.PathLike, None, list/tuple, mapping; a 0-d numpy array or tensor as its item.
ConfigValue config_value(const std::string& key, const py::handle& v) {
  if (v.is_none()) return {};
  if (PyBool_Check(v.ptr())) return {v.cast<bool>()};
  if (PyLong_Check(v.ptr())) {
    int overflow = 0;
    long long i = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
    if (overflow == 0) return {int64_t{i}};
    if (overflow > 0) {
      unsigned long long u = PyLong_AsUnsignedLongLong(v.ptr());
      if (!PyErr_Occurred()) return {uint64_t{u}};
      PyErr_Clear();
    }
    return {py::str(v).cast<std::string>()};  // out of range: the setter names it
  }
  if (PyFloat_Check(v.ptr())) return {v.cast<double>()};
  if (PyUnicode_Check(v.ptr())) return {v.cast<std::string>()};
  if (py::hasattr(v, "__fspath__"))
    return {py::module_::import("os").attr("fspath")(v).cast<std::string>()};
  if (py::isinstance<py::list>(v) || py::isinstance<py::tuple>(v)) {
    ConfigValue::List list;
    for (const py::handle item : v) list.push_back(config_value(key, item));
    return {std::move(list)};
  }
  if (py::isinstance(v, py::module_::import("collections.abc").attr("Mapping"))) {
    ConfigValue::Map map;
    for (const py::handle k : v) {
      if (!PyUnicode_Check(k.ptr()))
        throw py::type_error("sluice.Loader: " + key + ": mapping keys must be strings, got " +
                             py::repr(k).cast<std::string>());
      map.push_back({k.cast<std::string>(), config_value(key, v[k])});
    }
    return {std::move(map)};
  }
  if (py::hasattr(v, "item") && py::hasattr(v, "ndim") && v.attr("ndim").cast<int>() == 0)
    return config_value(key, v.attr("item")());
  throw py::type_error("sluice.Loader: " + key + ": " + std::string(Py_TYPE(v.ptr())->tp_name) +
                       " is not a config value");
}

// One consumer at a time: the C++ Loader is single-consumer, and Python threads may share it.
class PyLoader {
 public:
  PyLoader(const std::optional<std::string>& config,
           const std::vector<std::pair<std::string, py::object>>& settings) {
    LoaderOptions options = config ? LoaderOptions::from_yaml(*config) : LoaderOptions{};
    for (const auto& [key, value] : settings) options.set(key, config_value(key, value));
    {
      py::gil_scoped_release nogil;
      loader_ = Loader::open(options);
    }
    check_keys();
  }

  // The next batch as [(key, capsule)], or None at the end of the epoch.
  // `stream`: the consumer's cudaStream_t (device: cuda:N), which is made to wait for the
  // batch's copy and guards the device buffer's reuse (Batch::use_on_stream).
  py::object next(uintptr_t stream) {
    std::unique_lock<std::mutex> lock = consumer_lock();
    Loader& loader = get();
    // Fast path: the batch is ready (the usual case when sluice keeps up), so neither wait
    // blocks and the GIL need not be released twice.
    bool ready = loader.wait(std::chrono::milliseconds(0));
    while (!ready) {
      {
        py::gil_scoped_release nogil;
        ready = loader.wait(std::chrono::milliseconds(100));
      }
      if (!ready && PyErr_CheckSignals() != 0) throw py::error_already_set();
    }
    std::shared_ptr<const Batch> batch = loader.next();  // ready: returns without blocking
    if (!batch) return py::none();
    if (get().options().device.kind == DeviceKind::kCuda)
      batch->use_on_stream(reinterpret_cast<void*>(stream));
    return to_tensors(std::move(batch));
  }

  void set_epoch(uint64_t epoch) {
    auto lock = consumer_lock();
    py::gil_scoped_release nogil;
    get().set_epoch(epoch);
  }

  void load_state(uint64_t epoch, uint64_t position) {
    auto lock = consumer_lock();
    py::gil_scoped_release nogil;
    get().load_state({epoch, position});
  }

  std::pair<uint64_t, uint64_t> state() {
    auto lock = consumer_lock();
    SamplerState s = get().state();
    return {s.epoch, s.position};
  }

  // Joins the loader threads now instead of when the object is collected.
  void close() {
    auto lock = consumer_lock();
    py::gil_scoped_release nogil;
    loader_.reset();
  }

  Loader& get() const {
    if (!loader_) throw Error(ErrorCode::kInvalidArgument, "sluice.Loader: used after close()");
    return *loader_;
  }

  py::dict stats() const {
    LoaderStats s = get().stats();
    py::dict d;
    d["batches"] = s.batches;
    d["samples"] = s.samples;
    d["bytes"] = s.bytes;
    d["wait_seconds"] = s.wait_seconds;
    d["engine"] = s.engine;
    d["direct_io"] = s.direct_io;
    d["pinned"] = s.pinned;
    d["batches_held"] = s.batches_held;
    d["pinned_bytes"] = s.pinned_bytes;
    d["device_bytes"] = s.device_bytes;
    d["checkpoint_bytes"] = s.checkpoint_bytes;
    d["checkpoint_held_seconds"] = s.checkpoint_held_seconds;
    d["transform_skipped"] = s.transform_skipped;
    d["cpu_seconds"] = s.cpu_seconds;
    d["io_inflight_mean"] = s.io_inflight_mean;
    d["io_idle_fraction"] = s.io_idle_fraction;
    d["io_inflight_hist"] = s.io_inflight_hist;
    d["io_completions"] = s.io_completions;
    py::dict stages;
    LoaderStats::Stages::each(s.stage_seconds,
                              [&](const char* name, double seconds) { stages[name] = seconds; });
    d["stage_seconds"] = stages;
    if (!get().options().cache.dir.empty() ||
        get().options().dataset.path.string().starts_with("s3://")) {
      d["source_bytes"] = s.source_bytes;
      d["source_requests"] = s.source_requests;
      d["cache_hits"] = s.cache_hits;
      d["cache_misses"] = s.cache_misses;
    }
    return d;
  }

  py::list fields() const {
    py::list out;
    for (const FieldSpec& f : get().dataset().fields())
      out.append(py::dict(py::arg("name") = f.name, py::arg("dtype") = dtype_name(f.dtype),
                          py::arg("shape") = f.shape));
    return out;
  }

 private:
  // Taken with the GIL released, so that a thread waiting for the lock does not hold the GIL
  // that the thread inside next() needs to check for signals.
  std::unique_lock<std::mutex> consumer_lock() {
    std::unique_lock<std::mutex> lock(mu_, std::defer_lock);
    if (!lock.try_lock()) {
      py::gil_scoped_release nogil;
      lock.lock();
    }
    return lock;
  }

  static std::string offsets_key(const std::string& name) { return name + "_offsets"; }
  static int gpu(const FieldView& f) { return f.device == DeviceKind::kCuda ? f.device_index : -1; }

  void check_keys() const {
    std::set<std::string> keys = {"index"};
    if (has_padding()) keys.insert("padding");
    if (has_keys()) keys.insert("__key__");
    for (const FieldSpec& f : get().dataset().fields()) {
      bool ok = keys.insert(f.name).second;
      if (ok && !f.fixed_size()) ok = keys.insert(offsets_key(f.name)).second;
      if (!ok)
        throw Error(ErrorCode::kInvalidArgument,
                    get().dataset().path().string() + ": field \"" + f.name +
                        "\" clashes with a key of sluice's batch dict (index, padding, NAME, "
                        "NAME_offsets)");
    }
  }

  template <typename T>
  static std::vector<std::byte> bytes_of(std::span<const T> values) {
    auto b = std::as_bytes(values);
    return {b.begin(), b.end()};
  }

  // "__key__" in batches: each sample's key where the dataset has them (tar shards, files).
  bool has_keys() const {
    const DatasetFormat f = get().dataset().format();
    return f == DatasetFormat::kTar || f == DatasetFormat::kFiles;
  }

  // Padding in batches: drop_last false, or samples whose transform failed (transform_errors).
  bool has_padding() const {
    const LoaderOptions& o = get().options();
    return !o.drop_last || (o.transform_errors == TransformErrors::kSkip && !o.transforms.empty());
  }

  // Field values are views of the batch's buffer; the small metadata (indices, padding,
  // offsets) is copied so that a consumer keeping only those does not pin the buffer.
  py::list to_tensors(std::shared_ptr<const Batch> batch) const {
    py::list out;
    const int64_t n = static_cast<int64_t>(batch->size());
    // Indices are uint64 < 2^62: the same bytes read as int64, which every torch supports.
    out.append(py::make_tuple("index", to_dlpack(bytes_of(batch->indices()), DType::kInt64, {n})));
    if (has_keys()) {
      py::list keys;
      for (uint64_t i : batch->indices()) keys.append(get().dataset().sample_key(i));
      out.append(py::make_tuple("__key__", keys));
    }
    if (has_padding())
      out.append(
          py::make_tuple("padding", to_dlpack(bytes_of(batch->padding()), DType::kBool, {n})));
    for (size_t i = 0; i < batch->num_fields(); ++i) {
      FieldView f = batch->field(i);
      std::string name(f.name);
      if (f.fixed_size()) {
        out.append(py::make_tuple(name, to_dlpack(batch, f.data.data(), f.dtype, f.shape, gpu(f))));
        continue;
      }
      const uint64_t elem = dtype_size(f.dtype);
      const int64_t count = static_cast<int64_t>(f.data.size() / elem);
      // Offsets in elements of the values tensor: values[off[i]:off[i+1]] is sample i.
      std::vector<int64_t> offsets(f.offsets.size());
      for (size_t k = 0; k < offsets.size(); ++k)
        offsets[k] = static_cast<int64_t>(f.offsets[k] / elem);
      out.append(py::make_tuple(name, to_dlpack(batch, f.data.data(), f.dtype, {count}, gpu(f))));
      out.append(py::make_tuple(
          offsets_key(name), to_dlpack(bytes_of(std::span<const int64_t>(offsets)), DType::kInt64,
                                       {static_cast<int64_t>(offsets.size())})));
    }
    return out;
  }

  std::unique_ptr<Loader> loader_;
  std::mutex mu_;
};

}  // namespace

void bind_loader(py::module_& m) {
  py::class_<PyLoader>(m, "Loader")
      .def(py::init<const std::optional<std::string>&,
                    const std::vector<std::pair<std::string, py::object>>&>(),
           py::arg("config"), py::arg("settings"))
      .def("next", &PyLoader::next, py::arg("stream") = 0)
      .def_property_readonly("cuda_device",
                             [](const PyLoader& l) {
                               const DeviceOptions& d = l.get().options().device;
                               return d.kind == DeviceKind::kCuda ? d.index : -1;
                             })
      .def("set_epoch", &PyLoader::set_epoch, py::arg("epoch"))
      .def("state", &PyLoader::state)
      .def("load_state", &PyLoader::load_state, py::arg("epoch"), py::arg("position"))
      .def("close", &PyLoader::close)
      .def("stats", &PyLoader::stats)
      .def("fields", &PyLoader::fields)
      .def_property_readonly("epoch", [](const PyLoader& l) { return l.get().epoch(); })
      .def_property_readonly("batches_per_epoch",
                             [](const PyLoader& l) { return l.get().batches_per_epoch(); })
      .def_property_readonly("batches_left",
                             [](const PyLoader& l) { return l.get().batches_left(); })
      .def_property_readonly("num_samples",
                             [](const PyLoader& l) { return l.get().dataset().num_samples(); })
      .def_property_readonly("rank",
                             [](const PyLoader& l) { return l.get().options().resolved_rank(); })
      .def_property_readonly(
          "world_size", [](const PyLoader& l) { return l.get().options().resolved_world_size(); })
      .def_property_readonly("classes",
                             [](const PyLoader& l) { return l.get().dataset().classes(); })
      .def_property_readonly("dataset_path",
                             [](const PyLoader& l) { return l.get().dataset().path().string(); })
      .def_property_readonly("seed", [](const PyLoader& l) { return l.get().options().seed; })
      .def_property_readonly("prefetch",
                             [](const PyLoader& l) { return l.get().options().prefetch; })
      .def_property_readonly("config_yaml",
                             [](const PyLoader& l) { return l.get().options().to_yaml(); });
}

}  // namespace sluice::python
