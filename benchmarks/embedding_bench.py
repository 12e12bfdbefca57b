"""Embedding rows from disk: sluice.EmbeddingTable against fio, NumPy memmap fancy indexing
and RocksDB multi_get (rocksdict, rows stored as values) on the same rows, in one run; then
the rows a cache of 10% of a table reads from disk on a Zipf stream: Belady's minimum
(offline), the clairvoyant table told the stream, and LRU.

memmap is measured with `madvise(MADV_RANDOM)`, as a table larger than memory must be read:
with the default readahead the first batch of random rows pulls the whole file into the page
cache (here the file fits; a table of hundreds of GB does not) and the rest reads memory.

    sudo PYTHONPATH=build/python .venv-bench/bin/python benchmarks/embedding_bench.py \\
        --dir /var/tmp/emb-bench [--rows 2000000 --rounds 3 --seconds 4]

Root: the page cache is dropped before every cold run. Each round runs every contender once,
alternating; medians are printed and written to DIR/results.json. Rows are 128 x float32
(512 bytes, 8 to a 4 KiB page), ids uniform over the table for the cold and warm runs.
"""

from __future__ import annotations

import argparse
import heapq
import json
import mmap
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import sluice

DIM = 128
BATCH = 16384  # ids per gather / multi_get / fancy index


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fio(path: Path, depth: int, seconds: float) -> float:
    out = subprocess.run(["fio", "--name=emb", f"--filename={path}", "--rw=randread", "--bs=4k",
                          "--direct=1", "--ioengine=io_uring", f"--iodepth={depth}",
                          f"--runtime={seconds}", "--time_based", "--output-format=json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)["jobs"][0]["read"]["iops"]


def batch(rows: int, seed: int, k: int) -> np.ndarray:
    return np.random.default_rng((seed, k)).integers(0, rows, BATCH)


def rate(fn, rows: int, seed: int, seconds: float, count: int = 1 << 30) -> tuple[float, int]:
    """Rows per second over as many batches as fit in `seconds` (at most `count`); and how
    many batches ran."""
    done, start = 0, time.perf_counter()
    while done < count:
        fn(batch(rows, seed, done))
        done += 1
        if time.perf_counter() - start > seconds:
            break
    return done * BATCH / (time.perf_counter() - start), done


def setup(d: Path, rows: int) -> tuple[Path, Path]:
    table = d / "table"
    if not table.exists():
        sluice.EmbeddingTable.create(table, rows=rows, dim=DIM, init="normal:0.01", seed=1)
    db_path = d / "rocksdb"
    if not db_path.exists():
        from rocksdict import Rdict, WriteBatch

        t = sluice.EmbeddingTable(table)
        db = Rdict(str(db_path))
        for lo in range(0, rows, 65536):
            ids = np.arange(lo, min(rows, lo + 65536))
            got = t.gather(ids)
            wb = WriteBatch()
            for i, row in zip(ids.tolist(), got):
                wb.put(i, row.tobytes())
            db.write(wb)
        db.close()
        t.close()
    return table, db_path


def belady(stream: list[np.ndarray], capacity: int) -> int:
    """Rows read from disk by Belady's MIN with bypass, a batch's rows gathered at once."""
    uses: dict[int, list[int]] = {}
    for b, ids in enumerate(stream):
        for i in ids.tolist():
            uses.setdefault(i, []).append(b)
    at = {i: 0 for i in uses}
    key: dict[int, float] = {}
    heap: list[tuple[float, int]] = []  # (-next use, id), stale entries skipped
    misses = 0
    inf = float("inf")
    for ids in stream:
        ids = ids.tolist()
        for i in ids:
            at[i] += 1
        nxt = {i: (uses[i][at[i]] if at[i] < len(uses[i]) else inf) for i in ids}
        missed = []
        for i in ids:
            if i in key:
                key[i] = nxt[i]
                heapq.heappush(heap, (-nxt[i], i))
            else:
                missed.append(i)
        for i in missed:
            misses += 1
            if len(key) == capacity:
                while True:
                    far, j = heap[0]
                    if key.get(j) == -far:
                        break
                    heapq.heappop(heap)
                if nxt[i] >= -far:
                    continue
                heapq.heappop(heap)
                del key[j]
            key[i] = nxt[i]
            heapq.heappush(heap, (-nxt[i], i))
    return misses


def zipf_stream(rows: int, n: int, per: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(rows)  # hot ids spread over the table, as hashed ids are
    out = []
    for _ in range(n):
        ranks = rng.zipf(1.05, per * 2)
        ranks = ranks[ranks <= rows][:per] - 1
        out.append(np.unique(perm[ranks]))
    return out


def lookahead(d: Path, step_ms: float, steps: int, batch_size: int,
              mode: str = "ahead") -> dict[str, float]:
    """The Loader with embeddings feeding a synthetic training step (a sleep of `step_ms`,
    as a step whose time is on the GPU, then a sparse update of the batch's rows and a flush
    every 50 steps): the share of the loop's time spent waiting for the next batch, over the
    first `steps` steps from a cold table (rows come from disk while the cache fills) and over
    the `steps` after them. mode "plain": the plain Loader, the loop gathering each batch's
    rows itself (np.unique, then table.gather, counted as waiting); "bare": the plain Loader
    and the sleep alone (no rows, no update), the loader's own share. The update's arithmetic
    is numpy's in every mode: torch's CPU kernels spin their OpenMP threads after each op,
    which on two cores takes the loader's CPU (a GPU step would not)."""
    ahead = mode == "ahead"
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from train_recsys import DIM as RDIM, FIELDS, make_click_log

    data, table_path, vocab = d / "clicks", d / "clicks-table", 250_000
    if not data.exists():
        make_click_log(data, 200_000, vocab, seed=3)
    shutil.rmtree(table_path, ignore_errors=True)
    table = sluice.EmbeddingTable.create(table_path, rows=FIELDS * vocab, dim=RDIM,
                                         init="normal:0.01", cache_bytes=64 << 20)
    drop_caches()
    loader = sluice.Loader({"dataset": str(data), "batch_size": batch_size, "seed": 0},
                           embeddings={"sparse": table} if ahead else None)
    out = {}
    it = iter(loader)
    for phase in ("cold", "warm"):
        waited, done, start = 0.0, 0, time.perf_counter()
        while done < steps:
            t = time.perf_counter()
            b = next(it, None)
            waited += time.perf_counter() - t
            if b is None:
                loader.set_epoch(loader.epoch + 1)
                it = iter(loader)
                continue
            if mode == "plain":
                unique, inverse = np.unique(b["sparse"].numpy(), return_inverse=True)
                b["sparse_unique"], b["sparse_rows"] = unique, table.gather(unique)
                waited += time.perf_counter() - t
            time.sleep(step_ms / 1000)
            done += 1
            if mode == "bare":
                continue
            rows = b["sparse_rows"]
            table.update(b["sparse_unique"], np.asarray(rows.numpy() if hasattr(rows, "numpy") else rows) * 0.99)
            if done % 50 == 0:
                table.flush()
        total = time.perf_counter() - start
        out[f"{phase}_wait_fraction"] = waited / total
        out[f"{phase}_steps_per_s"] = done / total
    out["rows_from_disk"] = table.stats()["rows_from_disk"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--zipf-rows", type=int, default=200_000)
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--parts", default="gather,zipf,lookahead")
    ap.add_argument("--zipf-batches", type=int, default=300)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    table_path, db_path = setup(args.dir, args.rows)
    shard = table_path / "rows-00000.bin"
    from rocksdict import AccessType, Rdict

    rows: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)
        print(f"  {name:44s} {value:14,.0f}", flush=True)

    parts = args.parts.split(",")
    for r in range(args.rounds if "gather" in parts else 0):
        print(f"round {r}", flush=True)
        seed, n = 100 + r, args.rows
        note("fio 4k randread IOPS, best of QD 32/64/128",
             max(fio(shard, qd, args.seconds) for qd in (32, 64, 128)))
        drop_caches()
        t = sluice.EmbeddingTable(table_path)
        speed, _ = rate(t.gather, n, seed, args.seconds)
        note("sluice gather, cold (rows/s)", speed)
        t.close()
        drop_caches()
        mm = np.memmap(shard, dtype=np.float32, mode="r", shape=(args.rows, DIM))
        mm._mmap.madvise(mmap.MADV_RANDOM)
        speed, _ = rate(lambda b: np.asarray(mm[b]), n, seed, args.seconds)
        note("memmap fancy index, cold (rows/s)", speed)
        del mm
        drop_caches()
        db = Rdict(str(db_path), access_type=AccessType.read_only())
        speed, _ = rate(lambda b: db[b.tolist()], n, seed, args.seconds)
        note("rocksdb multi_get, cold (rows/s)", speed)
        db.close()
        # Warm: the same ids twice, the second pass timed: in the page cache (RocksDB: also its
        # block cache); sluice with a cache the size of the table.
        db = Rdict(str(db_path), access_type=AccessType.read_only())
        _, n_db = rate(lambda b: db[b.tolist()], n, seed, args.seconds)
        speed, _ = rate(lambda b: db[b.tolist()], n, seed, 1e9, n_db)
        note("rocksdb multi_get, warm (rows/s)", speed)
        db.close()
        t = sluice.EmbeddingTable(table_path, cache_bytes=args.rows * DIM * 4, policy="lru")
        _, n_t = rate(t.gather, n, seed, args.seconds)
        speed, _ = rate(t.gather, n, seed, 1e9, n_t)
        note("sluice gather, warm (rows/s)", speed)
        t.close()
    results: dict = {"rows": rows}
    if "gather" in parts:
        med = {k: statistics.median(v) for k, v in rows.items()}
        results["medians"] = med
        print(f"\n{args.rows} rows x {DIM} float32, batches of {BATCH} uniform ids, "
              f"{args.rounds} rounds, medians")
        for k, v in med.items():
            print(f"{k:48s} {v:14,.0f}")
        cold = med["sluice gather, cold (rows/s)"]
        print(f"sluice cold / fio IOPS {cold / med['fio 4k randread IOPS, best of QD 32/64/128']:.2f}; "
              f"/ memmap cold {cold / med['memmap fancy index, cold (rows/s)']:.1f}x; / rocksdb "
              f"cold {cold / med['rocksdb multi_get, cold (rows/s)']:.1f}x; sluice warm / rocksdb "
              f"warm {med['sluice gather, warm (rows/s)'] / med['rocksdb multi_get, warm (rows/s)']:.1f}x")
    if "zipf" in parts:
        # The cache on a Zipf stream over a table of its own: rows read from disk, not timed.
        zipf_path = args.dir / "zipf-table"
        if not zipf_path.exists():
            sluice.EmbeddingTable.create(zipf_path, rows=args.zipf_rows, dim=DIM, seed=2)
        stream = zipf_stream(args.zipf_rows, args.zipf_batches, BATCH // 4, 7)
        capacity = args.zipf_rows // 10
        minimum = belady(stream, capacity)
        disk = {}
        for policy in ("clairvoyant", "lru"):
            t = sluice.EmbeddingTable(zipf_path, cache_bytes=capacity * DIM * 4, policy=policy)
            if policy == "clairvoyant":
                for b in stream:
                    t.feed_future(b)
            for b in stream:
                t.gather(b)
            disk[policy] = t.stats()["rows_from_disk"]
            t.close()
        results["zipf"] = {"belady": minimum, **disk}
        requests = sum(len(b) for b in stream)
        print(f"Zipf(1.05) stream: {len(stream)} batches, {requests} row requests, "
              f"{len({i for b in stream for i in b.tolist()})} distinct rows; cache of {capacity} "
              f"rows (10% of {args.zipf_rows}): rows from disk Belady's minimum {minimum}, "
              f"clairvoyant {disk['clairvoyant']} ({disk['clairvoyant'] / minimum:.3f}x), "
              f"LRU {disk['lru']} ({disk['lru'] / minimum:.3f}x)")
    if "lookahead" in parts:
        runs, plain, bare = [], [], []
        for _ in range(args.rounds):  # alternating
            runs.append(lookahead(args.dir, args.step_ms, 200, 2048))
            plain.append(lookahead(args.dir, args.step_ms, 200, 2048, mode="plain"))
            bare.append(lookahead(args.dir, args.step_ms, 200, 2048, mode="bare"))
        results["lookahead"], results["gather_in_the_loop"] = runs, plain
        results["loader_alone"] = bare
        for phase in ("cold", "warm"):
            waits = [r[f"{phase}_wait_fraction"] for r in bare]
            print(f"plain Loader alone (no rows, no update), {phase}: consumer wait "
                  f"{statistics.median(waits):.3f} ({', '.join(f'{w:.3f}' for w in waits)})")
            waits = [r[f"{phase}_wait_fraction"] for r in plain]
            print(f"plain Loader, the loop gathers, {phase} table: consumer wait "
                  f"{statistics.median(waits):.3f} ({', '.join(f'{w:.3f}' for w in waits)}), "
                  f"{statistics.median(r[f'{phase}_steps_per_s'] for r in plain):.1f} steps/s")
            waits = [r[f"{phase}_wait_fraction"] for r in runs]
            print(f"Loader with embeddings, {phase} table ({'the first' if phase == 'cold' else 'the next'} "
                  f"200 steps), a {args.step_ms:g} ms step + update, batch 2048: consumer wait "
                  f"{statistics.median(waits):.3f} of the loop ({', '.join(f'{w:.3f}' for w in waits)}), "
                  f"{statistics.median(r[f'{phase}_steps_per_s'] for r in runs):.1f} steps/s")
    (args.dir / "results.json").write_text(json.dumps(results, indent=1))

if __name__ == "__main__":
    main()
