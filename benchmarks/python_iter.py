#!/usr/bin/env python3
"""sluice's Python iterator, timed the way `sluice bench` and benchmarks/peers/peers.py time
their consumers: iterate for --seconds, touch every sample (the first byte of each), print one
line of JSON.

  python benchmarks/python_iter.py CONFIG.yaml [--seconds S] [--cold] [--batch-size B] [--json]

--cold drops the page cache (root) after the loader is built and starts the clock with no
warm-up; otherwise one second of warm-up is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import sluice


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--cold", action="store_true")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    overrides = {"batch_size": args.batch_size} if args.batch_size else {}
    loader = sluice.Loader(args.config, rank=0, world_size=1, **overrides)

    def batches():
        while True:  # epochs follow one another
            yield from loader

    it = batches()
    field = loader.fields[0]["name"]  # "data" for packed and npy datasets, "tokens" for tokens
    if args.cold:
        drop_caches()
    else:
        t_end = time.perf_counter() + 1
        while time.perf_counter() < t_end:
            next(it)
    samples = nbytes = checksum = 0
    t0 = time.perf_counter()
    deadline = t0 + args.seconds
    while time.perf_counter() < deadline:
        batch = next(it)
        data = batch[field]
        values = data.numpy()  # no copy; numpy's indexing costs less per call than torch's
        if f"{field}_offsets" in batch:  # variable-size samples: values + offsets
            checksum += int(values[batch[f"{field}_offsets"].numpy()[:-1]].sum())
        else:
            checksum += int(values.reshape(values.shape[0], -1)[:, 0].sum())
        samples += batch["index"].numel()
        nbytes += data.numel() * data.element_size()
    seconds = time.perf_counter() - t0
    stats = loader.stats()
    out = {
        "peer": "sluice-python",
        "samples_per_s": samples / seconds,
        "bytes_per_s": nbytes / seconds,
        "samples": samples,
        "seconds": seconds,
        "checksum": checksum,
        "wait_fraction": stats["wait_seconds"] / max(seconds, 1e-9),
        "engine": stats["engine"],
        "direct_io": stats["direct_io"],
    }
    print(json.dumps(out) if args.json else out)


if __name__ == "__main__":
    main()
