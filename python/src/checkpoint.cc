// sluice._C's checkpoint file layer (src/checkpoint/files.h), for
// python/sluice/checkpoint.py's torch.distributed.checkpoint Writer and Reader. Buffers come in
// as contiguous byte buffers (a tensor's `.view(torch.uint8).reshape(-1).numpy()`); the GIL is
// released while the IO runs.

#include <sluice/checkpoint.h>
#include <sluice/error.h>
#include <sluice/options.h>

#include <pybind11/stl.h>

#include "bindings.h"
#include "checkpoint/files.h"
#include "common/partial_dir.h"

namespace py = pybind11;

namespace sluice::python {
namespace {

CheckpointOptions options(bool direct, uint32_t queue_depth, uint64_t chunk_bytes, bool durable,
                          double share) {
  CheckpointOptions o;
  o.direct = direct;
  o.queue_depth = queue_depth;
  o.chunk_bytes = chunk_bytes;
  o.durable = durable;
  o.share = share;
  return o;
}

// A buffer's bytes, which must be one contiguous run.
std::span<std::byte> bytes_of(const py::buffer_info& info, const std::string& name) {
  bool contiguous = true;
  py::ssize_t expect = info.itemsize;
  for (py::ssize_t d = info.ndim; d-- > 0;) {
    if (info.shape[d] > 1 && info.strides[d] != expect) contiguous = false;
    expect *= info.shape[d];
  }
  if (!contiguous)
    throw Error(ErrorCode::kInvalidArgument, "checkpoint part " + name + ": not contiguous");
  return {static_cast<std::byte*>(info.ptr), static_cast<size_t>(info.size * info.itemsize)};
}

// The peer and the token that reaches it: `token`, else `token_file`'s, else $SLUICE_TOKEN.
CheckpointReplica replica(const std::string& address, const std::string& token,
                          const std::string& token_file, uint32_t timeout_ms) {
  DistributedOptions d;
  d.token = token;
  d.token_file = token_file;
  return {address, d.resolved_token(), timeout_ms, ""};
}

py::tuple extent_tuple(const PartExtent& e) {
  return py::make_tuple(e.offset, e.length, e.checksum);
}

}  // namespace

void bind_checkpoint(py::module_& m) {
  m.def(
      "write_checkpoint_file",
      [](const std::string& path, const py::list& parts, bool direct, uint32_t queue_depth,
         uint64_t chunk_bytes, bool durable, double share) {
        std::vector<py::buffer_info> infos;
        std::vector<CheckpointPart> ps;
        infos.reserve(parts.size());
        for (const auto& item : parts) {
          auto t = item.cast<py::tuple>();
          std::string name = t[0].cast<std::string>();
          infos.push_back(t[1].cast<py::buffer>().request());
          ps.push_back({name, bytes_of(infos.back(), name)});
        }
        CheckpointWriteResult r;
        {
          py::gil_scoped_release nogil;
          r = write_checkpoint_file(path, ps,
                                    options(direct, queue_depth, chunk_bytes, durable, share));
        }
        py::list extents;
        for (const auto& e : r.parts) extents.append(extent_tuple(e));
        py::dict d;
        d["parts"] = extents;
        d["bytes"] = r.bytes;
        d["seconds"] = r.seconds;
        d["held_seconds"] = r.held_seconds;
        d["direct"] = r.direct;
        return d;
      },
      py::arg("path"), py::arg("parts"), py::kw_only(), py::arg("direct") = true,
      py::arg("queue_depth") = 8, py::arg("chunk_bytes") = 8 << 20, py::arg("durable") = true,
      py::arg("share") = 0.05,
      "Writes [(name, buffer), ...] one after another into a new file, each checksummed; "
      "returns {'parts': [(offset, length, checksum), ...], 'bytes', 'seconds', "
      "'held_seconds', 'direct'}.");
  m.def(
      "read_checkpoint_file",
      [](const std::string& path, const py::list& parts, bool direct, uint32_t queue_depth,
         uint64_t chunk_bytes) {
        std::vector<py::buffer_info> infos;
        std::vector<CheckpointReadPart> ps;
        infos.reserve(parts.size());
        for (const auto& item : parts) {
          auto t = item.cast<py::tuple>();
          std::string name = t[0].cast<std::string>();
          PartExtent e{t[1].cast<uint64_t>(), t[2].cast<uint64_t>(), t[3].cast<uint32_t>()};
          infos.push_back(t[4].cast<py::buffer>().request(true));
          ps.push_back({name, e, bytes_of(infos.back(), name)});
        }
        py::gil_scoped_release nogil;
        read_checkpoint_file(path, ps, options(direct, queue_depth, chunk_bytes, true, 1.0));
      },
      py::arg("path"), py::arg("parts"), py::kw_only(), py::arg("direct") = true,
      py::arg("queue_depth") = 16, py::arg("chunk_bytes") = 8 << 20,
      "Reads [(name, offset, length, checksum, writable buffer), ...] and checks each part.");
  m.def(
      "publish_checkpoint_dir",
      [](const std::string& staging, const std::string& dir, bool durable) {
        py::gil_scoped_release nogil;
        publish_checkpoint_dir(staging, dir, durable);
      },
      py::arg("staging"), py::arg("dir"), py::arg("durable") = true);
  // Copies on a peer (`sluice serve --checkpoint-dir`): each takes the peer's HOST:PORT and
  // how to find the token.
  m.def(
      "copy_checkpoint_files",
      [](const std::string& address, const std::string& name, const std::string& dir,
         const std::vector<std::string>& files, const std::string& token,
         const std::string& token_file, uint32_t timeout_ms) {
        auto r = replica(address, token, token_file, timeout_ms);
        py::gil_scoped_release nogil;
        copy_checkpoint_files(r, name, dir, files);
      },
      py::arg("address"), py::arg("name"), py::arg("dir"), py::arg("files"), py::kw_only(),
      py::arg("token") = "", py::arg("token_file") = "", py::arg("timeout_ms") = 30000,
      "Copies the files of local directory `dir` to the peer as checkpoint `name` (not yet "
      "visible there).");
  m.def(
      "publish_checkpoint_copy",
      [](const std::string& address, const std::string& name, const std::vector<std::string>& files,
         const std::string& token, const std::string& token_file, uint32_t timeout_ms) {
        auto r = replica(address, token, token_file, timeout_ms);
        py::gil_scoped_release nogil;
        publish_checkpoint_copy(r, name, files);
      },
      py::arg("address"), py::arg("name"), py::arg("files"), py::kw_only(), py::arg("token") = "",
      py::arg("token_file") = "", py::arg("timeout_ms") = 30000,
      "Makes the copied `files` the peer's checkpoint `name` in one step.");
  m.def(
      "restore_checkpoint_dir",
      [](const std::string& address, const std::string& name, const std::string& dir,
         const std::string& token, const std::string& token_file, uint32_t timeout_ms) {
        auto r = replica(address, token, token_file, timeout_ms);
        py::gil_scoped_release nogil;
        return restore_checkpoint_dir(r, name, dir);
      },
      py::arg("address"), py::arg("name"), py::arg("dir"), py::kw_only(), py::arg("token") = "",
      py::arg("token_file") = "", py::arg("timeout_ms") = 30000,
      "Fetches the peer's checkpoint `name` into `dir`, each chunk checked; False when `dir` "
      "already matched it.");
  m.def(
      "checkpoint_copy_name", [](const std::string& dir) { return checkpoint_copy_name(dir); },
      "The name of `dir`'s copy on a peer: its name and a hash of its absolute path.");
  py::class_<detail::PartialDir>(m, "PartialCheckpointDir",
                                 "A save's staging directory, locked while this object lives.")
      .def_property_readonly("path", [](const detail::PartialDir& d) { return d.path().string(); })
      .def("release", &detail::PartialDir::release, "Lets go of the lock (after publishing).");
  m.def("make_partial_checkpoint_dir",
        [](const std::string& dir) { return detail::make_partial_dir(dir); });
  m.def("remove_partial_checkpoints",
        [](const std::string& dir) { return detail::remove_partial_dirs(dir, "checkpoint"); });
}

}  // namespace sluice::python
