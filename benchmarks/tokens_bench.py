#!/usr/bin/env python3
"""Token windows from a warm page cache (issue 7: at least 1 GB/s from Python), sluice's Python
iterator against nanoGPT's get_batch (np.memmap, random starts, torch.stack of from_numpy
windows) on the same file, batch and window length, alternating ROUNDS times.

  python benchmarks/tokens_bench.py [WORKDIR] [--seconds S] [--rounds R]
Makes WORKDIR/tokens.bin (512 MiB of uint16 tokens) once. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import sluice

SEQ, BATCH = 1024, 64


def sluice_rate(path: Path, seconds: float) -> float:
    cfg = {"dataset": {"path": str(path), "format": "tokens", "seq_len": SEQ},
           "batch_size": BATCH, "io": {"direct": False, "threads": 2}}
    loader = sluice.Loader(cfg, rank=0, world_size=1)

    def batches():
        while True:
            yield from loader

    it, n = batches(), 0
    next(it)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = next(it)["tokens"]
        n += x.numel() * x.element_size()
    return n / (time.perf_counter() - t0)


def nanogpt_rate(path: Path, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    rng = np.random.default_rng(0)
    while time.perf_counter() - t0 < seconds:
        data = np.memmap(path, dtype=np.uint16, mode="r")  # nanoGPT re-opens it every batch
        ix = rng.integers(0, len(data) - SEQ, BATCH)
        x = torch.stack([torch.from_numpy(data[i : i + SEQ].astype(np.int64)) for i in ix])
        n += x.numel() * 2  # the token bytes read, as for sluice
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path, nargs="?", default=Path("/var/tmp/sluice-tokens"))
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    path = a.work / "tokens.bin"
    if not path.exists():
        np.random.default_rng(0).integers(0, 50257, 256 << 20, dtype=np.uint16).tofile(path)
    path.read_bytes()  # warm the page cache
    ours, theirs = [], []
    for _ in range(a.rounds):
        ours.append(sluice_rate(path, a.seconds))
        theirs.append(nanogpt_rate(path, a.seconds))
    ratio = statistics.median(o / t for o, t in zip(ours, theirs))
    print("| token windows (seq_len 1024, batch 64, uint16), warm | sluice Python | nanoGPT get_batch (memmap) | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| bytes/s, median of {a.rounds} | {statistics.median(ours) / 1e9:.2f} GB/s | "
          f"{statistics.median(theirs) / 1e9:.2f} GB/s | {ratio:.2f}x | 1 GB/s |")
    print("per round: sluice " + ", ".join(f"{x / 1e9:.2f}" for x in ours) +
          "; nanoGPT " + ", ".join(f"{x / 1e9:.2f}" for x in theirs) + " GB/s")


if __name__ == "__main__":
    main()
