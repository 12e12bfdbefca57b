// sluice._C.EmbeddingTable: the C++ table (include/sluice/embedding.h) for
// python/sluice/embedding.py, which checks ids and values and makes the output tensors. Here
// every buffer is a contiguous run of bytes (int64 ids, rows in the table's dtype); the GIL
// is released while the table reads or writes.

#include <sluice/embedding.h>
#include <sluice/error.h>

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>

#include "bindings.h"

namespace py = pybind11;

namespace sluice::python {
namespace {

// A contiguous buffer's bytes (the Python side makes them so; this only refuses).
std::span<std::byte> bytes(const py::buffer_info& info, const char* what) {
  py::ssize_t expect = info.itemsize;
  for (py::ssize_t d = info.ndim; d-- > 0;) {
    if (info.shape[d] > 1 && info.strides[d] != expect)
      throw Error(ErrorCode::kInvalidArgument, std::string(what) + ": not contiguous");
    expect *= info.shape[d];
  }
  return {static_cast<std::byte*>(info.ptr), static_cast<size_t>(info.size * info.itemsize)};
}
std::span<std::byte> bytes(const py::buffer& b, const char* what, bool writable) {
  return bytes(b.request(writable), what);
}

std::span<const int64_t> ids_of(const py::buffer& b) {
  py::buffer_info info = b.request();
  if (info.itemsize != 8 || (info.format != "q" && info.format != "l"))
    throw Error(ErrorCode::kInvalidArgument, "ids: expected int64, got format " + info.format);
  auto s = bytes(info, "ids");
  return {reinterpret_cast<const int64_t*>(s.data()), s.size() / 8};
}

CachePolicy policy_of(const std::string& name) {
  if (name == "clairvoyant") return CachePolicy::kClairvoyant;
  if (name == "lru") return CachePolicy::kLru;
  throw Error(ErrorCode::kInvalidArgument,
              "EmbeddingTable: policy \"" + name + "\": expected clairvoyant or lru");
}

// The buffers of the holds out (gather_held), by hold: kept alive until release().
py::dict held_of(const py::object& table) {
  if (!py::hasattr(table, "_held")) table.attr("_held") = py::dict();
  return table.attr("_held");
}

}  // namespace

void bind_embedding(py::module_& m) {
  py::class_<EmbeddingTable>(m, "EmbeddingTable", py::dynamic_attr())
      .def(py::init([](const std::string& path, uint64_t cache_bytes, const std::string& policy,
                       bool readonly, uint32_t queue_depth) {
             EmbeddingOptions o;
             o.cache_bytes = cache_bytes;
             o.policy = policy_of(policy);
             o.readonly = readonly;
             o.queue_depth = queue_depth;
             py::gil_scoped_release nogil;
             return EmbeddingTable::open(path, o);
           }),
           py::arg("path"), py::arg("cache_bytes") = 0, py::arg("policy") = "clairvoyant",
           py::arg("readonly") = false, py::arg("queue_depth") = 64)
      .def_static(
          "create",
          [](const std::string& path, uint64_t rows, uint32_t dim, const std::string& dtype,
             const std::string& init, uint64_t seed, uint64_t shard_bytes,
             const std::optional<py::buffer>& data) {
            EmbeddingSpec spec;
            spec.rows = rows;
            spec.dim = dim;
            spec.dtype = embedding_dtype(dtype);
            spec.init = init;
            spec.seed = seed;
            spec.shard_bytes = shard_bytes;
            const std::byte* rows_data = nullptr;
            if (data) {
              auto b = bytes(*data, "array", false);
              if (b.size() != rows * dim * element_bytes(spec.dtype))
                throw Error(ErrorCode::kInvalidArgument, "array: wrong size");
              rows_data = b.data();
            }
            py::gil_scoped_release nogil;
            EmbeddingTable::create(path, spec, rows_data);
          },
          py::arg("path"), py::arg("rows"), py::arg("dim"), py::arg("dtype") = "float32",
          py::arg("init") = "zeros", py::arg("seed") = 0, py::arg("shard_bytes") = 1ull << 30,
          py::arg("data") = std::nullopt)
      .def_property_readonly("rows", &EmbeddingTable::rows)
      .def_property_readonly("dim", &EmbeddingTable::dim)
      .def_property_readonly(
          "dtype", [](const EmbeddingTable& t) { return std::string(to_string(t.dtype())); })
      .def_property_readonly("row_bytes", &EmbeddingTable::row_bytes)
      .def_property_readonly("path", [](const EmbeddingTable& t) { return t.path().string(); })
      .def(
          "gather_into",
          [](EmbeddingTable& t, const py::buffer& ids, const py::buffer& out) {
            auto i = ids_of(ids);
            auto o = bytes(out, "out", true);
            py::gil_scoped_release nogil;
            t.gather(i, o);
          },
          py::arg("ids"), py::arg("out"))
      .def(
          "update",
          [](EmbeddingTable& t, const py::buffer& ids, const py::buffer& values) {
            auto i = ids_of(ids);
            auto v = bytes(values, "values", false);
            py::gil_scoped_release nogil;
            t.update(i, v);
          },
          py::arg("ids"), py::arg("values"))
      .def("flush",
           [](EmbeddingTable& t) {
             py::gil_scoped_release nogil;
             t.flush();
           })
      .def(
          "feed_future",
          [](EmbeddingTable& t, const py::buffer& ids) {
            auto i = ids_of(ids);
            py::gil_scoped_release nogil;
            t.feed_future(i);
          },
          py::arg("ids"))
      .def(
          "gather_held",
          [](py::object self, const py::buffer& ids, const py::buffer& rows) {
            EmbeddingTable& t = self.cast<EmbeddingTable&>();
            auto i = ids_of(ids);
            auto r = bytes(rows, "rows", true);
            uint64_t hold;
            {
              py::gil_scoped_release nogil;
              hold = t.gather_held(i, r);
            }
            // Updates write into `rows` until release(): it lives at least that long.
            held_of(self)[py::int_(hold)] = rows;
            return hold;
          },
          py::arg("ids"), py::arg("rows"))
      .def(
          "release",
          [](py::object self, uint64_t hold) {
            // With the GIL: a release waits only for an update's patches (holds_mu_), and
            // letting the GIL go here hands it to the look-ahead thread mid-delivery.
            self.cast<EmbeddingTable&>().release(hold);
            held_of(self).attr("pop")(hold, py::none());
          },
          py::arg("hold"))
      .def(
          "unique_and_feed",
          [](EmbeddingTable& t, const py::buffer& ids) {
            // A batch's ids made unique (sorted) with each id's place among them, and the unique
            // ids fed to the table's future: the look-ahead's work on a batch, without the GIL.
            auto i = ids_of(ids);
            const auto n = static_cast<py::ssize_t>(i.size());
            py::array_t<int64_t> inverse(std::vector<py::ssize_t>{n}, std::vector<py::ssize_t>{8});
            std::vector<int64_t> unique;
            {
              py::gil_scoped_release nogil;
              // (id, position) pairs sorted in place: no comparator reaching back into `i`.
              std::vector<std::pair<int64_t, uint32_t>> order(i.size());
              for (uint32_t k = 0; k < order.size(); ++k) order[k] = {i[k], k};
              std::sort(order.begin(), order.end());
              int64_t* inv = inverse.mutable_data();
              for (const auto& [id, k] : order) {
                if (unique.empty() || unique.back() != id) unique.push_back(id);
                inv[k] = static_cast<int64_t>(unique.size() - 1);
              }
              t.feed_future(unique);
            }
            py::array_t<int64_t> u(
                std::vector<py::ssize_t>{static_cast<py::ssize_t>(unique.size())},
                std::vector<py::ssize_t>{8});
            std::copy(unique.begin(), unique.end(), u.mutable_data());
            return py::make_tuple(u, inverse);
          },
          py::arg("ids"))
      .def("stats", [](const EmbeddingTable& t) {
        EmbeddingStats s = t.stats();
        py::dict d;
        d["gathers"] = s.gathers;
        d["ids"] = s.ids;
        d["unique_ids"] = s.unique_ids;
        d["rows_from_disk"] = s.rows_from_disk;
        d["read_ios"] = s.read_ios;
        d["bytes_read"] = s.bytes_read;
        d["cache_hits"] = s.cache_hits;
        d["dirty_hits"] = s.dirty_hits;
        d["cached_rows"] = s.cached_rows;
        d["rows_updated"] = s.rows_updated;
        d["flushes"] = s.flushes;
        d["future_batches"] = s.future_batches;
        return d;
      });
}

}  // namespace sluice::python
