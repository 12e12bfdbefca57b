#!/usr/bin/env python3
"""Issue 22: decode + random_resized_crop 224 + flip, batch 256, images/s on this machine's
cores, on the same WebDataset tar shards of JPEGs of ImageNet-like sizes (300-600 px, made with
Pillow), alternating ROUNDS times (medians):

- sluice: `sluice.Loader` with `transforms:` (default io.threads), one epoch after a warm one;
- sluice bench: the same config through `sluice bench` (the C++ loader, no Python);
- C++ loop: benchmarks/transform_loop (build-dir), the same transform on the JPEGs already in
  memory on NCORES plain threads: the ceiling;
- DataLoader + PIL: torch's DataLoader over the tar members (read with pread), each decoded by
  Pillow and cropped, resized and flipped as torchvision's RandomResizedCrop and
  RandomHorizontalFlip do on PIL images, with the number of workers (1-3) that serves it best;
- SPDL 0.8 (when --spdl-python names a venv with spdl and FFmpeg's libraries): its pipeline
  with FFmpeg's decoder, crop, scale and hflip filters in NCORES threads, JPEGs in memory.

(torchvision's own decode_jpeg cannot run here: the only torchvision for torch 2.13.0 is a CUDA
build that does not import with the CPU torch; see benchmarks/peers/requirements.txt.)

  python benchmarks/transform_bench.py [WORKDIR] [--images N] [--rounds R] [--spdl-python PY]
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

import sluice
from jpegs import photo_jpeg, read_member, tar_members

REPO = Path(__file__).resolve().parents[1]
BATCH, SIZE = 256, 224
STEPS = [{"decode": "rgb"}, {"random_resized_crop": {"size": SIZE}}, {"flip": 0.5}]


def make_shards(root: Path, n: int) -> None:
    if (root / "done").exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = math.ceil(n / 4)
    for s in range(4):
        with wds.TarWriter(str(root / f"shard-{s:03d}.tar")) as w:
            for i in range(s * per, min(n, (s + 1) * per)):
                w.write({"__key__": f"{i:06d}", "jpg": photo_jpeg(rng), "cls": str(i % 10).encode()})
    (root / "done").touch()


def config(root: Path) -> dict:
    return {"dataset": {"path": str(root), "format": "tar"}, "batch_size": BATCH,
            "drop_last": False, "transforms": {"jpg": STEPS}}


def run_sluice(root: Path, n: int) -> float:
    loader = sluice.Loader(config(root))
    for _ in loader:  # warm: page cache, threads
        pass
    t = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += int((~batch["padding"]).sum())
    assert seen == n, seen
    return n / (time.perf_counter() - t)


def run_bench_cli(root: Path, workdir: Path) -> float:
    cfg = workdir / "transform.yaml"
    cfg.write_text(json.dumps(config(root)))  # JSON is YAML
    out = subprocess.run([str(REPO / "build" / "sluice"), "bench", str(cfg), "--epochs", "3",
                          "--json"], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)["samples_per_s"])


def run_loop(root: Path, cores: int) -> float:
    exe = REPO / "build" / "benchmarks" / "transform_loop"
    out = subprocess.run([str(exe), str(root), str(cores), "4", str(SIZE)], capture_output=True,
                         text=True, check=True)
    return float(json.loads(out.stdout)["images_per_s"])


def crop_params(W: int, H: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (scale 0.08-1, ratio 3/4-4/3) on a W x H
    image: (left, top, w, h)."""
    area = W * H
    for _ in range(10):
        target = area * random.uniform(0.08, 1.0)
        aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= W and 0 < h <= H:
            return random.randint(0, W - w), random.randint(0, H - h), w, h
    return 0, 0, W, H


class TarJpegs(torch.utils.data.Dataset):
    """The tar members, read by offset with pread; each sample decoded and augmented with PIL as
    torchvision's RandomResizedCrop(224) + RandomHorizontalFlip() do on PIL images."""

    def __init__(self, root: Path) -> None:
        self.items = tar_members(root)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        data = read_member(self.items[i])
        img = Image.open(io.BytesIO(data)).convert("RGB")
        left, top, w, h = crop_params(*img.size)
        img = img.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + w, top + h))
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(img))  # a copy, as pil_to_tensor makes


def run_dataloader(root: Path, n: int, workers: int) -> float:
    dl = torch.utils.data.DataLoader(TarJpegs(root), batch_size=BATCH, shuffle=True,
                                     num_workers=workers, persistent_workers=True)
    for _ in dl:  # warm: workers started, page cache
        pass
    t = time.perf_counter()
    seen = sum(len(b) for b in dl)
    assert seen == n
    return n / (time.perf_counter() - t)


SPDL_SCRIPT = r"""
import io, json, math, random, sys, tarfile, time
import spdl.io
from spdl.pipeline import PipelineBuilder
root, cores, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import glob
data = []
for tar in sorted(glob.glob(root + "/*.tar")):
    with tarfile.open(tar) as t:
        data += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".jpg")]

# crop_params

def decode(b):
    packets = spdl.io.demux_image(b)
    x, y, w, h = crop_params(packets.codec.width, packets.codec.height)
    f = f"crop={w}:{h}:{x}:{y},scale={size}:{size}" + (",hflip" if random.random() < 0.5 else "")
    f += ",format=rgb24"
    frames = spdl.io.decode_packets(packets, filter_desc=f)
    return spdl.io.convert_frames(frames)

def run():
    pipe = (PipelineBuilder().add_source(data).pipe(decode, concurrency=cores)
            .aggregate(256).add_sink(4).build(num_threads=cores))
    n = 0
    t = time.perf_counter()
    with pipe.auto_stop():
        for batch in pipe:
            n += len(batch)
    return n / (time.perf_counter() - t)

run()  # warm
print(json.dumps({"images_per_s": run()}))
"""


def run_spdl(python: str, root: Path, cores: int) -> float:
    # The same crop parameters as the other peers: crop_params's source goes along.
    script = SPDL_SCRIPT.replace("# crop_params\n", inspect.getsource(crop_params))
    out = subprocess.run([python, "-c", script, str(root), str(cores), str(SIZE)],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", nargs="?", default="/tmp/sluice-transform-bench")
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--spdl-python", default="")
    args = ap.parse_args()
    workdir = Path(args.workdir)
    root = workdir / "jpegs"
    make_shards(root, args.images)
    cores = len(os.sched_getaffinity(0))
    results: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)
        print(f"  {name}: {value:.0f} images/s", file=sys.stderr, flush=True)

    for r in range(args.rounds):
        print(f"round {r + 1}", file=sys.stderr)
        note("sluice (Python iterator)", run_sluice(root, args.images))
        note("sluice bench (C++ loader)", run_bench_cli(root, workdir))
        note(f"C++ loop, {cores} threads", run_loop(root, cores))
        best = max((run_dataloader(root, args.images, w), w) for w in (1, 2, 3))
        note("DataLoader + PIL (best workers)", best[0])
        print(f"    (best with {best[1]} workers)", file=sys.stderr)
        if args.spdl_python:
            note(f"SPDL 0.8, {cores} threads", run_spdl(args.spdl_python, root, cores))
    base = statistics.median(results["sluice (Python iterator)"])
    print(f"\n{args.images} JPEGs 300-600 px, decode + random_resized_crop {SIZE} + flip, batch "
          f"{BATCH}, {cores} cores, medians of {args.rounds} alternating rounds\n")
    print("| pipeline | images/s | sluice (Python) / it |")
    print("|---|---|---|")
    for name, values in results.items():
        m = statistics.median(values)
        print(f"| {name} | {m:.0f} ({', '.join(f'{v:.0f}' for v in values)}) | {base / m:.2f}x |")


if __name__ == "__main__":
    main()
