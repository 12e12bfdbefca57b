#!/usr/bin/env python3
"""A directory of 100k files of 4 KiB read in place (issue 7: cold cache, at least 3x the
samples/s of torch.utils.data.DataLoader with num_workers=2 on the same files), alternating
ROUNDS times. Both list the tree before the page cache (and with it the inode and dentry caches)
is dropped, then read one whole epoch (every file once, so every open and read is cold) with a
global shuffle, batch 256; samples/s is files / epoch time.

  python benchmarks/files_bench.py [WORKDIR] [--rounds R]   (root: drop_caches)
Makes WORKDIR/tree (100 class directories x 1000 files) once. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sluice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from train import ImageFolderFiles  # noqa: E402  the peer users would write: open + read per file

FILES, CLASSES, SIZE, BATCH = 100_000, 100, 4096, 256


def make_tree(root: Path) -> None:
    if (root / f"c{CLASSES - 1:03d}").exists():
        return
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        d = root / f"c{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(FILES // CLASSES):
            (d / f"{k:05d}.bin").write_bytes(rng.integers(0, 256, SIZE, dtype=np.uint8).tobytes())


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def epoch_rate(batches) -> float:
    n, t0 = 0, time.perf_counter()
    for b in batches:
        n += len(b[1] if isinstance(b, (list, tuple)) else b["index"])
    assert n == FILES, n
    return n / (time.perf_counter() - t0)


def sluice_rate(root: Path) -> float:
    cfg = {"dataset": {"path": str(root), "format": "files"}, "batch_size": BATCH,
           "io": {"threads": 8}, "prefetch": 16, "drop_last": False}
    loader = sluice.Loader(cfg, rank=0, world_size=1)  # lists the tree
    drop_caches()
    return epoch_rate(loader)


def dataloader_rate(root: Path) -> float:
    ds = ImageFolderFiles(str(root))
    dl = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=2)
    drop_caches()
    return epoch_rate(dl)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path, nargs="?", default=Path("/var/tmp/sluice-files"))
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    root = a.work / "tree"
    make_tree(root)
    ours, theirs = [], []
    for _ in range(a.rounds):
        ours.append(sluice_rate(root))
        theirs.append(dataloader_rate(root))
    ratio = statistics.median(o / t for o, t in zip(ours, theirs))
    print("| 100k files of 4 KiB, cold cache, samples/s | sluice Python (format files) | DataLoader, num_workers=2 | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| one cold epoch, median of {a.rounds} rounds | {statistics.median(ours):.0f} | "
          f"{statistics.median(theirs):.0f} | {ratio:.2f}x | 3x |")
    print("per round: sluice " + ", ".join(f"{x:.0f}" for x in ours) +
          "; DataLoader " + ", ".join(f"{x:.0f}" for x in theirs))


if __name__ == "__main__":
    main()
