#!/usr/bin/env python3
"""Issue 6's numbers, on a GPU machine (scripts/gpu-check.sh runs it; not run in CI).

1. Host-to-device throughput, warm page cache, batches of 1 MiB and more: sluice with
   `device: cuda:0` against a plain pinned-memory `copy_(non_blocking=True)` of the same bytes
   per batch, in the same run (target: 0.9x).
2. A synthetic training step (matrix products of a few ms): GPU idle fraction with sluice
   feeding it against torch.utils.data.DataLoader(pin_memory=True) with 1, 2 and 4 workers
   over the same shard files (target: under 5% for sluice).

  python benchmarks/gpu_bench.py WORKDIR [--seconds S] [--json]
Writes a markdown table to stdout (and JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import sluice

SAMPLE = 256 << 10  # bytes per sample; batches of 16 = 4 MiB
BATCH = 16
SAMPLES = 4096  # 1 GiB


def make_dataset(work: Path) -> Path:
    path = work / "gpu-ds"
    if (path / "manifest.sluice").exists():
        return path
    fields = [{"name": "x", "dtype": "uint8", "shape": [SAMPLE]}, {"name": "y", "dtype": "int64", "shape": []}]
    rng = np.random.default_rng(0)
    with sluice.DatasetWriter(str(path), fields, shard_bytes=256 << 20) as w:
        for i in range(SAMPLES):
            w.add({"x": rng.integers(0, 256, SAMPLE, dtype=np.uint8), "y": np.array(i % 10, dtype=np.int64)})
    return path


def warm(path: Path) -> None:
    for f in sorted(path.glob("shard-*")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def sluice_loader(path: Path) -> sluice.Loader:
    cfg = {"dataset": {"path": str(path)}, "batch_size": BATCH, "device": "cuda:0",
           "io": {"direct": False, "threads": 4}, "prefetch": 8}
    return sluice.Loader(cfg, rank=0, world_size=1)


def batches(loader):
    while True:
        yield from loader


def h2d(path: Path, seconds: float) -> tuple[float, float]:
    it = batches(sluice_loader(path))
    next(it)
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += b["x"].numel()
    torch.cuda.synchronize()
    ours = n / (time.perf_counter() - t0)
    src = torch.empty(BATCH * SAMPLE, dtype=torch.uint8).pin_memory()
    dst = torch.empty(BATCH * SAMPLE, dtype=torch.uint8, device="cuda")
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        dst.copy_(src, non_blocking=True)
        n += src.numel()
    torch.cuda.synchronize()
    return ours, n / (time.perf_counter() - t0)


class Weights:
    def __init__(self) -> None:
        self.w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)

    def step(self, x: torch.Tensor) -> None:
        h = x[:, :4096].half()
        for _ in range(8):
            h = torch.relu(h @ self.w)


def idle_fraction(source, seconds: float, model: Weights) -> float:
    """1 - (GPU time in steps) / wall time, with CUDA events around each step's compute."""
    it = iter(source)

    def inputs() -> torch.Tensor:
        b = next(it)
        x = b["x"] if isinstance(b, dict) else b[0].cuda(non_blocking=True)
        return x.view(BATCH, -1)[:, : 4096 * 32].reshape(BATCH * 32, 4096)

    for _ in range(5):  # warm-up: workers started, kernels loaded
        model.step(inputs())
    torch.cuda.synchronize()
    events, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = inputs()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        model.step(x)
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    busy = sum(s.elapsed_time(e) for s, e in events) / 1000
    return max(0.0, 1 - busy / wall)


class Files(torch.utils.data.Dataset):
    """Map-style dataset over sluice's shard files (one pread per sample), for DataLoader."""

    def __init__(self, path: Path) -> None:
        ds = sluice.Dataset(str(path))
        self.extents = [ds.extent(i) for i in range(len(ds))]  # (shard file, offset, size)
        self.fds: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.extents)

    def __getitem__(self, i: int):
        shard, offset, _ = self.extents[i]
        fd = self.fds.get(shard) or self.fds.setdefault(shard, os.open(shard, os.O_RDONLY))
        return torch.frombuffer(bytearray(os.pread(fd, SAMPLE, offset)), dtype=torch.uint8), i % 10


def forever(make):
    while True:
        yield from make()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    path = make_dataset(a.work)
    warm(path)
    ours, plain = h2d(path, a.seconds)
    model = Weights()
    results = {"h2d_sluice": ours, "h2d_memcpy": plain, "h2d_ratio": ours / plain,
               "idle_sluice": idle_fraction(forever(lambda: sluice_loader(path)), a.seconds, model)}
    for workers in (1, 2, 4):
        dl = lambda: torch.utils.data.DataLoader(Files(path), batch_size=BATCH, shuffle=True,
                                                 num_workers=workers, pin_memory=True,
                                                 persistent_workers=False)
        results[f"idle_dataloader_{workers}"] = idle_fraction(forever(dl), a.seconds, model)
    print(f"| H2D, {BATCH} x {SAMPLE >> 10} KiB batches | sluice {ours / 1e9:.2f} GB/s | "
          f"pinned copy_ {plain / 1e9:.2f} GB/s | {ours / plain:.2f}x (target 0.9x) |")
    for k, v in results.items():
        if k.startswith("idle"):
            print(f"| GPU idle, {k[5:]} | {100 * v:.1f}% |")
    if a.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
