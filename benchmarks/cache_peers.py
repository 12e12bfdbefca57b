#!/usr/bin/env python3
"""Object-store loaders with a bounded local cache: mosaicml-streaming and LitData over S3.

Each tool reads the same synthetic dataset from an S3-compatible server (moto on loopback, which
the caller starts and stops), with a local cache limited to half of the dataset's bytes, for
several shuffled epochs. sluice is measured on the identical setup by its own benchmark.

  N samples, each one field of SIZE bytes; sample i = numpy.random.default_rng(i).integers(
  0, 256, SIZE, dtype=uint8). Cache capacity = N*SIZE // 2. Batch size 64, shuffle on (each
  tool's default shuffle algorithm, seed 0), a torch DataLoader with --workers workers.

  streaming  mosaicml-streaming StreamingDataset(remote='s3://peers/mds', local=<fresh dir>,
             shuffle=True, shuffle_seed=0, batch_size=64, cache_limit=<half>) in a torch
             DataLoader. Shards: MDSWriter, columns {'data': 'bytes'}, size_limit 8 MiB.
             Endpoint: S3_ENDPOINT_URL (streaming/base/storage/download.py).
  litdata    litdata.StreamingDataset('s3://peers/litdata', shuffle=True, seed=0,
             max_cache_size=<half>, cache_dir=<fresh dir>, storage_options={'endpoint_url': ...})
             in litdata.StreamingDataLoader. Chunks: litdata.optimize(..., chunk_bytes=8 MiB),
             each item {'data': bytes}.

Both formats are written locally, then uploaded with boto3 to bucket `peers` under `mds/` and
`litdata/` (skipped when meta/<tool>.json on the server says that N and SIZE are already there).

Every (tool, workers) run is a fresh child process. Timing: the clock starts when the first
epoch's iterator is created and stops at the end of the last epoch; samples/s = N*epochs/time.
Dataset construction (which fetches the index) is timed separately. Every sample's bytes are
touched (the sum of its first byte), every sample is identified by its first 8 bytes and must be
delivered exactly once per epoch, and 1 in 64 samples is compared in full.

Bytes from the server, per epoch (neither tool counts its own fetches):
  fetched_bytes / fetched_responses  S3 response bodies (GETs; s3transfer splits objects over 8 MiB
                                   into ranged GETs) read through boto3 (both tools fetch with
                                   boto3; counted in the main process and the forked workers).
  lo_tx_bytes                      growth of /sys/class/net/lo/statistics/tx_bytes: everything
                                   sent over loopback (responses, requests, any other loopback
                                   traffic on the machine), a cross-check.
  moto_wchar (with --moto-pid)     growth of wchar in /proc/PID/io. Linux counts write() there
                                   but not send() on sockets, which is how the server answers, so
                                   this is only its access log; it is kept for the record.

  .venv-bench/bin/python benchmarks/cache_peers.py --endpoint http://127.0.0.1:5055 \\
      --n 8192 --size 65536 --epochs 3 --workers 0,1,2 --tools streaming,litdata \\
      --moto-pid PID --json OUT.json
"""

import argparse
import functools
import glob
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types

BUCKET = "peers"
PREFIX = {"streaming": "mds", "litdata": "litdata"}
CHUNK_BYTES = 8 << 20  # MDS shard size limit and LitData chunk_bytes
BATCH_SIZE = 64
SEED = 0
VERIFY_EVERY = 64  # compare 1 sample in VERIFY_EVERY in full

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_REGION", "us-east-1")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # else litdata asks pypi.org

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
from peers import import_streaming  # noqa: E402  (streaming.base without torchvision)


def sample_bytes(i, size):
    return np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8)


def sample_keys(n):
    """First 8 bytes of every sample as a little-endian uint64 (the first values of a shorter
    draw from the same generator are the same)."""
    return np.array([sample_bytes(i, 8).view("<u8")[0] for i in range(n)], dtype=np.uint64)




def s3_client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def read_wchar(pid):
    if not pid:
        return None
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return None


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


# ---------------------------------------------------------------------------------------------
# Writing and uploading


def litdata_item(i, size):
    return {"data": sample_bytes(i, size).tobytes()}


def write_mds(out, n, size):
    MDSWriter = import_streaming().MDSWriter
    with MDSWriter(out=out, columns={"data": "bytes"}, size_limit=CHUNK_BYTES) as writer:
        for i in range(n):
            writer.write({"data": sample_bytes(i, size).tobytes()})


def write_litdata(out, n, size):
    import litdata

    litdata.optimize(fn=functools.partial(litdata_item, size=size), inputs=list(range(n)),
                     output_dir=out, chunk_bytes=CHUNK_BYTES, num_workers=1,
                     start_method="fork")


def ensure_uploaded(args, tool):
    """Write TOOL's format locally and upload it, unless meta/TOOL.json says it is there."""
    client = s3_client(args.endpoint)
    try:
        client.head_bucket(Bucket=BUCKET)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=BUCKET)
    want = {"n": args.n, "size": args.size, "chunk_bytes": CHUNK_BYTES}
    meta_key = f"meta/{tool}.json"
    try:
        have = json.loads(client.get_object(Bucket=BUCKET, Key=meta_key)["Body"].read())
        if have.get("n") == args.n and have.get("size") == args.size:
            return have
    except client.exceptions.NoSuchKey:
        pass
    prefix = PREFIX[tool] + "/"
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):  # stale data of another N
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    local = tempfile.mkdtemp(prefix=f"src-{tool}-", dir=args.work)
    out = os.path.join(local, "out")
    t0 = time.perf_counter()
    (write_mds if tool == "streaming" else write_litdata)(out, args.n, args.size)
    t_write = time.perf_counter() - t0
    files, total = 0, 0
    for root, _, names in os.walk(out):
        for name in sorted(names):
            path = os.path.join(root, name)
            key = prefix + os.path.relpath(path, out)
            client.upload_file(path, BUCKET, key)
            files += 1
            total += os.path.getsize(path)
    shutil.rmtree(local)
    have = {**want, "objects": files, "object_bytes": total,
            "write_s": round(t_write, 2), "upload_s": round(time.perf_counter() - t0 - t_write, 2)}
    client.put_object(Bucket=BUCKET, Key=meta_key, Body=json.dumps(have).encode())
    print(f"[{tool}] wrote and uploaded {files} objects, {total} bytes to s3://{BUCKET}/{prefix}",
          file=sys.stderr)
    return have


# ---------------------------------------------------------------------------------------------
# Loaders (in the child process)


def collate_samples(samples):
    """Every sample is {'data': bytes}: one uint8 tensor of shape [batch, SIZE]."""
    import torch

    out = np.empty((len(samples), len(samples[0]["data"])), dtype=np.uint8)
    for row, sample in zip(out, samples):
        row[:] = np.frombuffer(sample["data"], dtype=np.uint8)
    return torch.from_numpy(out)


def make_streaming(args, cache_dir, cache_limit):
    streaming = import_streaming()
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    os.environ["S3_ENDPOINT_URL"] = args.endpoint
    clean_stale_shared_memory()
    dataset = streaming.StreamingDataset(remote=f"s3://{BUCKET}/{PREFIX['streaming']}",
                                         local=cache_dir, shuffle=True, shuffle_seed=SEED,
                                         batch_size=BATCH_SIZE, cache_limit=cache_limit)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=args.child_workers,
                        collate_fn=collate_samples)
    notes = (f"StreamingDataset(remote=s3://{BUCKET}/mds, shuffle=True, shuffle_algo="
             f"{dataset.shuffle_algo} (default), shuffle_seed={SEED}, batch_size={BATCH_SIZE}, "
             f"cache_limit={cache_limit}); torch DataLoader num_workers={args.child_workers}")
    return loader, notes


def make_litdata(args, cache_dir, cache_limit):
    import litdata

    dataset = litdata.StreamingDataset(f"s3://{BUCKET}/{PREFIX['litdata']}", cache_dir=cache_dir,
                                       shuffle=True, seed=SEED, max_cache_size=cache_limit,
                                       storage_options={"endpoint_url": args.endpoint})
    loader = litdata.StreamingDataLoader(dataset, batch_size=BATCH_SIZE,
                                         num_workers=args.child_workers,
                                         collate_fn=collate_samples)
    notes = (f"litdata.StreamingDataset(s3://{BUCKET}/litdata, shuffle=True, seed={SEED}, "
             f"max_cache_size={cache_limit}); StreamingDataLoader num_workers="
             f"{args.child_workers}")
    return loader, notes


class CachePeak:
    """Samples the cache directory's size every 0.1 s (on a thread, so it costs the loader
    little; os.walk of a few dozen files)."""

    def __init__(self, path):
        self.path, self.peak, self.stop = path, 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.wait(0.1):
            self.peak = max(self.peak, dir_bytes(self.path))

    def close(self):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, dir_bytes(self.path))
        return self.peak


def child(args):
    import faulthandler

    import torch

    torch.set_num_threads(1)
    tool, workers = args.child_tool, args.child_workers
    n, size = args.n, args.size
    cache_limit = n * size // 2
    keys = sample_keys(n)
    order = np.argsort(keys)
    sorted_keys = keys[order]
    assert len(np.unique(keys)) == n, "sample keys collide"
    verify = {i: sample_bytes(i, size) for i in range(0, n, VERIFY_EVERY)}
    cache_dir = tempfile.mkdtemp(prefix=f"cache-{tool}-w{workers}-", dir=args.work)

    result = {"tool": tool, "workers": workers, "n": n, "size": size, "epochs": args.epochs,
              "batch_size": BATCH_SIZE, "cache_limit": cache_limit, "status": "running"}
    epochs = []
    state = {"t_start": None, "last": time.perf_counter(), "current": None, "checksum": 0}
    lock = threading.Lock()

    def finish(status):
        """Fill `result` from what has been read so far (also after a stall or the time cap)."""
        with lock:
            done = list(epochs) + ([state["current"]] if state["current"] else [])
            t = time.perf_counter() - state["t_start"] if state["t_start"] else 0.0
            samples = sum(e["samples"] for e in done)
            result.update({
                "status": status, "samples": samples, "seconds": round(t, 3),
                "samples_per_s": round(samples / t, 1) if t else 0.0,
                "bytes_per_s": round(samples * size / t) if t else 0,
                "epoch_details": done, "cache_peak_bytes": peak.close(),
                "every_sample_once_per_epoch": status == "ok" and all(
                    e["missing"] == 0 and e["repeated"] == 0 and e["unknown"] == 0
                    and e["content_mismatch"] == 0 and e["samples"] == n for e in done),
                "checksum": state["checksum"],
            })
        return result

    def watchdog():
        while True:
            time.sleep(1)
            idle = time.perf_counter() - state["last"]
            if idle > args.stall:
                print(f"[{tool} w={workers}] STALLED: no batch for {idle:.0f} s; threads:",
                      file=sys.stderr)
                faulthandler.dump_traceback(file=sys.stderr)
                finish(f"stalled: no batch for {args.stall} s")
                print(json.dumps(result), flush=True)
                shutil.rmtree(cache_dir, ignore_errors=True)
                os._exit(3)  # DataLoader workers exit when they see their parent gone

    count_boto3_reads()
    s0 = server_counters(args)
    t0 = time.perf_counter()
    loader, result["notes"] = (make_streaming if tool == "streaming" else make_litdata)(
        args, cache_dir, cache_limit)
    result["build_s"] = round(time.perf_counter() - t0, 3)
    result["build_server"] = counters_delta(s0, server_counters(args))
    peak = CachePeak(cache_dir)
    state["last"] = time.perf_counter()
    threading.Thread(target=watchdog, daemon=True).start()

    status = "ok"
    state["t_start"] = time.perf_counter()
    for epoch in range(args.epochs):
        before = server_counters(args)
        te = time.perf_counter()
        counts = np.zeros(n, dtype=np.int64)
        cur = {"epoch": epoch, "seconds": 0.0, "samples": 0, "batches": 0, "missing": n,
               "repeated": 0, "unknown": 0, "content_mismatch": 0, "complete": False}
        state["current"] = cur
        for batch in loader:  # the iterator is created here: the clock is already running
            assert batch.dtype == torch.uint8 and batch.shape[1] == size, batch.shape
            arr = batch.numpy()
            k = np.ascontiguousarray(arr[:, :8]).view("<u8")[:, 0]
            pos = np.searchsorted(sorted_keys, k)
            pos[pos >= n] = 0
            found = sorted_keys[pos] == k
            idx = order[pos[found]]
            np.add.at(counts, idx, 1)
            bad = 0
            for row, i in zip(np.flatnonzero(found), idx):
                if i % VERIFY_EVERY == 0 and not np.array_equal(arr[row], verify[i]):
                    bad += 1
            with lock:
                state["checksum"] += int(arr[:, 0].sum(dtype=np.int64))  # touch every sample
                cur["batches"] += 1
                cur["samples"] += len(arr)
                cur["unknown"] += int((~found).sum())
                cur["content_mismatch"] += bad
                cur["missing"] = int((counts == 0).sum())
                cur["repeated"] = int((counts > 1).sum())
                now = time.perf_counter()
                cur["seconds"] = round(now - te, 3)
                state["last"] = now
            if args.max_seconds and now - state["t_start"] > args.max_seconds:
                status = f"cut: over --max-seconds {args.max_seconds} s"
                break
        with lock:
            cur["seconds"] = round(time.perf_counter() - te, 3)
            cur["complete"] = status == "ok"
            cur["server"] = counters_delta(before, server_counters(args))
            cur["cache_bytes_at_end"] = dir_bytes(cache_dir)
            epochs.append(cur)
            state["current"] = None
        print(f"[{tool} w={workers}] epoch {epoch}: {cur['seconds']:.2f} s, {cur['samples']} "
              f"samples, server {cur['server']}", file=sys.stderr)
        if status != "ok":
            break
    finish(status)
    del loader
    shutil.rmtree(cache_dir, ignore_errors=True)
    return result


FETCHED = None  # shared (fork-inherited) counters: [body bytes, bodies] read by boto3


def count_boto3_reads():
    """Count the response body bytes every boto3 client reads, in this process and in forked
    DataLoader workers: both tools fetch with boto3 (streaming's S3Downloader, litdata's
    S3Downloader), so this is what each tool fetched from the server."""
    global FETCHED
    import multiprocessing

    import botocore.response

    FETCHED = multiprocessing.Array("q", 2)
    body = botocore.response.StreamingBody
    init, read = body.__init__, body.read

    def counted_init(self, *a, **k):
        init(self, *a, **k)
        with FETCHED.get_lock():
            FETCHED[1] += 1

    def counted_read(self, *a, **k):
        data = read(self, *a, **k)
        if data:
            with FETCHED.get_lock():
                FETCHED[0] += len(data)
        return data

    body.__init__, body.read = counted_init, counted_read


def server_counters(args):
    """lo_tx_bytes: bytes sent over the loopback interface (the server's responses, plus the
    requests and any other loopback traffic); moto_wchar: the server's write() bytes, which do
    NOT include socket send() calls (so it is mostly its access log)."""
    out = {}
    try:
        with open("/sys/class/net/lo/statistics/tx_bytes") as f:
            out["lo_tx_bytes"] = int(f.read())
    except OSError:
        pass
    if args.moto_pid:
        out["moto_wchar"] = read_wchar(args.moto_pid)
    if FETCHED is not None:
        with FETCHED.get_lock():
            out["fetched_bytes"], out["fetched_responses"] = FETCHED[0], FETCHED[1]
    return out


def counters_delta(a, b):
    return {k: b[k] - a[k] for k in a if k in b and a[k] is not None and b[k] is not None}


# ---------------------------------------------------------------------------------------------


def versions():
    out = {"python": sys.version.split()[0]}
    for name in ["torch", "numpy", "mosaicml-streaming", "litdata", "boto3", "moto"]:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def print_table(runs):
    head = (f"{'tool':<10} {'workers':>7} {'samples/s':>10} {'MiB/s':>7} {'epoch s':>22} "
            f"{'fetched MiB/epoch':>20} {'peak cache MiB':>14} {'check':>5}  status")
    print(head)
    print("-" * len(head))
    for r in runs:
        if "epoch_details" not in r:
            print(f"{r['tool']:<10} {r['workers']:>7} ERROR: {r.get('error', r.get('status'))}")
            continue
        ep = " ".join(f"{e['seconds']:.2f}" + ("" if e.get("complete") else "*")
                      for e in r["epoch_details"])
        sb = " ".join(f"{e['server']['fetched_bytes'] / 2**20:.0f}"
                      if "fetched_bytes" in e.get("server", {}) else "-"
                      for e in r["epoch_details"])
        print(f"{r['tool']:<10} {r['workers']:>7} {r['samples_per_s']:>10.0f} "
              f"{r['bytes_per_s'] / 2**20:>7.1f} {ep:>22} {sb:>20} "
              f"{r['cache_peak_bytes'] / 2**20:>14.0f} "
              f"{'ok' if r['every_sample_once_per_epoch'] else 'NO':>5}  {r['status']}")
    print("(* = epoch not finished: the run stalled or was cut; fetched = S3 response body "
          "bytes the tool read, counted in boto3)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", required=True, help="S3 endpoint, e.g. http://127.0.0.1:5055")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--size", type=int, default=65536)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--tools", default="streaming,litdata")
    p.add_argument("--moto-pid", type=int, default=None,
                   help="server pid: also report the growth of /proc/PID/io wchar (its log writes only)")
    p.add_argument("--work", default="/var/tmp/cache-peers",
                   help="local scratch (format writing, caches); each run's cache is removed")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="stop a run after this many seconds of reading and report what it read "
                        "(0: no limit)")
    p.add_argument("--stall", type=float, default=120,
                   help="give up on a run when no batch has come for this many seconds")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed for one child")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child-tool", help=argparse.SUPPRESS)
    p.add_argument("--child-workers", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)

    if args.child_tool:
        print(json.dumps(child(args)))
        return

    tools = [t for t in args.tools.split(",") if t]
    for tool in tools:
        if tool not in PREFIX:
            p.error(f"unknown tool {tool!r}")
    workers = [int(w) for w in args.workers.split(",")]
    datasets = {tool: ensure_uploaded(args, tool) for tool in tools}

    runs = []
    for tool in tools:
        for w in workers:
            cmd = [sys.executable, os.path.abspath(__file__), "--endpoint", args.endpoint,
                   "--n", str(args.n), "--size", str(args.size), "--epochs", str(args.epochs),
                   "--work", args.work, "--child-tool", tool, "--child-workers", str(w),
                   "--stall", str(args.stall), "--max-seconds", str(args.max_seconds)]
            if args.moto_pid:
                cmd += ["--moto-pid", str(args.moto_pid)]
            try:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                                      timeout=args.timeout)
                lines = proc.stdout.strip().splitlines()
                if not lines:
                    raise RuntimeError(f"exit status {proc.returncode}, no result")
                runs.append(json.loads(lines[-1]))  # a stalled run prints a partial result
            except (subprocess.TimeoutExpired, RuntimeError, json.JSONDecodeError) as e:
                runs.append({"tool": tool, "workers": w, "error": str(e)})
            # a cut or stalled child can leave a download thread writing after its own cleanup
            for path in glob.glob(os.path.join(args.work, f"cache-{tool}-w{w}-*")):
                shutil.rmtree(path, ignore_errors=True)
            print(json.dumps(runs[-1]), file=sys.stderr)

    print_table(runs)
    if args.json:
        result = {"config": {"endpoint": args.endpoint, "n": args.n, "size": args.size,
                             "dataset_bytes": args.n * args.size,
                             "cache_limit": args.n * args.size // 2, "epochs": args.epochs,
                             "batch_size": BATCH_SIZE, "seed": SEED,
                             "chunk_bytes": CHUNK_BYTES, "moto_pid": args.moto_pid,
                             "cpus": os.cpu_count()},
                  "versions": versions(), "datasets": datasets, "runs": runs}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
