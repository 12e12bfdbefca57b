#!/usr/bin/env python3
"""Trains a small CNN on JPEGs in WebDataset tar shards, decoded and augmented by sluice's loader
threads (config `transforms:`): no Python per sample, batches arrive as float16 CHW tensors.

  python examples/train_images.py SHARDS_DIR [--epochs 3] [--batch-size 64] [--make N]

SHARDS_DIR holds .tar shards with a `jpg` and a `cls` member per sample (webdataset's
TarWriter makes them). `--make N` first writes N synthetic JPEGs of two classes (bright
stripes or dark blobs, 300-600 px, Pillow) there, so the example runs anywhere; the model
should reach well above chance within a few epochs. Under torchrun, RANK / WORLD_SIZE give
each process its share of every epoch.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sluice

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make_shards(root: Path, n: int) -> None:
    import numpy as np
    import webdataset as wds
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(root / "train-000.tar")) as w:
        for i in range(n):
            h, wd = (int(v) for v in rng.integers(300, 601, 2))
            y, x = np.mgrid[0:h, 0:wd]
            label = i % 2
            if label == 0:  # bright stripes
                a = 160 + 80 * np.sin(x / rng.uniform(4, 12))[..., None] * np.ones(3)
            else:  # dark blobs
                a = 60 + 50 * (np.sin(x / 40.0) * np.cos(y / 30.0))[..., None] * np.ones(3)
            a = a + rng.normal(0, 10, (h, wd, 3))
            b = io.BytesIO()
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(b, format="JPEG", quality=90)
            w.write({"__key__": f"{i:06d}", "jpg": b.getvalue(), "cls": str(label).encode()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--make", type=int, default=0)
    args = ap.parse_args()
    if args.make:
        make_shards(Path(args.shards), args.make)

    loader = sluice.Loader({
        "dataset": {"path": args.shards, "format": "tar"},
        "batch_size": args.batch_size,
        "transforms": {"jpg": [
            {"decode": "rgb"},
            {"random_resized_crop": {"size": 112, "scale": [0.35, 1.0]}},
            {"flip": 0.5},
            {"normalize": {"mean": MEAN, "std": STD, "dtype": "float16"}},
            {"layout": "chw"},
        ]},
    })
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        seen = correct = 0
        total_loss = 0.0
        start = time.perf_counter()
        for batch in loader:
            x = batch["jpg"].float()  # [B, 3, 112, 112], normalized by sluice
            y = batch["cls"]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            total_loss += float(loss.detach()) * len(y)
        took = time.perf_counter() - start
        print(f"epoch {epoch}: loss {total_loss / seen:.3f}, accuracy {correct / seen:.3f}, "
              f"{seen / took:.0f} images/s (training included)")


if __name__ == "__main__":
    main()
