"""Embedding tables on NVMe (src/embed/README.md).

    table = sluice.EmbeddingTable.create("/nvme/emb", rows=10**8, dim=128, init="normal:0.01")
    rows = table.gather(ids)                 # [len(ids), 128] float32, duplicates read once
    table.update(ids, new_rows)              # seen by gathers at once
    table.flush()                            # durable: a crash never leaves a row half-written
    table = sluice.EmbeddingTable("/nvme/emb", cache_bytes=8 << 30)   # reopen, with a cache

With the clairvoyant cache (the default policy), `feed_future(ids)` tells the table the ids of
a future gather, in order; it keeps the rows used soonest and evicts the one used farthest
ahead. numpy arrays in, numpy out; torch tensors in, torch out (bfloat16 tables need torch).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import _C

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "dtype") and hasattr(x, "numpy")


def _ids(ids: Any, what: str) -> np.ndarray:
    """ids as a contiguous int64 numpy array, or a TypeError / ValueError naming what is wrong."""
    if _is_torch(ids):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or str(ids.dtype) == "torch.bool":
            raise TypeError(f"sluice.EmbeddingTable.{what}: ids must be integers, got a tensor of {ids.dtype}")
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"sluice.EmbeddingTable.{what}: ids must be integers, got {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"sluice.EmbeddingTable.{what}: ids must be 1-D, got shape {tuple(arr.shape)}")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"sluice.EmbeddingTable.{what}: id {int(arr.max())} is out of range")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _bytes_view(t: Any) -> np.ndarray:
    """A contiguous CPU tensor's memory as a numpy uint8 array (bfloat16 has no numpy dtype)."""
    import torch

    return t.view(torch.uint8).numpy() if t.dim() > 0 else t.reshape(1).view(torch.uint8).numpy()


class EmbeddingTable:
    """A table of `rows` x `dim` elements on disk. Thread-safe: gathers from many threads,
    updates and flushes from any."""

    def __init__(self, path: str | os.PathLike, *, cache_bytes: int = 0,
                 policy: str = "clairvoyant", readonly: bool = False, queue_depth: int = 64) -> None:
        self._t = _C.EmbeddingTable(os.fspath(path), int(cache_bytes), policy, bool(readonly),
                                    int(queue_depth))

    @classmethod
    def create(cls, path: str | os.PathLike, *, rows: int, dim: int, dtype: str = "float32",
               init: str = "zeros", seed: int = 0, shard_bytes: int = 1 << 30,
               **open_kwargs: Any) -> EmbeddingTable:
        """A new table (`path` must not exist): init "zeros", "normal:STD" or "uniform:A",
        each row's values from (seed, row) alone. Returns it opened with `open_kwargs`."""
        _C.EmbeddingTable.create(os.fspath(path), int(rows), int(dim), dtype, init, int(seed),
                                 int(shard_bytes))
        return cls(path, **open_kwargs)

    @classmethod
    def from_array(cls, path: str | os.PathLike, array: Any, **open_kwargs: Any) -> EmbeddingTable:
        """A new table holding a 2-D numpy array or CPU tensor (float32, float16, bfloat16)."""
        if _is_torch(array):
            name = str(array.dtype).removeprefix("torch.")
            if name not in ("float32", "float16", "bfloat16"):
                raise TypeError(f"sluice.EmbeddingTable.from_array: dtype {array.dtype}; expected float32, float16 or bfloat16")
            t = array.detach().cpu().contiguous()
            shape, data = tuple(t.shape), _bytes_view(t)
        else:
            arr = np.asarray(array)
            if arr.dtype not in (np.float32, np.float16):
                raise TypeError(f"sluice.EmbeddingTable.from_array: dtype {arr.dtype}; expected float32 or float16 (bfloat16: a torch tensor)")
            name, shape, data = str(arr.dtype), arr.shape, np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"sluice.EmbeddingTable.from_array: expected a non-empty 2-D array, got shape {shape}")
        _C.EmbeddingTable.create(os.fspath(path), shape[0], shape[1], name, "zeros", 0, 1 << 30, data)
        return cls(path, **open_kwargs)

    @property
    def rows(self) -> int:
        return self._t.rows

    @property
    def dim(self) -> int:
        return self._t.dim

    @property
    def dtype(self) -> str:
        """"float32", "float16" or "bfloat16"."""
        return self._t.dtype

    @property
    def path(self) -> str:
        return self._t.path

    def gather(self, ids: Any, device: str = "cpu") -> Any:
        """Rows `ids` as [len(ids), dim] in the table's dtype. device "cpu" (numpy for numpy or
        list ids, torch for tensor ids), "pinned" or "cuda:N" (torch)."""
        as_torch = _is_torch(ids) or device != "cpu" or self.dtype == "bfloat16"
        ids = _ids(ids, "gather")
        if device not in ("cpu", "pinned") and not device.startswith("cuda"):
            raise ValueError(f"sluice.EmbeddingTable.gather: device {device!r}; expected cpu, pinned or cuda:N")
        out, view = self._empty(len(ids), as_torch, pinned=device != "cpu")
        self._t.gather_into(ids, view)
        return out.to(device, non_blocking=True) if device.startswith("cuda") else out

    def _empty(self, n: int, as_torch: bool, pinned: bool) -> tuple[Any, np.ndarray]:
        """n rows' host memory (numpy, or torch, page-locked when `pinned`) and its bytes."""
        if not as_torch:
            out = np.empty((n, self.dim), dtype=_NUMPY_DTYPES[self.dtype])
            return out, out.reshape(-1).view(np.uint8)
        import torch

        out = torch.empty((n, self.dim), dtype=_torch_dtype(self.dtype), pin_memory=pinned)
        return out, _bytes_view(out)

    def update(self, ids: Any, values: Any) -> None:
        """Overwrites rows `ids` with `values` ([len(ids), dim], the table's dtype); a repeated
        id takes its last row. Gathers see it at once; flush() makes it durable."""
        ids = _ids(ids, "update")
        if _is_torch(values):
            got = str(values.dtype).removeprefix("torch.")
            shape = tuple(values.shape)
        else:
            values = np.asarray(values)
            got, shape = str(values.dtype), values.shape
        if got != self.dtype:
            raise TypeError(f"sluice.EmbeddingTable.update: values are {got}, the table holds {self.dtype}")
        if shape != (len(ids), self.dim):
            raise ValueError(f"sluice.EmbeddingTable.update: values have shape {shape}, expected ({len(ids)}, {self.dim})")
        data = (_bytes_view(values.detach().cpu().contiguous()) if _is_torch(values)
                else np.ascontiguousarray(values).reshape(-1).view(np.uint8))
        self._t.update(ids, data)

    def flush(self) -> None:
        """Every update before it is durable: after a crash each row holds its last flushed
        value or a later update, never parts of two."""
        self._t.flush()

    def feed_future(self, ids: Any) -> None:
        """The ids of one future gather, after those fed before (the clairvoyant cache)."""
        self._t.feed_future(_ids(ids, "feed_future"))

    def stats(self) -> dict[str, int]:
        """gathers, ids, unique_ids, rows_from_disk, read_ios, bytes_read, cache_hits,
        dirty_hits, cached_rows, rows_updated, flushes, future_batches."""
        return self._t.stats()

    def close(self) -> None:
        """Lets go of the files (updates not flushed stay in the journal, replayed on open)."""
        self._t = None

    def __enter__(self) -> EmbeddingTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"sluice.EmbeddingTable({self.path!r}, rows={self.rows}, dim={self.dim}, dtype={self.dtype})"
