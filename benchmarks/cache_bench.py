"""The node cache against an object store: sluice reading s3:// from moto's S3-compatible server
on loopback, with a cache of half the dataset, three epochs of global shuffle.

Measures, in one run:
- bytes fetched from the source per epoch for cache.policy clairvoyant and lru, against
  Belady's optimum computed offline here for the same order (`sluice order`, epochs 0..E-1);
- samples/s of `sluice bench` (the CLI, default config but for the cache) for both policies,
  and of the peers (benchmarks/cache_peers.py: MosaicML StreamingDataset with cache_limit,
  LitData with max_cache_size) reading the same sample bytes from the same server with the same
  cache size, when --peers is given;
- everything cached (a second process on a filled cache directory) against the same dataset
  read from local disk.

With --ranks 1,2,4 it measures instead the ranks of one node (torchrun --nproc-per-node R,
each rank a sluice.Loader reading the epochs) over one cache.dir, against each rank with a
cache.dir of its own (what ranks got before the node's cache was shared), for the default
capacity (all fits) and half the dataset: the bytes all ranks fetched from the source.

  .venv/bin/python benchmarks/cache_bench.py --sluice build/sluice --work /var/tmp/cache-bench \
      [--n 8192 --size 65536 --epochs 3 --rounds 2] [--peers .venv-bench/bin/python]
  .venv/bin/python benchmarks/cache_bench.py --sluice build/sluice --work /var/tmp/cache-ranks \
      --ranks 1,2,4 --n 3000 --size 10000 --rounds 2

Starts moto_server (next to this Python) on a free loopback port and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample(i: int, size: int) -> np.ndarray:
    """Sample i's bytes; benchmarks/cache_peers.py writes the same ones."""
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)


def make_dataset(path: Path, n: int, size: int) -> None:
    import sluice
    if (path / "manifest.sluice").exists():
        if len(sluice.Dataset(str(path))) == n:
            return
        shutil.rmtree(path)
    with sluice.DatasetWriter(str(path), [{"name": "data", "dtype": "uint8", "shape": [size]}],
                              shard_bytes=8 << 20) as w:
        for i in range(n):
            w.add([sample(i, size)])


def upload(client, directory: Path, bucket: str, prefix: str) -> None:
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for f in sorted(directory.iterdir()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")


def belady(seq: list[int], capacity: int) -> int:
    """Fetches of Belady's MIN for unit-size items: evict the one used furthest ahead; an item
    used later than everything it would replace is read but not kept."""
    import heapq
    never = len(seq) + 1
    nxt = [never] * len(seq)
    last: dict[int, int] = {}
    for t in range(len(seq) - 1, -1, -1):
        nxt[t] = last.get(seq[t], never)
        last[seq[t]] = t
    cached: dict[int, int] = {}  # item -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, item), lazily stale
    fetches = 0
    for t, s in enumerate(seq):
        if s not in cached:
            fetches += 1
            if len(cached) >= capacity:
                while -heap[0][0] != cached.get(heap[0][1], -1):
                    heapq.heappop(heap)
                if -heap[0][0] <= nxt[t]:
                    continue
                del cached[heapq.heappop(heap)[1]]
        cached[s] = nxt[t]
        heapq.heappush(heap, (-nxt[t], s))
    return fetches


def bench(sluice_cli: str, config: Path, epochs: int) -> dict:
    out = subprocess.run([sluice_cli, "bench", str(config), "--epochs", str(epochs), "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def write_config(path: Path, dataset: str, cache: dict | None, batch: int) -> Path:
    lines = [f"dataset: {{path: \"{dataset}\"}}", f"batch_size: {batch}", "seed: 0"]
    if cache:
        lines.append("cache: {" + ", ".join(f"{k}: {v}" for k, v in cache.items()) + "}")
    path.write_text("\n".join(lines) + "\n")
    return path


def rank_worker(config: str, out: Path, epochs: int, own: bool) -> None:
    """One torchrun rank: reads `epochs` epochs and writes its stats to out/rank-N.json. `own`:
    a cache directory of its own under the configured one."""
    import sluice
    cfg = json.loads(config)
    rank = int(os.environ["RANK"])
    if own:
        cfg["cache"]["dir"] += f"/rank-{rank}"
    loader = sluice.Loader(cfg)
    start = time.monotonic()
    for _ in range(epochs):
        for _ in loader:
            pass
    stats = dict(loader.stats(), seconds=time.monotonic() - start)
    (out / f"rank-{rank}.json").write_text(json.dumps(stats))


def ranks_bench(args, url: str, total: int) -> None:
    """Source bytes of R ranks on one node: one shared cache against one per rank."""
    torchrun = Path(sys.executable).parent / "torchrun"
    rows: dict[tuple, list[int]] = {}
    for r in range(args.rounds):
        for ranks in [int(x) for x in args.ranks.split(",")]:
            for capacity, fetch in [(c, f) for c in (None, total // 2)
                                    for f in [None] + [x for x in args.fetch_sizes.split(",") if x]]:
                for own in (False, True):
                    cache_dir = args.work / "cache"
                    shutil.rmtree(cache_dir, ignore_errors=True)
                    out = args.work / "ranks-out"
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir()
                    cache = {"dir": str(cache_dir)}
                    if capacity:
                        cache["capacity"] = capacity // (ranks if own else 1)
                    if fetch is not None:
                        cache["fetch_size"] = fetch
                    cfg = {"dataset": {"path": url}, "batch_size": args.batch, "seed": 0,
                           "cache": cache}
                    subprocess.run([str(torchrun), "--standalone", f"--nproc-per-node={ranks}",
                                    __file__, "--rank-worker", json.dumps(cfg), "--work", str(out),
                                    "--epochs", str(args.epochs)] + (["--own"] if own else []),
                                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    stats = [json.loads(f.read_text()) for f in sorted(out.glob("rank-*.json"))]
                    assert len(stats) == ranks
                    key = (ranks, capacity, fetch, own)
                    rows.setdefault(key, []).append(sum(s["source_bytes"] for s in stats))
        print(f"round {r} done", file=sys.stderr)
    print(f"dataset: {args.n} samples x {args.size} B = {total / 2**20:.1f} MiB at {url}; "
          f"{args.epochs} epochs, batch {args.batch}, {args.rounds} rounds (medians); "
          "source MiB, all ranks together")
    print(f"{'ranks':>5} {'capacity':>14} {'fetch_size':>10} {'shared':>8} {'per rank':>9} "
          f"{'ratio':>6}")
    for (ranks, capacity, fetch, own), values in sorted(rows.items(), key=lambda kv: (
            kv[0][1] or 0, kv[0][2] or "", kv[0][0])):
        if own:
            continue
        shared = statistics.median(values)
        apart = statistics.median(rows[(ranks, capacity, fetch, True)])
        cap = "default (all)" if capacity is None else f"{capacity / 2**20:.1f} MiB"
        print(f"{ranks:5d} {cap:>14} {fetch or 'default':>10} {shared / 2**20:8.1f} "
              f"{apart / 2**20:9.1f} {shared / apart:6.2f}")


def main() -> None:
    if "--rank-worker" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--rank-worker", required=True)
        ap.add_argument("--work", type=Path, required=True)
        ap.add_argument("--epochs", type=int, required=True)
        ap.add_argument("--own", action="store_true")
        a = ap.parse_args()
        rank_worker(a.rank_worker, a.work, a.epochs, a.own)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--size", type=int, default=65536)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peers", help="python of the peers' venv: run benchmarks/cache_peers.py")
    ap.add_argument("--peer-workers", default="0,1,2")
    ap.add_argument("--peer-args", default="",
                    help="more arguments for cache_peers.py, e.g. \"--max-seconds 240\"")
    ap.add_argument("--fetch-sizes", default="0",
                    help="cache.fetch_size values to run beside the default, comma-separated")
    ap.add_argument("--ranks", help="measure R ranks of one node instead, e.g. 1,2,4")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    total = args.n * args.size
    capacity = total // 2

    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for _ in range(150):
            try:
                client.list_buckets()
                break
            except Exception:
                time.sleep(0.2)
        local = args.work / "local"
        make_dataset(local, args.n, args.size)
        upload(client, local, "bench", "sluice")
        url = "s3://bench/sluice"
        if args.ranks:
            ranks_bench(args, url, total)
            return

        # The order each policy sees, and Belady's fetches for it.
        cfg = write_config(args.work / "order.yaml", str(local), None, args.batch)
        seq: list[int] = []
        for e in range(args.epochs):
            out = subprocess.run([args.sluice, "order", str(cfg), "--rank", "0", "--world-size",
                                  "1", "--epoch", str(e)], check=True, capture_output=True,
                                 text=True)
            seq += [int(x) for x in out.stdout.split()]
        optimum = belady(seq, capacity // args.size) * args.size

        runs: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            variants = [("clairvoyant", None), ("lru", None)]
            variants += [("clairvoyant", f) for f in args.fetch_sizes.split(",") if f]
            variants += [("lru", f) for f in args.fetch_sizes.split(",") if f]
            for policy, fetch in variants:
                name = policy if fetch is None else f"{policy} fetch_size={fetch}"
                cache_dir = args.work / "cache"
                shutil.rmtree(cache_dir, ignore_errors=True)
                keys = {"dir": str(cache_dir), "capacity": capacity, "policy": policy}
                if fetch is not None:
                    keys["fetch_size"] = fetch
                c = write_config(args.work / "policy.yaml", url, keys, args.batch)
                runs.setdefault(name, []).append(bench(args.sluice, c, args.epochs))
            # Everything cached: a second process on the clairvoyant run's directory, with room
            # for all of it, against the same dataset on local disk.
            full = args.work / "cache-full"
            shutil.rmtree(full, ignore_errors=True)
            c = write_config(args.work / "full.yaml", url, {"dir": str(full), "capacity": 2 * total},
                             args.batch)
            bench(args.sluice, c, 1)  # fills it
            runs.setdefault("cached", []).append(bench(args.sluice, c, args.epochs))
            l = write_config(args.work / "local.yaml", str(local), None, args.batch)
            runs.setdefault("local", []).append(bench(args.sluice, l, args.epochs))
            if args.peers:
                out = args.work / f"peers-{r}.json"
                subprocess.run([args.peers, str(HERE / "cache_peers.py"), "--endpoint", endpoint,
                                "--n", str(args.n), "--size", str(args.size), "--epochs",
                                str(args.epochs), "--workers", args.peer_workers, "--json",
                                str(out), "--moto-pid", str(moto.pid)] + args.peer_args.split(),
                               check=True)
                for row in json.loads(out.read_text())["runs"]:
                    if "error" in row:
                        print(f"peer {row['tool']} workers={row['workers']}: {row['error']}",
                              file=sys.stderr)
                        continue
                    # Bytes the tool fetched, per finished epoch, as sluice's source_bytes.
                    done = [e for e in row["epoch_details"] if "fetched_bytes" in e.get("server", {})]
                    if done:
                        row["source_bytes"] = sum(e["server"]["fetched_bytes"] for e in done) \
                            * args.epochs // len(done)
                        row["source_requests"] = sum(e["server"]["fetched_responses"]
                                                     for e in done) * args.epochs // len(done)
                    runs.setdefault(f"{row['tool']} workers={row['workers']}", []).append(row)
                print(f"round {r}: peers done", file=sys.stderr)

        print(f"dataset: {args.n} samples x {args.size} B = {total / 2**20:.0f} MiB at {url}; "
              f"cache {capacity / 2**20:.0f} MiB; {args.epochs} epochs, batch {args.batch}, "
              f"{args.rounds} rounds (medians)")
        print(f"Belady's optimum: {optimum / args.epochs / 2**20:.1f} MiB fetched per epoch")
        for name, rs in runs.items():
            sps = statistics.median(r["samples_per_s"] for r in rs)
            line = f"{name:28s} {sps:9.0f} samples/s"
            if "source_bytes" in rs[0]:
                fetched = statistics.median(r["source_bytes"] for r in rs)
                line += (f"  source {fetched / args.epochs / 2**20:8.1f} MiB/epoch "
                         f"({fetched / optimum:.3f} x Belady), "
                         f"{statistics.median(r['source_requests'] for r in rs):.0f} requests")
            print(line)
        print(json.dumps({"optimum_bytes": optimum, "runs": runs}), file=open(
            args.work / "results.json", "w"))
    finally:
        moto.terminate()
        moto.wait()


if __name__ == "__main__":
    main()
