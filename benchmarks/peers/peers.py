#!/usr/bin/env python3
"""Peer data loaders for sluice's global-shuffle random-access benchmark.

Two commands:

  convert  writes one set of samples in every peer's format under WORKDIR:
             flat/  files.json + extents.npy: where each sample's bytes lie
                    (synthetic source: in flat/data.bin; sluice source: in sluice's own shards)
             mds/   mosaicml-streaming MDS shards (MDSWriter)
             tar/   webdataset tar shards (TarWriter), one member per sample: KEY.bin
             meta.json
  run      iterates one peer for --seconds and prints its throughput.

Peers:
  dataloader          torch DataLoader, map-style Dataset, os.pread of one sample per item
  statefuldataloader  torchdata StatefulDataLoader over the same Dataset
  streaming           mosaicml-streaming StreamingDataset over local MDS shards
  webdataset          webdataset pipeline over tar shards (NOT a global shuffle)

Run it with the benchmark venv: .venv-bench/bin/python benchmarks/peers/peers.py ...
"""

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import types
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data import default_collate

PEERS = ("dataloader", "statefuldataloader", "streaming", "webdataset")

# Shards of MDS and tar hold about this many bytes, but there are at least MIN_SHARDS of them
# (webdataset gives each DataLoader worker whole shards).
SHARD_BYTES = 64 << 20
MIN_SHARDS = 8

# Samples are wrapped without copying; their buffers may be read-only bytes, and the benchmark
# never writes to them, so torch's warning about non-writable buffers is noise.
warnings.filterwarnings("ignore", message="The given (NumPy array|buffer) is not writable")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def to_tensor(buf):
    """A uint8 tensor over the bytes of one sample (no copy)."""
    return torch.from_numpy(np.frombuffer(buf, dtype=np.uint8))


def collate_for(meta):
    """default_collate stacks equal-sized samples into one (batch, size) tensor; samples of
    different sizes cannot be stacked, so their batches stay lists of tensors."""
    return default_collate if meta["sample_size"] is not None else list


# ---------------------------------------------------------------------------------------------
# Sources: where convert gets its samples. Each has len(), sample(i) -> bytes and
# flat_extents() -> (files, extents) or None, where extents is an int64 array (N, 3) of
# (index into files, offset, size), i.e. the bytes the pread peers read for sample i.
# ---------------------------------------------------------------------------------------------

class SyntheticSource:
    """N samples of SIZE bytes; sample i is the little-endian uint64 i repeated (truncated)."""

    def __init__(self, n, size):
        self.n, self.size = n, size
        self.spec = f"synthetic:{n}:{size}"

    def __len__(self):
        return self.n

    def sample(self, i):
        return synthetic_sample(i, self.size)

    def flat_extents(self):
        return None  # no file holds these yet: convert writes flat/data.bin


def synthetic_sample(i, size):
    return np.full(size // 8 + 1, i, dtype="<u8").tobytes()[:size]


class SluiceSource:
    """A sluice packed dataset: sluice.Dataset(path), len(ds), ds.extent(i) -> (shard, offset,
    size). The pread peers read the sluice shard files in place, at those extents, so they read
    the very bytes (and files) that sluice reads; MDS and tar get copies of the same bytes."""

    def __init__(self, path):
        import sluice  # only this source needs the sluice package

        self.spec = f"sluice:{os.path.abspath(path)}"
        ds = sluice.Dataset(path)
        self.files = []
        file_ids = {}
        self.extents = np.empty((len(ds), 3), dtype=np.int64)
        for i in range(len(ds)):
            shard, offset, size = ds.extent(i)
            shard = os.path.abspath(os.path.join(path, shard))  # a shard path may be relative
            if shard not in file_ids:
                file_ids[shard] = len(self.files)
                self.files.append(shard)
            self.extents[i] = (file_ids[shard], offset, size)
        self._reader = PreadDataset(self.files, self.extents)

    def __len__(self):
        return len(self.extents)

    def sample(self, i):
        return self._reader.read(i)

    def flat_extents(self):
        return self.files, self.extents


def open_source(args):
    spec = f"synthetic:{args.synthetic}" if args.synthetic else args.source
    if spec.startswith("synthetic:"):
        n, size = (int(x) for x in spec[len("synthetic:"):].split(":"))
        return SyntheticSource(n, size)
    return SluiceSource(spec[len("sluice:"):] if spec.startswith("sluice:") else spec)


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------

def convert(args):
    source = open_source(args)
    work = os.path.abspath(args.out)
    n = len(source)
    if n == 0:
        sys.exit("convert: the source has no samples")
    for sub in ("flat", "mds", "tar"):
        shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
        os.makedirs(os.path.join(work, sub))

    extents = source.flat_extents()
    if extents is None:  # write flat/data.bin as we go
        files = [os.path.join(work, "flat", "data.bin")]
        flat = open(files[0], "wb")
        offsets = np.empty((n, 3), dtype=np.int64)
    else:
        files, offsets = extents
        flat = None
    mean_size = source.size if flat is not None else int(offsets[:, 2].mean())
    per_shard = max(1, min(SHARD_BYTES // max(mean_size, 1), math.ceil(n / MIN_SHARDS)))

    import webdataset as wds
    MDSWriter = import_streaming().MDSWriter
    # size_limit: per_shard samples of mean size, plus MDS's 8 bytes of per-sample overhead.
    mds = MDSWriter(out=os.path.join(work, "mds"), columns={"data": "bytes"},
                    compression=None, size_limit=per_shard * (mean_size + 8) + 4096)
    tar, tar_paths = None, []
    total, min_size, max_size = 0, None, None
    start, mtime = time.monotonic(), int(time.time())
    for i in range(n):
        data = source.sample(i)
        if flat is not None:
            offsets[i] = (0, total, len(data))
            flat.write(data)
        mds.write({"data": data})
        if i % per_shard == 0:
            if tar is not None:
                tar.close()
            tar_paths.append(os.path.join(work, "tar", f"shard-{len(tar_paths):06d}.tar"))
            # An integer mtime: TarWriter's default, the float time.time(), makes tarfile add a
            # 1 KiB PAX header to every member (webdataset 1.0.2 writes PAX, not ustar).
            tar = wds.TarWriter(tar_paths[-1], mtime=mtime)
        tar.write({"__key__": f"{i:09d}", "bin": data})
        total += len(data)
        min_size = len(data) if min_size is None else min(min_size, len(data))
        max_size = len(data) if max_size is None else max(max_size, len(data))
        if (i + 1) % 65536 == 0:
            log(f"convert: {i + 1}/{n} samples, {time.monotonic() - start:.0f} s")
    tar.close()
    mds.finish()
    if flat is not None:
        flat.close()

    np.save(os.path.join(work, "flat", "extents.npy"), offsets)
    with open(os.path.join(work, "flat", "files.json"), "w") as f:
        json.dump(files, f, indent=1)
    meta = {
        "source": source.spec,
        "num_samples": n,
        "total_bytes": total,
        "sample_size": min_size if min_size == max_size else None,  # None: sizes vary
        "min_sample_size": min_size,
        "max_sample_size": max_size,
        "samples_per_shard": per_shard,
        "mds_shards": len([p for p in os.listdir(os.path.join(work, "mds")) if p.endswith(".mds")]),
        "tar_shards": [os.path.relpath(p, work) for p in tar_paths],
        "flat_files": len(files),
    }
    with open(os.path.join(work, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(f"convert: wrote {n} samples, {total} bytes, {len(tar_paths)} tar shards, "
        f"{meta['mds_shards']} MDS shards into {work} in {time.monotonic() - start:.1f} s")
    print(json.dumps({k: v for k, v in meta.items() if k != "tar_shards"}))


# ---------------------------------------------------------------------------------------------
# The peers
# ---------------------------------------------------------------------------------------------

class PreadDataset(Dataset):
    """Map-style dataset: item i is os.pread of sample i's extent, as a uint8 tensor.
    Files are opened lazily in each process (DataLoader workers are forked)."""

    def __init__(self, files, extents):
        self.files = list(files)
        self.extents = extents
        self._fds, self._pid = None, None

    def __len__(self):
        return len(self.extents)

    def read(self, i):
        if self._pid != os.getpid():
            self._fds = [os.open(path, os.O_RDONLY) for path in self.files]
            self._pid = os.getpid()
        file_id, offset, size = self.extents[i].tolist()
        data = os.pread(self._fds[file_id], size, offset)
        if len(data) != size:
            raise IOError(f"short read of sample {i}: {len(data)} of {size} bytes")
        return data

    def __getitem__(self, i):
        return to_tensor(self.read(i))


def make_pread_loader(loader_class, work, meta, args):
    with open(os.path.join(work, "flat", "files.json")) as f:
        files = json.load(f)
    extents = np.load(os.path.join(work, "flat", "extents.npy"))
    dataset = PreadDataset(files, extents)
    loader = loader_class(dataset, batch_size=args.batch_size, shuffle=True,
                          num_workers=args.workers, collate_fn=collate_for(meta),
                          persistent_workers=True, timeout=args.timeout)
    where = files[0] if len(files) == 1 else f"{len(files)} files ({os.path.dirname(files[0])})"
    notes = (f"{loader_class.__module__}.{loader_class.__name__}, map-style Dataset, one "
             f"os.pread per sample from {where}; shuffle=True: RandomSampler, a uniform "
             f"global permutation each epoch; num_workers={args.workers}, default collate")
    return loader, notes


def import_streaming():
    """Import mosaicml-streaming's streaming.base without running streaming/__init__.py.

    That __init__ also imports streaming.vision, which imports torchvision. The only torchvision
    that accepts torch 2.13.0 (0.28.0) is a CUDA build whose C extension cannot load with the CPU
    torch of this venv, so `import streaming` fails. streaming.base (the dataset, the MDS writer
    and reader) does not use torchvision, so we register the package without its __init__.
    """
    if "streaming" not in sys.modules:
        spec = importlib.util.find_spec("streaming")
        package = types.ModuleType("streaming")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__, package.__file__ = spec, spec.origin
        sys.modules["streaming"] = package
    import streaming.base

    return streaming.base


def collate_mds(samples, collate=default_collate):
    """Streaming yields {"data": bytes} per sample; batch the bytes as uint8 tensors."""
    return collate([to_tensor(sample["data"]) for sample in samples])


def collate_mds_list(samples):
    return collate_mds(samples, collate=list)


def make_streaming_loader(work, meta, args):
    streaming = import_streaming()
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # left behind by a killed earlier run, it breaks the next one
    dataset = streaming.StreamingDataset(local=os.path.join(work, "mds"), remote=None,
                                         shuffle=True, shuffle_algo=args.shuffle_algo,
                                         batch_size=args.batch_size)
    collate = collate_mds if meta["sample_size"] is not None else collate_mds_list
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=collate, persistent_workers=True, timeout=args.timeout)
    notes = (f"mosaicml-streaming StreamingDataset over {meta['mds_shards']} local MDS shards "
             f"(remote=None), shuffle=True, shuffle_algo={args.shuffle_algo}"
             + (" (a uniform global permutation of all samples each epoch, streaming's most "
                "random shuffle; its default py1e only shuffles within blocks)"
                if args.shuffle_algo == "naive" else "")
             + f"; each sample: open+seek+read of its shard file; torch DataLoader, "
               f"num_workers={args.workers}")
    return loader, notes


def tar_sample_to_tensor(sample):
    return to_tensor(sample[0])


def make_webdataset_loader(work, meta, args):
    import webdataset as wds

    urls = [os.path.join(work, path) for path in meta["tar_shards"]]
    # shardshuffle=True means a shuffle buffer of 100 shards (and a warning); the number of
    # shards shuffles the whole shard list.
    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), empty_check=False)
               .shuffle(args.buffer)
               .to_tuple("bin")
               .map(tar_sample_to_tensor)
               .batched(args.batch_size, collation_fn=collate_for(meta)))
    loader = DataLoader(dataset, batch_size=None, num_workers=args.workers,
                        persistent_workers=True, timeout=args.timeout)
    notes = (f"NOT a global shuffle: webdataset cannot do random access. It shuffles the order "
             f"of {len(urls)} tar shards (whole shards split between {args.workers} workers), "
             f"reads each shard sequentially, and mixes samples in a {args.buffer}-sample "
             f"shuffle buffer per worker; torch DataLoader, num_workers={args.workers}")
    return loader, notes


def make_loader(peer, work, meta, args):
    if peer == "dataloader":
        return make_pread_loader(DataLoader, work, meta, args)
    if peer == "statefuldataloader":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return make_pread_loader(StatefulDataLoader, work, meta, args)
    if peer == "streaming":
        return make_streaming_loader(work, meta, args)
    if peer == "webdataset":
        return make_webdataset_loader(work, meta, args)
    raise ValueError(peer)


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------

def drop_page_cache():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        sys.exit(f"--cold: cannot drop the page cache ({e}); it needs root")


def endless(loader, counter):
    """Batches from one epoch after another; counter["epochs"] counts the epochs started."""
    while True:
        counter["epochs"] += 1
        yield from loader


def touch(batch, meta, verify):
    """Read one byte of every sample; returns (samples, bytes). Checks the sample sizes, and with
    verify the whole content of synthetic samples."""
    samples = list(batch) if isinstance(batch, list) else None
    if samples is None:
        count, size = batch.shape
        if size != meta["sample_size"]:
            raise AssertionError(f"sample of {size} bytes, expected {meta['sample_size']}")
        checksum = int(batch[:, 0].sum())
        nbytes = batch.numel()
    else:
        count = len(samples)
        checksum = sum(int(s[0]) for s in samples)
        nbytes = sum(s.numel() for s in samples)
        for s in samples:
            if not meta["min_sample_size"] <= s.numel() <= meta["max_sample_size"]:
                raise AssertionError(f"sample of {s.numel()} bytes, outside the dataset's sizes")
    if verify:
        for s in (samples if samples is not None else batch):
            data = s.numpy().tobytes()
            index = int.from_bytes(data[:8].ljust(8, b"\0"), "little")
            if index >= meta["num_samples"] or data != synthetic_sample(index, len(data)):
                raise AssertionError(f"sample content is not synthetic sample {index}'s")
    return count, nbytes, checksum


def versions(peer):
    packages = {"dataloader": [], "statefuldataloader": ["torchdata"],
                "streaming": ["mosaicml-streaming"], "webdataset": ["webdataset"]}[peer]
    return {p: importlib.metadata.version(p) for p in ["torch", *packages]}


def run(args):
    work = os.path.abspath(args.work)
    with open(os.path.join(work, "meta.json")) as f:
        meta = json.load(f)
    if args.verify and not meta["source"].startswith("synthetic:"):
        sys.exit("--verify checks synthetic content; this WORKDIR holds " + meta["source"])
    torch.manual_seed(args.seed)

    loader, notes = make_loader(args.peer, work, meta, args)
    counter = {"epochs": 0}
    if args.cold:
        drop_page_cache()
    begin = time.monotonic()
    batches = endless(loader, counter)
    warmup_samples = 0
    if not args.cold:  # warm-up: at least one batch, then until 1 s has passed (not measured)
        while True:
            warmup_samples += touch(next(batches), meta, args.verify)[0]
            if time.monotonic() - begin >= args.warmup:
                break

    start = time.monotonic()
    samples = nbytes = checksum = 0
    while time.monotonic() - start < args.seconds:
        count, size, check = touch(next(batches), meta, args.verify)
        samples, nbytes, checksum = samples + count, nbytes + size, checksum + check
    seconds = time.monotonic() - start

    # Shut the workers down now: closing the generator drops its iterator over the loader, and
    # with the loader gone, its persistent workers' iterator goes too (it joins them).
    batches.close()
    del batches, loader
    gc.collect()

    if args.cold:
        notes += ("; cold: page cache dropped after building the loader, no warm-up, the time "
                  "includes starting the workers and the first batch")
    else:
        notes += f"; warm-up (not measured): {warmup_samples} samples"
    result = {
        "peer": args.peer,
        "samples_per_s": samples / seconds,
        "bytes_per_s": nbytes / seconds,
        "samples": samples,
        "seconds": seconds,
        "bytes_per_sample": meta["sample_size"],
        "batch_size": args.batch_size,
        "cold": args.cold,
        "epochs_started": counter["epochs"],
        "verified": args.verify,
        "checksum": checksum,
        "source": meta["source"],
        "versions": versions(args.peer),
        "notes": notes,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.peer}: {result['samples_per_s']:.0f} samples/s, "
              f"{result['bytes_per_s'] / 2**20:.1f} MiB/s ({samples} samples in {seconds:.2f} s"
              f"{', cold' if args.cold else ''})\n  {notes}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="write the samples in every peer's format")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--source", help="a sluice dataset directory (or sluice:DIR), "
                                         "or synthetic:N:SIZE")
    source.add_argument("--synthetic", metavar="N:SIZE",
                        help="N samples of SIZE bytes, e.g. 524288:4096 (2 GiB)")
    p.add_argument("--out", required=True, metavar="WORKDIR")

    p = commands.add_parser("run", help="measure one peer")
    p.add_argument("peer", choices=PEERS)
    p.add_argument("--work", required=True, metavar="WORKDIR")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--cold", action="store_true",
                   help="drop the page cache first (root), no warm-up")
    p.add_argument("--json", action="store_true", help="print one line of JSON")
    p.add_argument("--workers", type=int, default=2, help="DataLoader num_workers")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up (at most 1)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="DataLoader timeout: seconds to wait for one batch")
    p.add_argument("--shuffle-algo", default="naive",
                   help="streaming: shuffle_algo (naive = global permutation; default py1e)")
    p.add_argument("--buffer", type=int, default=8192,
                   help="webdataset: shuffle buffer, in samples, per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verify", action="store_true",
                   help="check the content of every synthetic sample (slow)")

    args = parser.parse_args()
    if args.command == "convert":
        convert(args)
    else:
        args.warmup = min(args.warmup, 1.0)
        run(args)


if __name__ == "__main__":
    main()
