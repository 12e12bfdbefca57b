#!/usr/bin/env python3
"""Issue 34's numbers on a GPU machine (scripts/gpu-check.sh runs it; never in CI). Each
section appends its markdown rows to --md and its figures to --json as soon as it has them.

  h2d     host-to-device throughput, page cache warm, 4 MiB and 32 MiB batches of 256 KiB
          samples: sluice `device: cuda:0` (default config, and io.threads 16) against a plain
          pinned-memory `copy_(non_blocking=True)` of the same size in the same run (target
          0.9x), with the same loaders on `device: cpu` beside them: the reader's own limit.
  idle    GPU idle in a synthetic step (fp16 matrix products) of about 1 ms and about 5 ms per
          4 MiB batch: sluice (default config) against torch.utils.data.DataLoader(pin_memory=
          True) with 4 and 15 workers over the same shard files, one pread per sample (target
          under 5% for sluice at 5 ms).
  decode  JPEG tars (ImageNet-like sizes, made with Pillow) through `transforms:` (decode,
          random_resized_crop 224, flip, layout chw) onto cuda:0 at io.threads auto, 4, 8, 16,
          against DataLoader + PIL + torchvision.transforms.v2 with 15 workers (images/s).

  python benchmarks/gpu_bench.py WORKDIR [--sections h2d,idle,decode] [--seconds S]
                                 [--md FILE] [--json FILE]
  python benchmarks/gpu_bench.py WORKDIR --make-jpegs     (data only; needs no sluice)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from jpegs import photo_jpeg, read_member, tar_members

SAMPLE = 256 << 10  # bytes per sample of the raw dataset
SAMPLES = 16384  # 4 GiB
IMAGES, TARS, IMAGE_BATCH = 8192, 8, 256
STEPS = [{"decode": "rgb"}, {"random_resized_crop": {"size": 224}}, {"flip": 0.5},
         {"layout": "chw"}]


class Report:
    """Markdown rows and a JSON dict, both rewritten as each figure arrives."""

    def __init__(self, md: Path | None, js: Path | None) -> None:
        self.md, self.js = md, js
        self.results: dict = json.loads(js.read_text()) if js and js.exists() else {}

    def row(self, *cells: object) -> None:
        line = "| " + " | ".join(str(c) for c in cells) + " |"
        print(line, flush=True)
        if self.md:
            with open(self.md, "a") as f:
                f.write(line + "\n")

    def put(self, key: str, value: object) -> None:
        self.results[key] = value
        if self.js:
            self.js.write_text(json.dumps(self.results, indent=1))


def gbs(x: float) -> str:
    return f"{x / 1e9:.2f} GB/s"


# --- the raw dataset (h2d, idle) ---------------------------------------------------------

def make_raw(work: Path) -> Path:
    import sluice

    path = work / "raw"
    if (path / "manifest.sluice").exists():
        return path
    fields = [{"name": "x", "dtype": "uint8", "shape": [SAMPLE]}]
    base = np.random.default_rng(0).integers(0, 256, SAMPLE, dtype=np.uint8)
    with sluice.DatasetWriter(str(path), fields, shard_bytes=512 << 20) as w:
        for i in range(SAMPLES):
            w.add([base ^ np.uint8(i % 251)])
    return path


def warm(path: Path) -> None:
    for f in sorted(path.glob("shard-*")):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def raw_loader(path: Path, batch: int, device: str, **keys):
    import sluice

    cfg = {"dataset": {"path": str(path)}, "batch_size": batch, "device": device}
    cfg.update(keys)
    return sluice.Loader(cfg, rank=0, world_size=1)


def forever(make):
    while True:
        yield from make()


def loader_rate(loader, seconds: float) -> float:
    """Bytes per second that `loader` delivers (batches across epochs), after a warm-up."""
    it = forever(lambda: loader)
    for _ in range(3):
        next(it)
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(it)["x"].numel()
    torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    it.close()
    print(f"{rate / 1e9:.2f} GB/s", loader.stats(), file=sys.stderr)
    loader.close()
    return rate


def pinned_copy_rate(nbytes: int, seconds: float) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        dst.copy_(src, non_blocking=True)
        n += nbytes
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def h2d(work: Path, seconds: float, rounds: int, threads: list[str], r: Report) -> None:
    path = make_raw(work)
    warm(path)
    r.row("batch", "what", "median", "runs", "vs pinned copy_")
    r.row("---", "---", "---", "---", "---")
    for batch in (16, 128):  # 4 MiB, 32 MiB
        nbytes = batch * SAMPLE
        runs: dict[str, list[float]] = {}
        variants = {"pinned copy_": lambda: pinned_copy_rate(nbytes, seconds)}
        for t in threads:  # "default": no io: section
            keys = {} if t == "default" else {"io": {"threads": int(t)}}
            label = "(default)" if t == "default" else f"io.threads {t}"
            for device in ("cuda:0", "cpu"):
                variants[f"sluice {device} {label}"] = (
                    lambda device=device, keys=keys: loader_rate(
                        raw_loader(path, batch, device, **keys), seconds))
        for _ in range(rounds):  # alternating
            for name, run in variants.items():
                runs.setdefault(name, []).append(run())
        copy = statistics.median(runs["pinned copy_"])
        for name, values in runs.items():
            m = statistics.median(values)
            r.row(f"{nbytes >> 20} MiB", name, gbs(m), " ".join(f"{v / 1e9:.2f}" for v in values),
                  f"{m / copy:.2f}x")
            r.put(f"h2d_{nbytes >> 20}MiB_{name}", m)


# --- GPU idle in a training step -----------------------------------------------------------

class Step:
    """A synthetic training step on a 4 MiB uint8 batch: `k` fp16 products [512, 4096] x
    [4096, 4096], k calibrated to the wanted milliseconds."""

    def __init__(self) -> None:
        self.w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16) / 64
        self.k = 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = x.view(512, -1)[:, :4096].half()
        for _ in range(self.k):
            h = torch.relu(h @ self.w)
        return h

    def calibrate(self, ms: float) -> float:
        x = torch.zeros(4 << 20, dtype=torch.uint8, device="cuda")
        self.k = 20
        for _ in range(3):
            self(x)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            self(x)
        e.record()
        torch.cuda.synchronize()
        per_product = s.elapsed_time(e) / (10 * 20)
        self.k = max(1, round(ms / per_product))
        s.record()
        for _ in range(10):
            self(x)
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / 10


def idle_fraction(batches, step: Step, seconds: float) -> tuple[float, float]:
    """(1 - GPU time inside steps / wall time, wall ms per step), CUDA events around each step."""
    for _ in range(5):  # warm-up: workers started, kernels loaded
        step(next(batches))
    torch.cuda.synchronize()
    events, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = next(batches)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step(x)
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    busy = sum(s.elapsed_time(e) for s, e in events) / 1000
    return max(0.0, 1 - busy / wall), 1000 * wall / len(events)


class Files(torch.utils.data.Dataset):
    """Map-style dataset over sluice's shard files (one pread per sample), for DataLoader."""

    def __init__(self, path: Path) -> None:
        import sluice

        ds = sluice.Dataset(str(path))
        self.extents = [ds.extent(i) for i in range(len(ds))]  # (shard file, offset, size)
        self.fds: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.extents)

    def __getitem__(self, i: int) -> torch.Tensor:
        shard, offset, _ = self.extents[i]
        fd = self.fds.get(shard) or self.fds.setdefault(shard, os.open(shard, os.O_RDONLY))
        return torch.frombuffer(bytearray(os.pread(fd, SAMPLE, offset)), dtype=torch.uint8)


def idle(work: Path, seconds: float, r: Report) -> None:
    path = make_raw(work)
    warm(path)
    step = Step()
    r.row("step (measured)", "fed by", "GPU idle", "wall ms per step")
    r.row("---", "---", "---", "---")
    for target in (1.0, 5.0):
        ms = step.calibrate(target)
        for workers in (None, 4, 15):
            if workers is None:
                name, source = "sluice cuda:0 (default)", raw_loader(path, 16, "cuda:0")
                batches = (b["x"] for b in forever(lambda: source))
            else:
                name = f"DataLoader {workers} workers"
                source = torch.utils.data.DataLoader(Files(path), batch_size=16, shuffle=True,
                                                     num_workers=workers, pin_memory=True,
                                                     persistent_workers=True)
                batches = (b.cuda(non_blocking=True) for b in forever(lambda: source))
            frac, wall = idle_fraction(batches, step, seconds)
            batches.close()
            if workers is None:
                source.close()
            source = batches = None  # DataLoader workers end with the last reference
            r.row(f"{target:g} ms ({ms:.2f} ms)", name, f"{100 * frac:.1f}%", f"{wall:.2f}")
            r.put(f"idle_{target:g}ms_{name}", frac)


# --- decode to the GPU ---------------------------------------------------------------------

def make_tar(args: tuple[Path, int, int]) -> None:
    path, first, last = args
    rng = np.random.default_rng(first)
    with tarfile.open(path.with_suffix(".part"), "w") as t:
        for i in range(first, last):
            for name, data in ((f"{i:06d}.jpg", photo_jpeg(rng)), (f"{i:06d}.cls", str(i % 10).encode())):
                m = tarfile.TarInfo(name)
                m.size = len(data)
                t.addfile(m, io.BytesIO(data))
    path.with_suffix(".part").rename(path)


def make_jpegs(work: Path) -> Path:
    root = work / "jpegs"
    root.mkdir(parents=True, exist_ok=True)
    per = math.ceil(IMAGES / TARS)
    todo = [(root / f"shard-{s:03d}.tar", s * per, min(IMAGES, (s + 1) * per)) for s in range(TARS)
            if not (root / f"shard-{s:03d}.tar").exists()]
    with Pool(min(len(todo), os.cpu_count() or 1) or 1) as pool:
        pool.map(make_tar, todo)
    return root


class TarJpegs(torch.utils.data.Dataset):
    """The tar members, read by offset with pread, decoded by Pillow, then torchvision v2's
    RandomResizedCrop(224) + RandomHorizontalFlip + PILToTensor (uint8 CHW, as sluice's)."""

    def __init__(self, root: Path) -> None:
        from torchvision.transforms import v2

        self.items = tar_members(root)
        self.transform = v2.Compose([v2.RandomResizedCrop(224, antialias=True),
                                     v2.RandomHorizontalFlip(), v2.PILToTensor()])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        data = read_member(self.items[i])
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB"))


def images_per_s(batches, epochs: int) -> float:
    """Images/s over `epochs` epochs of `batches()` (each batch on cuda:0, yielding its image
    count), after a warm one."""
    for _ in batches():
        pass
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for count in batches():
            n += count
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def decode(work: Path, r: Report, epochs: int, threads: list[str]) -> None:
    import sluice

    root = make_jpegs(work)
    for tar in root.glob("*.tar"):
        tar.read_bytes()  # page cache warm: this measures decode, not the disk
    r.row("decode to cuda:0", "images/s", "vs DataLoader 15")
    r.row("---", "---", "---")
    rates = {}
    for t in threads:
        cfg = {"dataset": {"path": str(root), "format": "tar"}, "batch_size": IMAGE_BATCH,
               "drop_last": False, "device": "cuda:0", "transforms": {"jpg": STEPS},
               "io": {"threads": t if t == "auto" else int(t)}}
        loader = sluice.Loader(cfg, rank=0, world_size=1)

        def batches(loader=loader):
            for b in loader:
                assert b["jpg"].shape[1:] == (3, 224, 224), b["jpg"].shape
                yield int((~b["padding"]).sum())

        rates[f"sluice io.threads {t}"] = images_per_s(batches, epochs)
        loader.close()
    peer = "DataLoader + PIL + torchvision v2, 15 workers"
    dl = torch.utils.data.DataLoader(TarJpegs(root), batch_size=IMAGE_BATCH, shuffle=True,
                                     num_workers=15, pin_memory=True, persistent_workers=True)
    rates[peer] = images_per_s(lambda: (b.cuda(non_blocking=True).shape[0] for b in dl), epochs)
    for name, v in rates.items():
        r.row(name, f"{v:.0f}", f"{v / rates[peer]:.2f}x")
        r.put(f"decode_{name}", v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", type=Path)
    p.add_argument("--sections", default="h2d,idle,decode")
    p.add_argument("--seconds", type=float, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs in decode")
    p.add_argument("--h2d-threads", default="default,16", help="io.threads of the h2d loaders")
    p.add_argument("--decode-threads", default="auto,4,8,16", help="io.threads of decode")
    p.add_argument("--md", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--make-jpegs", action="store_true")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.make_jpegs:
        make_jpegs(a.work)
        return
    r = Report(a.md, a.json)
    r.put("device", torch.cuda.get_device_name(0))
    r.put("cpus", os.cpu_count())
    for section in a.sections.split(","):
        if r.md:
            with open(r.md, "a") as f:
                f.write(f"\n### {section} ({torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs)\n\n")
        if section == "h2d":
            h2d(a.work, a.seconds, a.rounds, a.h2d_threads.split(","), r)
        elif section == "idle":
            idle(a.work, a.seconds, r)
        elif section == "decode":
            decode(a.work, r, a.epochs, a.decode_threads.split(","))
        else:
            raise SystemExit(f"gpu_bench: unknown section {section!r}")


if __name__ == "__main__":
    main()
