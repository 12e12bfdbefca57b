"""Arrow data into a packed sluice dataset: parquet files, a directory of them, a Hugging Face
`datasets` directory from `save_to_disk` (Arrow IPC files), a `pyarrow.Table` or a
`datasets.Dataset`. pyarrow is imported only here, when such a source is packed.

Columns become fields of the same name:

=====================================  =================================
Arrow type                             field
=====================================  =================================
int8 ... uint64, float16/32/64, bool   that dtype, one value per sample
binary, string (and large_)            uint8, variable size (the bytes)
fixed_size_binary(n)                   uint8, shape [n]
fixed_size_list (nested)               the value type, shape [n, m, ...]
list<number> (and large_)              the number's dtype, variable size
struct with a binary ``bytes`` child   uint8, variable size (a ``datasets`` Image or Audio)
=====================================  =================================

Any other type, a null value, or a later file whose schema differs is an error naming the
column (and the file and row).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _C

_ROWS_PER_BATCH = 1024


def _pa():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("sluice.pack of parquet / Arrow data needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _field(pa, name: str, t) -> tuple[dict[str, Any], Any]:
    """(field spec, how a column of type t becomes per-row values)."""
    types = pa.types
    if types.is_boolean(t) or types.is_integer(t) or types.is_floating(t):
        dtype = "bool" if types.is_boolean(t) else str(t.to_pandas_dtype().__name__)
        return {"name": name, "dtype": dtype, "shape": []}, "scalar"
    if types.is_binary(t) or types.is_large_binary(t) or types.is_string(t) or types.is_large_string(t):
        return {"name": name, "dtype": "uint8", "shape": [-1]}, "bytes"
    if types.is_fixed_size_binary(t):
        return {"name": name, "dtype": "uint8", "shape": [t.byte_width]}, "fixed_binary"
    if types.is_fixed_size_list(t):
        shape, inner = [], t
        while types.is_fixed_size_list(inner):
            shape.append(inner.list_size)
            inner = inner.value_type
        if types.is_integer(inner) or types.is_floating(inner) or types.is_boolean(inner):
            spec, _ = _field(pa, name, inner)
            return {**spec, "shape": shape}, "fixed_list"
    if (types.is_list(t) or types.is_large_list(t)) and (
            types.is_integer(t.value_type) or types.is_floating(t.value_type)):
        spec, _ = _field(pa, name, t.value_type)
        return {**spec, "shape": [-1]}, "list"
    if types.is_struct(t):
        i = t.get_field_index("bytes")
        if i >= 0 and (types.is_binary(t.field(i).type) or types.is_large_binary(t.field(i).type)):
            return {"name": name, "dtype": "uint8", "shape": [-1]}, "struct_bytes"
    raise ValueError(f"column {name!r} ({t}): no sluice field for this Arrow type; cast it "
                     "(pyarrow.Table.cast) or leave the column out")


def _no_nulls(col, name: str, where: str, row: int, what: str = "") -> None:
    if col.null_count:
        at = row + col.is_null().to_pylist().index(True)
        raise ValueError(f"{where}: column {name!r}: row {at} is null{what}; sluice fields hold "
                         "a value in every sample")


def _column_rows(pa, kind: str, spec: dict[str, Any], col, where: str, row: int) -> Any:
    """An indexable of the column's rows as buffers sluice's DatasetWriter takes, without
    copying the bytes of binary columns; `row` is the first one's number, for errors."""
    import numpy as np

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    _no_nulls(col, spec["name"], where, row)
    if kind == "struct_bytes":
        col = col.field("bytes")
        _no_nulls(col, spec["name"], where, row, " in its bytes (an image kept by path only?)")
        kind = "bytes"
    if kind == "scalar":
        return col.to_numpy(zero_copy_only=False)
    if kind == "bytes":
        wide = pa.types.is_large_binary(col.type) or pa.types.is_large_string(col.type)
        offsets = np.frombuffer(col.buffers()[1], dtype=np.int64 if wide else np.int32)
        offsets = offsets[col.offset:col.offset + len(col) + 1]
        data = memoryview(col.buffers()[2] or b"")
        return [data[offsets[i]:offsets[i + 1]] for i in range(len(col))]
    if kind == "fixed_binary":
        flat = np.frombuffer(col.buffers()[1], dtype=np.uint8)
        w = spec["shape"][0]
        return flat[col.offset * w:(col.offset + len(col)) * w].reshape(len(col), w)
    if kind == "fixed_list":
        flat = col.flatten()
        while pa.types.is_fixed_size_list(flat.type):
            flat = flat.flatten()
        return flat.to_numpy(zero_copy_only=False).reshape(len(col), *spec["shape"])
    if kind == "list":
        values = col.flatten().to_numpy(zero_copy_only=False)
        offsets = col.offsets.to_numpy()
        offsets = offsets - offsets[0]
        return [values[offsets[i]:offsets[i + 1]] for i in range(len(col))]
    raise AssertionError(kind)


def _arrow_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix in (".parquet", ".arrow"))
        if not files:
            raise FileNotFoundError(f"{path}: no .parquet or .arrow files in this directory")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return [path]


def _file_batches(pa, path: Path) -> Iterator[Any]:
    if path.suffix == ".parquet":
        # Mapped, not read into heap buffers: 1 GB of image rows decoded in 0.55 s instead of
        # 1.5-1.7 s in a fresh process (the command's case), most of it first-touch faults.
        parquet = pa.parquet.ParquetFile(path, memory_map=True)
        yield from parquet.iter_batches(batch_size=_ROWS_PER_BATCH)
        return
    # `datasets` writes Arrow IPC streams; other tools write the IPC file format.
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from reader


def _batches(pa, source: Any) -> Iterator[tuple[str, Any]]:
    """(where, record batch or table) pairs, in row order."""
    if isinstance(source, (str, os.PathLike)):
        for path in _arrow_files(Path(source)):
            for batch in _file_batches(pa, path):
                yield str(path), batch
    elif isinstance(source, (list, tuple)):
        for s in source:
            yield from _batches(pa, s)
    elif isinstance(source, (pa.Table, pa.RecordBatch)):
        for batch in source.to_batches(max_chunksize=_ROWS_PER_BATCH):
            yield "the table", batch
    elif hasattr(source, "with_format") and hasattr(source, "features"):  # a datasets.Dataset
        # Its own iteration honours select / shuffle / filter (an indices mapping).
        for table in source.with_format("arrow").iter(batch_size=_ROWS_PER_BATCH):
            yield "the dataset", table
    else:
        raise TypeError(f"sluice.pack: cannot read a {type(source).__name__} (give a path, a "
                        "pyarrow.Table or a datasets.Dataset)")


def _read_ahead(batches: Iterator[tuple[str, Any]], depth: int = 2) -> Iterator[tuple[str, Any]]:
    """`batches`, decoded by a thread of their own `depth` batches ahead: pyarrow decodes
    without the GIL while the writer copies, checksums and writes the previous batch (on 2
    cores, 1 GB of image rows packed in 2.3 s instead of 2.9; RESULTS.md). Its errors are
    raised here; closing the generator stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in batches:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    thread = threading.Thread(target=run, name="sluice-pack-read", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def pack(source: Any, output: str | os.PathLike, *, shard_bytes: int = 256 << 20,
         alignment: int = 4096, force: bool = False, columns: list[str] | None = None) -> dict:
    """Packs Arrow data into a sluice dataset at `output` (see the module's table for how
    columns become fields; `columns` picks some, in that order). `source`: a parquet or
    Arrow file, a directory of them (read in name order), a `datasets.save_to_disk`
    directory, a list of those, a `pyarrow.Table` or a `datasets.Dataset`. The dataset appears
    at `output` only when complete. Returns {"samples", "bytes", "path"}."""
    pa = _pa()
    writer = None
    schema = None
    plan: list[tuple[dict[str, Any], str]] = []
    row = 0
    try:
        for where, batch in _read_ahead(_batches(pa, source)):
            if columns is not None:
                batch = batch.select(columns)
            if schema is None:
                schema = batch.schema
                plan = [_field(pa, f.name, f.type) for f in schema]
                if not plan:
                    raise ValueError(f"{where}: no columns to pack")
                writer = _C.DatasetWriter(os.fspath(output), [spec for spec, _ in plan],
                                          shard_bytes=shard_bytes, alignment=alignment,
                                          overwrite=force)
            elif not batch.schema.equals(schema):
                raise ValueError(f"{where}: its columns differ from the first file's:\n"
                                 f"{batch.schema}\nagainst\n{schema}")
            cols = [_column_rows(pa, kind, spec, col, where, row)
                    for (spec, kind), col in zip(plan, batch.columns)]
            for i in range(batch.num_rows):
                writer.add([c[i] for c in cols])
            row += batch.num_rows
        if writer is None:
            raise ValueError(f"{source}: no rows to pack")
        writer.finish()
    except BaseException:
        writer = None  # nothing appears at `output`
        raise
    return {"samples": row, "bytes": writer.bytes_written, "path": str(Path(output).resolve())}


def pack_command(sources: list[str], output: str, *, shard_bytes: int, alignment: int,
                 force: bool, as_json: bool) -> int:
    """`sluice pack` of Arrow sources (sluice._C.cli calls it); prints what the C++ command
    prints."""
    out = pack(sources, output, shard_bytes=shard_bytes, alignment=alignment, force=force)
    if as_json:
        print(json.dumps({**out, "classes": 0}), flush=True)
    else:
        print(f"packed {out['samples']} samples ({out['bytes']} bytes) into {output}", flush=True)
    return 0
