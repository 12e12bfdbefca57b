"""Arrow data into sluice: parquet written by pyarrow, a directory of parquet files, a Hugging
Face `datasets` directory from save_to_disk, a pyarrow.Table and a datasets.Dataset, through
the `sluice pack` command and sluice.pack(); every field of every row compared with what
pyarrow reads back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import sluice


def sluice_command() -> list[str]:
    """The `sluice` command pip installed beside this Python (the wheel's console script);
    `python -m sluice._cli` where the package is only on PYTHONPATH (a CMake build)."""
    installed = Path(sys.executable).parent / "sluice"
    return [str(installed)] if installed.exists() else [sys.executable, "-m", "sluice._cli"]


def table(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "img": pa.array([rng.bytes(int(rng.integers(0, 300))) for _ in range(n)], pa.binary()),
        "label": pa.array(rng.integers(0, 1000, n, dtype=np.int64)),
        "score": pa.array(rng.random(n).astype(np.float32)),
        "flag": pa.array(rng.random(n) < 0.5),
        "emb": pa.FixedSizeListArray.from_arrays(
            pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * 6).astype(np.float16)), 3), 2),
        "text": pa.array([f"row {i} {'x' * (i % 5)}" for i in range(n)]),
        "toks": pa.array([rng.integers(0, 50000, i % 9).tolist() for i in range(n)],
                         pa.list_(pa.uint16())),
        "digest": pa.array([rng.bytes(16) for _ in range(n)], pa.binary(16)),
    })


def expected(t: pa.Table, row: int) -> dict[str, bytes]:
    """Row `row` of `t` as the bytes sluice should hold for each field."""
    out = {}
    for name in t.column_names:
        v = t.column(name)[row]
        if pa.types.is_struct(v.type):
            v = v["bytes"]
        if pa.types.is_binary(v.type) or pa.types.is_fixed_size_binary(v.type):
            out[name] = v.as_py()
        elif pa.types.is_string(v.type):
            out[name] = v.as_py().encode()
        elif pa.types.is_list(v.type) or pa.types.is_fixed_size_list(v.type):
            flat = v.values
            while pa.types.is_fixed_size_list(flat.type):
                flat = flat.flatten()
            out[name] = flat.to_numpy(zero_copy_only=False).tobytes()
        else:
            out[name] = np.array([v.as_py()], dtype=v.type.to_pandas_dtype()).tobytes()
    return out


def check_dataset(path: Path, t: pa.Table) -> None:
    ds = sluice.Dataset(str(path))
    assert len(ds) == t.num_rows
    for row in range(t.num_rows):
        want = expected(t, row)
        got = ds.sample(row)
        assert set(got) == set(want), row
        for name in want:
            assert bytes(got[name]) == want[name], (row, name)


def test_parquet_file_through_the_command(tmp_path: Path) -> None:
    t = table(700)
    pq.write_table(t, tmp_path / "data.parquet", row_group_size=256)
    out = subprocess.run([*sluice_command(), "pack", str(tmp_path / "data.parquet"), "-o",
                          str(tmp_path / "ds"), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["samples"] == 700 and summary["bytes"] > 0
    fields = {f["name"]: f for f in sluice.Dataset(str(tmp_path / "ds")).fields}
    assert (fields["img"]["dtype"], fields["img"]["shape"]) == ("uint8", [-1])
    assert (fields["label"]["dtype"], fields["label"]["shape"]) == ("int64", [])
    assert (fields["emb"]["dtype"], fields["emb"]["shape"]) == ("float16", [2, 3])
    assert (fields["toks"]["dtype"], fields["toks"]["shape"]) == ("uint16", [-1])
    assert (fields["digest"]["dtype"], fields["digest"]["shape"]) == ("uint8", [16])
    assert (fields["flag"]["dtype"], fields["flag"]["shape"]) == ("bool", [])
    check_dataset(tmp_path / "ds", t)
    # The same command on the packed data: the CLI's other commands work from the wheel too.
    info = subprocess.run([*sluice_command(), "inspect", str(tmp_path / "ds"), "--json"],
                          capture_output=True, text=True, check=True)
    assert json.loads(info.stdout)["samples"] == 700


def test_directory_of_parquet_files_in_name_order(tmp_path: Path) -> None:
    t = table(300, seed=1)
    src = tmp_path / "src"
    src.mkdir()
    for i, (start, n) in enumerate([(0, 120), (120, 100), (220, 80)]):
        pq.write_table(t.slice(start, n), src / f"part-{i:05d}.parquet")
    subprocess.run([*sluice_command(), "pack", str(src), "-o", str(tmp_path / "ds")], check=True,
                   capture_output=True)
    check_dataset(tmp_path / "ds", t)


def test_hugging_face_save_to_disk_and_dataset_objects(tmp_path: Path) -> None:
    n = 200
    rng = np.random.default_rng(2)
    images = [rng.bytes(int(rng.integers(1, 500))) for _ in range(n)]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "label": list(range(n))},
        features=datasets.Features({"image": datasets.Image(decode=False),
                                    "label": datasets.Value("int32")}))
    ds.save_to_disk(str(tmp_path / "hf"), max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("*.arrow"))) > 1  # several files, read in order
    subprocess.run([*sluice_command(), "pack", str(tmp_path / "hf"), "-o", str(tmp_path / "ds")],
                   check=True, capture_output=True)
    check_dataset(tmp_path / "ds", ds.data.table)
    # A Dataset object, shuffled and cut: sluice keeps its order (the indices mapping).
    view = ds.shuffle(seed=3).select(range(50))
    sluice.pack(view, tmp_path / "view")
    packed = sluice.Dataset(str(tmp_path / "view"))
    assert [np.frombuffer(packed.sample(i)["label"], np.int32)[0] for i in range(50)] == \
        view["label"]
    assert [bytes(packed.sample(i)["image"]) for i in range(50)] == \
        [images[j] for j in view["label"]]


def test_table_with_columns_and_the_loader(tmp_path: Path) -> None:
    # More rows than one record batch: later batches are slices whose offsets do not start at 0.
    t = table(2500, seed=4)
    sluice.pack(t, tmp_path / "all")
    check_dataset(tmp_path / "all", t)
    t = t.slice(0, 300)
    out = sluice.pack(t, tmp_path / "ds", columns=["label", "img"], shard_bytes=16 << 10)
    assert out["samples"] == 300
    check_dataset(tmp_path / "ds", t.select(["label", "img"]))
    loader = sluice.Loader({"dataset": {"path": str(tmp_path / "ds")}, "batch_size": 300,
                            "shuffle": {"mode": "none"}, "drop_last": False})
    batch = next(iter(loader))
    assert batch["label"].tolist() == t.column("label").to_pylist()


def test_errors_name_the_column_row_and_file(tmp_path: Path) -> None:
    with_null = pa.table({"x": pa.array([1, 2, None, 4], pa.int64())})
    with pytest.raises(ValueError, match=r"column 'x': row 2 is null"):
        sluice.pack(with_null, tmp_path / "a")
    by_path = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"\xff\xd8", "path": None}, {"bytes": None, "path": "b.jpg"}]},
        features=datasets.Features({"image": datasets.Image(decode=False)}))
    with pytest.raises(ValueError, match=r"column 'image': row 1 is null in its bytes"):
        sluice.pack(by_path, tmp_path / "p")
    stamps = pa.table({"when": pa.array([0, 1], pa.timestamp("ms"))})
    with pytest.raises(ValueError, match=r"column 'when' \(timestamp\[ms\]\): no sluice field"):
        sluice.pack(stamps, tmp_path / "b")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "p"))
    src = tmp_path / "mixed"
    src.mkdir()
    pq.write_table(pa.table({"x": pa.array([1, 2], pa.int64())}), src / "a.parquet")
    pq.write_table(pa.table({"x": pa.array([1.5], pa.float64())}), src / "b.parquet")
    out = subprocess.run([*sluice_command(), "pack", str(src), "-o", str(tmp_path / "c")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "b.parquet: its columns differ from the first file's" in out.stderr
    assert not (tmp_path / "c").exists()
    out = subprocess.run([*sluice_command(), "pack", str(tmp_path / "nope.parquet"), "-o",
                          str(tmp_path / "e")], capture_output=True, text=True)
    assert out.returncode == 1 and "nope.parquet: no such file or directory" in out.stderr
    with pytest.raises(TypeError, match="cannot read a dict"):
        sluice.pack({"x": [1]}, tmp_path / "d")
