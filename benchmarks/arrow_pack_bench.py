"""`sluice pack` of a parquet file of image-bytes rows against fio's sequential write on the
same disk, in one run: GB of sample bytes written per second, each a new file, alternating.

    sudo .venv/bin/python benchmarks/arrow_pack_bench.py --dir /var/tmp/arrow-bench \
        [--gib 1 --rounds 3]

The parquet file (random bytes, 64-192 KiB a row, as JPEG bytes are: incompressible, and an
int64 label) is made once. Before each contender the page cache is dropped (root), then the
parquet file is read once so that it is cached ("warm source": the write path alone) unless
--cold-source, and Python imports sluice and pyarrow once (their files cached, as after any
earlier Python run); sluice's time includes the command's start, the reads, the writes and
the final fsyncs. The medians are printed and written to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def make_source(path: Path, gib: float) -> int:
    rng = np.random.default_rng(0)
    target, total, rows = int(gib * (1 << 30)), 0, []
    while total < target:
        n = int(rng.integers(64 << 10, 192 << 10))
        rows.append(rng.bytes(n))
        total += n
    table = pa.table({"jpg": pa.array(rows, pa.binary()),
                      "label": pa.array(np.arange(len(rows)) % 1000, pa.int64())})
    pq.write_table(table, path, row_group_size=512)
    return total


def fio_write(path: Path, gib: float) -> float:
    path.unlink(missing_ok=True)
    out = subprocess.run(["fio", "--name=pack", f"--filename={path}", "--rw=write", "--bs=1M",
                          "--direct=1", "--ioengine=io_uring", f"--size={int(gib * 1024)}M",
                          "--iodepth=8", "--end_fsync=1", "--output-format=json"],
                         check=True, capture_output=True, text=True)
    path.unlink()
    return json.loads(out.stdout)["jobs"][0]["write"]["bw_bytes"] / 1e9


def sluice_pack(src: Path, dst: Path, payload: int) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    # What the `sluice` command of the wheel runs (its console script calls sluice._cli:main).
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sluice._cli", "pack", str(src), "-o", str(dst),
                    "--json"], check=True, capture_output=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return payload / seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/arrow-bench"))
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold-source", action="store_true")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    src = args.dir / f"images-{args.gib:g}g.parquet"
    if not src.exists():
        make_source(src, args.gib)
    payload = row_bytes(src)
    results: dict[str, list[float]] = {"fio write": [], "sluice pack": []}
    for _ in range(args.rounds):
        for name, fn in [("fio write", lambda: fio_write(args.dir / "fio.dat", args.gib)),
                         ("sluice pack", lambda: sluice_pack(src, args.dir / "packed", payload))]:
            drop_caches()
            if not args.cold_source:
                with open(src, "rb") as f:
                    while f.read(16 << 20):
                        pass
            # The command's own files (Python, pyarrow's libraries) cached, as on a machine
            # that ran Python before: the drop above would otherwise add their reads.
            subprocess.run([sys.executable, "-c", "import sluice._arrow, pyarrow.parquet"],
                           check=True)
            results[name].append(fn())
    medians = {k: statistics.median(v) for k, v in results.items()}
    for k, v in results.items():
        print(f"{k:12s} {medians[k]:.3f} GB/s  ({', '.join(f'{x:.3f}' for x in v)})")
    print(f"sluice pack / fio write: {medians['sluice pack'] / medians['fio write']:.2f}x "
          f"({payload / 1e9:.2f} GB of row bytes, {'cold' if args.cold_source else 'warm'} source)")
    (args.dir / "results.json").write_text(json.dumps({"runs": results, "medians": medians}))


def row_bytes(src: Path) -> int:
    """Bytes of the rows' binary column (what a sample's payload is)."""
    import pyarrow.compute as pc

    column = pq.read_table(src, columns=["jpg"]).column(0)
    return int(pc.sum(pc.binary_length(column)).as_py())  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
