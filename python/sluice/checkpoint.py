"""torch.distributed.checkpoint storage on sluice's IO engine.

    import sluice.checkpoint

    sluice.checkpoint.save(state, "/nvme/ckpt/step-1000")  # dcp.save with a Writer
    sluice.checkpoint.load(state, "/nvme/ckpt/step-1000")  # dcp.load with a Reader

    # or DCP itself, with sluice's storage:
    import torch.distributed.checkpoint as dcp
    from sluice.checkpoint import Reader, Writer

    dcp.save(state, storage_writer=Writer("/nvme/ckpt/step-1000"))
    dcp.async_save(state, storage_writer=Writer("/nvme/ckpt/step-2000"))
    dcp.load(state, storage_reader=Reader("/nvme/ckpt/step-2000"))

DCP wraps every rank's failure in its ``CheckpointException``, which derives from
``BaseException``: ``except Exception`` misses it. ``save`` and ``load`` raise what failed
instead (``sluice.CorruptionError`` for a damaged file, ``OSError`` for a full disk or a
missing checkpoint), the ``CheckpointException`` chained as its cause.

Every rank writes its tensors into one file of its own (``rank-00003.data``) with large aligned
O_DIRECT writes through io_uring from reused staging buffers, a checksum per tensor. The files
go into a staging directory beside the checkpoint (``.NAME.partial-XXXXXX``); each rank fsyncs
its file, and the coordinator writes ``.metadata``, fsyncs the directory and renames it into
place (exchanging it with an older checkpoint of that name). A crash at any point leaves the
previous checkpoint intact; the next save removes the staging it left. Loading checks every
tensor's checksum and names the file and tensor when one fails. DCP reshards on load, so a
checkpoint saved by N ranks loads on M.

While a :class:`sluice.Loader` reads in the same process, checkpoint writes take at most
``share`` of the device's time (the loader's reads first); ``Loader.stats()`` reports ``checkpoint_bytes`` and
``checkpoint_held_seconds``, and :attr:`Writer.last_result` what the save took.

With ``replica="HOST:PORT"`` (a ``sluice serve --checkpoint-dir DIR`` on another node, every
rank naming the same one), each rank also copies its file there and the coordinator makes the
copy visible once every file arrived, named ``NAME-HASH`` (the directory's name and a hash of
its absolute path: two jobs' ``step-100`` never share a copy) or ``replica_name``. A failed copy
is a warning and ``last_result["replica_error"]``, never a failed save. A :class:`Reader` with
a replica restores the directory from it when the local copy is gone (a replaced node that
mounts the same path). The peer takes copies only from holders of the cluster's token
(``token``, ``token_file`` or ``$SLUICE_TOKEN``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import (
    LoadPlan,
    LoadPlanner,
    Metadata,
    SavePlan,
    SavePlanner,
    StorageReader,
    StorageWriter,
)
from torch.distributed.checkpoint.metadata import MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from . import _C

__all__ = ["Reader", "StorageInfo", "Writer", "load", "save"]

_METADATA = ".metadata"


@dataclasses.dataclass(frozen=True)
class StorageInfo:
    """Where one item of the state dict lies: bytes [offset, offset + length) of ``file``
    (relative to the checkpoint), their checksum, and for a tensor its dtype and shape."""

    file: str
    offset: int
    length: int
    checksum: int
    dtype: str | None = None  # None: pickled bytes (BYTE_IO)
    shape: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _Staging:
    directory: str  # the staging directory every rank writes into
    file: str  # this rank's file in it


def _byte_view(t: torch.Tensor):
    """A tensor's bytes as a buffer (numpy), without a copy when it is contiguous on the CPU."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy(), t


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _Replica:
    """Where checkpoint copies go (a ``sluice serve --checkpoint-dir``), and the calls to it."""

    def __init__(self, address: str | None, token: str, token_file: str | os.PathLike,
                 timeout_ms: int, name: str | None) -> None:
        self.address = address or ""
        self._name = name
        self._auth = {"token": token, "token_file": str(token_file), "timeout_ms": timeout_ms}

    def __bool__(self) -> bool:
        return bool(self.address)

    def call(self, path: Path, fn, *args) -> str:
        """fn(address, the copy's name, *args); "" when it worked, else the error (warned)."""
        try:
            fn(self.address, self.name(path), *args, **self._auth)
            return ""
        except (ValueError, OSError, RuntimeError) as e:  # what sluice errors become
            warnings.warn(f"sluice: checkpoint {path} saved, but its copy on {self.address} is "
                          f"missing: {e}", RuntimeWarning, stacklevel=3)
            return str(e)

    def name(self, path: Path) -> str:
        return self._name or _C.checkpoint_copy_name(str(path))

    def copy(self, path: Path, directory: str, files: list[str]) -> str:
        return self.call(path, _C.copy_checkpoint_files, directory, files)

    def restore(self, path: Path) -> bool:
        return _C.restore_checkpoint_dir(self.address, self.name(path), str(path), **self._auth)


class Writer(StorageWriter):
    """A DCP StorageWriter writing to the checkpoint directory ``path`` (or the checkpoint_id
    given to ``dcp.save``). ``direct``: O_DIRECT where the file system takes it;
    ``queue_depth`` and ``chunk_bytes``: IOs in flight and their size; ``durable``: fsync files
    and directories; ``share``: the share of the device's time writes take while a Loader in
    this process has reads waiting (1: no priority for reads). ``replica``: HOST:PORT of a
    peer keeping a copy (``sluice serve --checkpoint-dir``), reached with ``token`` /
    ``token_file`` / ``$SLUICE_TOKEN`` within ``replica_timeout_ms`` per step; the copy's
    name there is ``replica_name`` or the directory's name and a hash of its absolute path."""

    def __init__(self, path: str | os.PathLike | None = None, *, direct: bool = True,
                 queue_depth: int = 8, chunk_bytes: int = 8 << 20, durable: bool = True,
                 share: float = 0.05, replica: str | None = None, token: str = "",
                 token_file: str | os.PathLike = "", replica_timeout_ms: int = 30000,
                 replica_name: str | None = None) -> None:
        super().__init__()
        self.path = Path(path) if path is not None else None
        self._io = {"direct": direct, "queue_depth": queue_depth, "chunk_bytes": chunk_bytes,
                    "durable": durable, "share": share}
        self._replica = _Replica(replica, token, token_file, replica_timeout_ms, replica_name)
        self.is_coordinator = False
        self.rank = 0
        self.last_result: dict | None = None  # this rank's last write: bytes, seconds, held, direct
        self._staging = ""  # the coordinator's: where this save is written
        self._staging_dir: _C.PartialCheckpointDir | None = None

    # -- the StorageWriter protocol -------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)
        if self.path is None:
            raise ValueError("sluice.checkpoint.Writer: no path (give one, or a checkpoint_id)")

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank") or 0
        if kwargs.get("use_collectives", True) is False:
            raise ValueError("sluice.checkpoint.Writer needs use_collectives=True (the "
                             "coordinator publishes the whole checkpoint at once)")

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path), save_id="")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # The coordinator, before any rank writes: clear what killed saves left, make the
        # staging directory, and tell each rank its file.
        _C.remove_partial_checkpoints(str(self.path))  # says what it removed on stderr
        # Held (its flock) until published, so that other saves in this directory leave it be.
        self._staging_dir = _C.make_partial_checkpoint_dir(str(self.path))
        self._staging = staging = self._staging_dir.path
        return [dataclasses.replace(p, storage_data=_Staging(staging, f"rank-{i:05d}.data"))
                for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        staging: _Staging = plan.storage_data
        parts, keep, infos = [], [], []
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                buf = data.getbuffer() if isinstance(data, io.BytesIO) else memoryview(data)
                parts.append((item.index.fqn, buf))
                keep.append(data)
                infos.append((None, None))
            else:
                view, tensor = _byte_view(data)
                parts.append((item.index.fqn, view))
                keep.append(tensor)
                infos.append((_dtype_name(tensor.dtype), tuple(data.shape)))
        result = _C.write_checkpoint_file(os.path.join(staging.directory, staging.file), parts,
                                          **self._io)
        self.last_result = {k: result[k] for k in ("bytes", "seconds", "held_seconds", "direct")}
        if self._replica:
            self.last_result["replica_error"] = self._replica.copy(
                self.path, staging.directory, [staging.file])
        out = []
        for item, (offset, length, checksum), (dtype, shape) in zip(plan.items, result["parts"],
                                                                    infos):
            out.append(WriteResult(index=item.index, size_in_bytes=length,
                                   storage_data=StorageInfo(staging.file, offset, length,
                                                            checksum, dtype, shape)))
        fut: Future = Future()
        fut.set_result(out)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage: dict[MetadataIndex, StorageInfo] = {}
        for rank_results in results:
            for r in rank_results:
                storage[r.index] = r.storage_data
        metadata.storage_data = storage
        # Every rank's file is durable (each fsynced its own before its results were
        # gathered); the metadata last, then the directory, then one rename makes it visible.
        staging = self._staging
        tmp = os.path.join(staging, _METADATA)
        with open(tmp, "wb") as f:
            pickle.dump(metadata, f)
            f.flush()
            if self._io["durable"]:
                os.fsync(f.fileno())
        if self._io["durable"]:
            fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _C.publish_checkpoint_dir(staging, str(self.path), durable=self._io["durable"])
        self._staging_dir.release()
        self._staging_dir = None
        if self._replica:
            # Every rank copied its file before its results were gathered; a rank whose copy
            # failed makes the publish fail (its file is missing there), saying which.
            files = sorted({info.file for info in storage.values()})
            error = self._replica.copy(self.path, str(self.path), [_METADATA])
            if not error:
                error = self._replica.call(self.path, _C.publish_checkpoint_copy,
                                           files + [_METADATA])
            if self.last_result is not None and error:
                self.last_result["replica_error"] = error

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return not str(checkpoint_id).startswith(("s3://", "gs://", "hf://"))


class Reader(StorageReader):
    """A DCP StorageReader for checkpoints that :class:`Writer` wrote. Every tensor's checksum
    is checked; a mismatch or a truncated file raises ``sluice.CorruptionError`` naming the
    file and the tensor."""

    def __init__(self, path: str | os.PathLike | None = None, *, direct: bool = True,
                 queue_depth: int = 16, chunk_bytes: int = 8 << 20, replica: str | None = None,
                 token: str = "", token_file: str | os.PathLike = "",
                 replica_timeout_ms: int = 30000, replica_name: str | None = None) -> None:
        super().__init__()
        self.path = Path(path) if path is not None else None
        self._replica = _Replica(replica, token, token_file, replica_timeout_ms, replica_name)
        # Reads want more bytes in flight than writes: 16 x 8 MiB read a 2 GiB file at 1.04-1.05
        # GB/s here, 8 x 8 MiB at 0.68-0.90, fio (iodepth 8, 1 MiB) at 0.99-1.24 (RESULTS.md).
        self._io = {"direct": direct, "queue_depth": queue_depth, "chunk_bytes": chunk_bytes}
        self.storage_data: dict[MetadataIndex, StorageInfo] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)
        self.storage_data = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.path is None:
            raise ValueError("sluice.checkpoint.Reader: no path (give one, or a checkpoint_id)")
        if self._replica and not (self.path / _METADATA).exists():
            # A replaced node: the ranks on it take turns; the first fetches the copy.
            if self._replica.restore(self.path):
                print(f"sluice: checkpoint: {self.path} restored from its copy on "
                      f"{self._replica.address}", file=sys.stderr)
        try:
            with open(self.path / _METADATA, "rb") as f:
                metadata = pickle.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no checkpoint here (no {_METADATA}; a save "
                                    f"that did not finish leaves none)") from None
        if not isinstance(metadata, Metadata):
            raise _C.CorruptionError(f"{self.path / _METADATA}: not DCP metadata")
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        from torch.distributed._shard._utils import narrow_tensor_by_index

        # A request for a whole stored tensor whose target is a contiguous CPU tensor of its
        # dtype is read straight into the target; any other (resharding, another device or
        # dtype) into a buffer, narrowed and copied.
        direct: list[tuple[Any, torch.Tensor]] = []  # (req, target)
        buffered: dict[MetadataIndex, torch.Tensor] = {}
        per_file: dict[str, list[tuple]] = {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            dest = None
            if req.type != LoadItemType.BYTE_IO and info.shape is not None:
                target = planner.resolve_tensor(req).detach()
                whole = (all(o == 0 for o in req.storage_offsets)
                         and tuple(req.lengths) == tuple(info.shape))
                if (whole and target.device.type == "cpu" and target.is_contiguous()
                        and _dtype_name(target.dtype) == info.dtype
                        and tuple(target.shape) == tuple(info.shape)):
                    dest = target.reshape(-1).view(torch.uint8)
                    direct.append((req, target))
            if dest is None:
                if req.storage_index in buffered:
                    continue
                dest = buffered[req.storage_index] = torch.empty(info.length, dtype=torch.uint8)
            per_file.setdefault(info.file, []).append(
                (req.storage_index.fqn, info.offset, info.length, info.checksum, dest.numpy()))

        def read_file(file: str, parts: list[tuple]) -> None:
            _C.read_checkpoint_file(str(self.path / file), parts, **self._io)

        with ThreadPoolExecutor(max_workers=min(4, max(1, len(per_file)))) as pool:
            for f in [pool.submit(read_file, file, parts) for file, parts in per_file.items()]:
                f.result()

        for req, target in direct:
            planner.commit_tensor(req, target)
        done = {id(req) for req, _ in direct}
        for req in plan.items:
            if id(req) in done:
                continue
            info = self.storage_data[req.storage_index]
            raw = buffered[req.storage_index]
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, io.BytesIO(raw.numpy().tobytes()))
                continue
            tensor = raw.view(getattr(torch, info.dtype)).reshape(info.shape)
            tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
            target = planner.resolve_tensor(req).detach()
            if target.size() != tensor.size():
                raise _C.CorruptionError(
                    f"{self.path / info.file}: {req.storage_index.fqn}: stored shape "
                    f"{tuple(tensor.size())}, the state dict wants {tuple(target.size())}")
            target.copy_(tensor)
            planner.commit_tensor(req, target)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return (Path(checkpoint_id) / _METADATA).exists()


def _unwrapped(call):
    """Runs a DCP call and raises the first rank's own error in place of DCP's
    CheckpointException (a BaseException, which ``except Exception`` does not catch)."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        return call()
    except CheckpointException as e:
        failures = getattr(e, "failures", None) or {}
        for rank in sorted(failures):
            failure = failures[rank]
            error = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(error, Exception):
                raise error from e
        raise


def save(state_dict: dict, path: str | os.PathLike, **writer_options: Any) -> None:
    """``dcp.save(state_dict, storage_writer=Writer(path, **writer_options))``, raising a rank's
    own error (``OSError``: a full disk, ...) rather than DCP's ``CheckpointException``."""
    import torch.distributed.checkpoint as dcp
    _unwrapped(lambda: dcp.save(state_dict, storage_writer=Writer(path, **writer_options)))


def load(state_dict: dict, path: str | os.PathLike, **reader_options: Any) -> None:
    """``dcp.load(state_dict, storage_reader=Reader(path, **reader_options))`` (in place, as
    DCP loads), raising ``sluice.CorruptionError`` for a damaged file and ``FileNotFoundError``
    for a missing checkpoint rather than DCP's ``CheckpointException``."""
    import torch.distributed.checkpoint as dcp
    reader = Reader(path, **reader_options)
    reader.read_metadata()  # a missing checkpoint: ours, not DCP's rewording (AssertionError)
    _unwrapped(lambda: dcp.load(state_dict, storage_reader=reader))
