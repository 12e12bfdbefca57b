"""Checkpoints on the data disk: sluice's DCP Writer/Reader against fio, torch.save and DCP's
FileSystemWriter on the same disk, in one run; then what a checkpoint does to a Loader reading
cold 4 KiB samples in the same process, with QoS (share 0.05, the default) and without (1).

    sudo .venv/bin/python benchmarks/checkpoint_bench.py --dir /var/tmp/ckpt-bench \
        [--gib 2 --rounds 3]

Root: the page cache is dropped before every load and every loader window. Each round runs
every contender once, alternating; the medians are printed and written to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

import sluice
from sluice.checkpoint import Reader, Writer


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fsync_tree(path: Path) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fio(path: Path, rw: str, gib: int) -> float:
    out = subprocess.run(["fio", "--name=ckpt", f"--filename={path}", f"--rw={rw}", "--bs=1M",
                          "--direct=1", "--ioengine=io_uring", f"--size={gib}G", "--iodepth=8",
                          "--end_fsync=1", "--output-format=json"],
                         check=True, capture_output=True, text=True)
    job = json.loads(out.stdout)["jobs"][0]
    side = job["write"] if rw == "write" else job["read"]
    return side["bw_bytes"] / 1e9


def make_state(gib: int) -> dict:
    n = 16
    per = (gib << 30) // n // 4
    g = torch.Generator().manual_seed(0)
    return {"model": {f"layer{i}": torch.randn(per, generator=g) for i in range(n)}, "step": 1}


def state_bytes(s: dict) -> int:
    return sum(t.numel() * t.element_size() for t in s["model"].values())


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def saves(d: Path, state: dict, gib: int) -> dict[str, float]:
    size = state_bytes(state)
    out = {}
    # A checkpoint is a new file: fio writes a new one too (overwriting allocated blocks is up
    # to twice as fast on ext4 here, and no checkpoint does that).
    f = d / "fio.dat"
    f.unlink(missing_ok=True)
    drop_caches()
    out["fio write"] = fio(f, "write", gib)

    def sluice_save() -> None:
        dcp.save(state, storage_writer=Writer(d / "sluice"))

    def torch_save() -> None:
        with open(d / "torch.pt", "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())

    def dcp_save() -> None:
        dcp.save(state, storage_writer=FileSystemWriter(str(d / "dcp"), sync_files=True))

    for name, fn, target in [("sluice save", sluice_save, "sluice"),
                             ("torch.save", torch_save, "torch.pt"),
                             ("DCP FileSystemWriter", dcp_save, "dcp")]:
        p = d / target
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        drop_caches()
        out[name] = size / timed(fn) / 1e9
    # Loads, cold: fio's sequential read of its file, sluice's Reader of its checkpoint.
    drop_caches()
    out["fio read"] = fio(f, "read", gib)
    target = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}, "step": 0}
    drop_caches()
    out["sluice load"] = size / timed(
        lambda: dcp.load(target, storage_reader=Reader(d / "sluice"))) / 1e9
    assert all(torch.equal(target["model"][k], v) for k, v in state["model"].items())
    drop_caches()
    out["DCP FileSystemReader load"] = size / timed(
        lambda: dcp.load(target, storage_reader=FileSystemReader(str(d / "dcp")))) / 1e9
    return out


def async_blocking(d: Path, state: dict) -> dict[str, float]:
    out = {}
    for name, make in [("sluice Writer", lambda: Writer(d / "async-sluice")),
                       ("FileSystemWriter", lambda: FileSystemWriter(str(d / "async-dcp")))]:
        t = time.perf_counter()
        fut = dcp.async_save(state, storage_writer=make())
        blocked = time.perf_counter() - t
        fut.result()
        out[f"async_save blocks ({name}), s"] = blocked
        out[f"async_save total ({name}), s"] = time.perf_counter() - t
    return out


def make_dataset(path: Path, n: int) -> None:
    if (path / "manifest.sluice").exists():
        return
    rng = np.random.default_rng(0)
    with sluice.DatasetWriter(str(path), [{"name": "data", "dtype": "uint8", "shape": [4096]}],
                              shard_bytes=256 << 20) as w:
        for _ in range(n):
            w.add([rng.integers(0, 256, 4096, dtype=np.uint8)])


def loader_window(dataset: Path, seconds: float, ckpt=None) -> dict[str, float]:
    """samples/s of a Loader (direct I/O: every read cold) for `seconds`; with `ckpt` (a
    function) running in a thread from the start, samples/s while it ran and its time."""
    loader = sluice.Loader({"dataset": {"path": str(dataset)}, "batch_size": 256,
                            "io": {"direct": True}}, rank=0, world_size=1)
    it = iter(loader)
    next(it)  # warm up threads and engines
    stamps: list[tuple[float, int]] = []
    done: dict[str, float] = {}
    thread = None
    start = time.perf_counter()
    if ckpt is not None:
        def run() -> None:
            t = time.perf_counter()
            ckpt()
            done["end"] = time.perf_counter()
            done["seconds"] = done["end"] - t
        thread = threading.Thread(target=run)
        thread.start()
    while time.perf_counter() - start < seconds or (thread and thread.is_alive()):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        stamps.append((time.perf_counter(), len(b["index"])))
    if thread:
        thread.join()
    end = done.get("end", stamps[-1][0])
    window = [n for t, n in stamps if t <= end]
    out = {"samples/s": sum(window) / (end - start)}
    if ckpt is not None:
        out["checkpoint s"] = done["seconds"]
        out["held s"] = loader.stats()["checkpoint_held_seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--gib", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--qos-gib", type=int, default=1, help="state saved during the loader window")
    ap.add_argument("--samples", type=int, default=262144, help="4 KiB samples of the dataset")
    ap.add_argument("--parts", default="saves,async,qos", help="what to run, comma-separated")
    ap.add_argument("--shares", default="0.05", help="Writer(share=...) values with QoS on")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    state = make_state(args.gib)
    small = make_state(args.qos_gib)
    dataset = args.dir / "ds4k"
    make_dataset(dataset, args.samples)
    rows: dict[str, list[float]] = {}
    for r in range(args.rounds):
        parts = args.parts.split(",")
        for k, v in (saves(args.dir, state, args.gib) if "saves" in parts else {}).items():
            rows.setdefault(k, []).append(v)
        for k, v in (async_blocking(args.dir, state) if "async" in parts else {}).items():
            rows.setdefault(k, []).append(v)
        qos = [("no checkpoint", None)] + [(f"QoS on (share {x})", float(x))
                                           for x in args.shares.split(",")]
        for name, share in [] if "qos" not in parts else qos + [("QoS off (share 1)", 1.0)]:
            shutil.rmtree(args.dir / "qos", ignore_errors=True)
            drop_caches()
            ckpt = None if share is None else (
                lambda share=share: dcp.save(small, storage_writer=Writer(args.dir / "qos",
                                                                          share=share)))
            for k, v in loader_window(dataset, 6.0, ckpt).items():
                rows.setdefault(f"loader, {name}: {k}", []).append(v)
        print(f"round {r} done", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    size = state_bytes(state) / 2**30
    print(f"state dict {size:.1f} GiB (16 float32 tensors), {args.rounds} rounds, medians; GB/s")
    for k, v in med.items():
        print(f"{k:48s} {v:10.3f}")
    if "sluice save" in med:
        w = med["sluice save"]
        print(f"sluice save / fio write {w / med['fio write']:.2f}, / torch.save "
              f"{w / med['torch.save']:.2f}, / FileSystemWriter "
              f"{w / med['DCP FileSystemWriter']:.2f}; "
              f"sluice load / fio read {med['sluice load'] / med['fio read']:.2f}")
    base = med.get("loader, no checkpoint: samples/s")
    names = [f"QoS on (share {x})" for x in args.shares.split(",")] + ["QoS off (share 1)"]
    for name in [] if base is None else names:
        print(f"loader during checkpoint, {name}: {med[f'loader, {name}: samples/s'] / base:.2f}x "
              f"of without; checkpoint took {med[f'loader, {name}: checkpoint s']:.2f} s")
    (args.dir / "results.json").write_text(json.dumps({"rows": rows, "medians": med}, indent=1))


if __name__ == "__main__":
    main()
