"""Datasets and configs for the Python tests, written with sluice.DatasetWriter."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import sluice

N = 1000  # samples in the mixed dataset


def sample_fields(i: int) -> dict[str, np.ndarray]:
    """The fields of sample i of the mixed dataset: a deterministic function of i."""
    rng = np.random.default_rng(i)
    return {
        "data": rng.integers(0, 256, size=100 + (i * 37) % 3000, dtype=np.uint8),
        "label": np.array(i % 10, dtype=np.int64),
        "feat": rng.standard_normal((3, 4)).astype(np.float32),
        "mask": (rng.integers(0, 2, size=5) == 1),
        "tokens": rng.integers(0, 30000, size=(i % 7) + 1, dtype=np.int32),
    }


FIELDS = [
    {"name": "data", "dtype": "uint8", "shape": [-1]},
    {"name": "label", "dtype": "int64", "shape": []},
    {"name": "feat", "dtype": "float32", "shape": [3, 4]},
    {"name": "mask", "dtype": "bool", "shape": [5]},
    {"name": "tokens", "dtype": "int32", "shape": [-1]},
]


@pytest.fixture(scope="session")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset with a variable-size, a scalar, a 2-D float, a bool and a variable int field,
    spread over several shards."""
    path = tmp_path_factory.mktemp("mixed") / "ds"
    with sluice.DatasetWriter(str(path), FIELDS, shard_bytes=512 << 10) as w:
        for i in range(N):
            w.add(sample_fields(i))
    return path


@pytest.fixture(scope="session")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4096 samples of one 4 KiB field (the layout read straight into batch buffers)."""
    path = tmp_path_factory.mktemp("fixed") / "ds"
    with sluice.DatasetWriter(str(path), [{"name": "data", "dtype": "uint8", "shape": [4096]}],
                              shard_bytes=4 << 20) as w:
        for i in range(4096):
            w.add([np.full(4096, i % 251, dtype=np.uint8)])
    return path


def config(path: Path, **keys: object) -> dict:
    """A config dict for `path`: small batches, a short IO timeout, fixed seed."""
    c: dict = {"dataset": {"path": str(path)}, "batch_size": 32, "seed": 7,
               "io": {"timeout_ms": 5000, "threads": 2}}
    c.update(keys)
    return c


@pytest.fixture(autouse=True)
def _no_env_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def split_shards(full: Path, root: Path) -> tuple[Path, Path, list[int], list[int]]:
    """Two partial copies of a packed dataset, as two nodes would hold it: root/even with the
    manifest and the even shards, root/odd with the manifest and the odd ones. Returns
    (even_dir, odd_dir, even shard numbers, odd shard numbers)."""
    shards = sorted(full.glob("shard-*.sluice"))
    assert len(shards) >= 2
    dirs = []
    for parity in ("even", "odd"):
        d = root / parity
        d.mkdir()
        shutil.copy(full / "manifest.sluice", d)
        for k, f in enumerate(shards):
            if k % 2 == (parity == "odd"):
                shutil.copy(f, d)
        dirs.append(d)
    numbers = list(range(len(shards)))
    return dirs[0], dirs[1], numbers[0::2], numbers[1::2]
