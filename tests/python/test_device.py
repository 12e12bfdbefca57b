"""device: pinned and cuda:N from Python. Without a GPU, cuda:N fails clearly and pinned falls
back to ordinary memory; the GPU tests skip with the reason (scripts/gpu-check.sh runs them on
a GPU machine): bytes on the GPU equal the bytes on disk, also for samples a `sluice serve`
sends; a kernel on the consumer's stream sees complete data; memory stays flat."""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sluice

from conftest import N, sample_fields, split_shards

has_gpu = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not has_gpu, reason="no CUDA device (torch.cuda.is_available())")


def config(mixed: Path, device: str) -> dict:
    return {"dataset": {"path": str(mixed)}, "batch_size": 50, "device": device}


def check(batch: dict) -> None:
    data = batch["data"].cpu().numpy()
    offsets = batch["data_offsets"].numpy()
    for k, i in enumerate(batch["index"].tolist()):
        expected = sample_fields(i)
        assert np.array_equal(data[offsets[k] : offsets[k + 1]], expected["data"]), f"sample {i}"
        assert batch["label"][k].item() == int(expected["label"])


@pytest.mark.skipif(has_gpu, reason="this machine has a GPU")
def test_cuda_without_a_gpu_fails_naming_the_device(mixed: Path) -> None:
    with pytest.raises(RuntimeError, match="device: cuda:0: no CUDA device"):
        sluice.Loader(config(mixed, "cuda:0"), rank=0, world_size=1)


def test_pinned_works_with_or_without_a_gpu(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed, "pinned"), rank=0, world_size=1)
    seen = 0
    for batch in loader:
        check(batch)
        assert batch["data"].is_pinned() == has_gpu
        seen += len(batch["index"])
    assert seen == N
    assert loader.stats()["pinned"] == has_gpu


@needs_gpu
def test_cuda_tensors_hold_the_bytes_on_disk(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed, "cuda:0"), rank=0, world_size=1)
    for batch in loader:
        assert batch["data"].device == torch.device("cuda", 0)
        assert batch["label"].is_cuda
        assert not batch["data_offsets"].is_cuda  # offsets stay on the host
        check(batch)


BIG = 96  # samples of 1-2 MiB in the `big` dataset


def big_sample(i: int) -> np.ndarray:
    return np.random.default_rng(1000 + i).integers(0, 256, (1 << 20) + i * 8191, dtype=np.uint8)


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """Batches of 16-32 MiB, and each sample's byte sum."""
    path = tmp_path_factory.mktemp("big") / "ds"
    sums = []
    with sluice.DatasetWriter(str(path), [{"name": "data", "dtype": "uint8", "shape": [-1]}],
                              shard_bytes=32 << 20) as w:
        for i in range(BIG):
            x = big_sample(i)
            sums.append(int(x.sum(dtype=np.int64)))
            w.add([x])
    return path, sums


@needs_gpu
def test_a_kernel_on_the_consumer_stream_sees_complete_data(big: tuple[Path, list[int]]) -> None:
    # One loader thread and prefetch 1: each batch's copy is queued just before the loop gets
    # it, and the sum is queued on `stream` at once. Without the stream's wait for the copy the
    # kernel would read a partly copied buffer (an earlier batch's bytes).
    path, expected = big
    stream = torch.cuda.Stream()
    cfg = {"dataset": {"path": str(path)}, "batch_size": 16, "device": "cuda:0", "prefetch": 1,
           "io": {"threads": 1}}
    with torch.cuda.stream(stream):
        loader = sluice.Loader(cfg, rank=0, world_size=1)
        sums = []
        for _ in range(4):
            for batch in loader:  # a kernel on `stream`, the current one
                sums.append((batch["index"].clone(), batch["data"].sum(dtype=torch.int64)))
    torch.cuda.synchronize()
    assert len(sums) == 4 * BIG // 16
    for index, total in sums:
        assert total.item() == sum(expected[i] for i in index.tolist()), f"batch {index.tolist()}"


@needs_gpu
def test_a_cuda_tensor_outlives_its_loader(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed, "cuda:0"), rank=0, world_size=1)
    batch = next(iter(loader))
    del loader
    gc.collect()
    check(batch)


@needs_gpu
@pytest.mark.parametrize("device", ["cuda:0", "pinned"])
def test_thousands_of_batches_keep_device_and_pinned_memory_flat(mixed: Path, device: str) -> None:
    before = sluice.Loader(config(mixed, "cpu"), rank=0, world_size=1).stats()
    loader = sluice.Loader(config(mixed, device), rank=0, world_size=1)
    batches, free, stats = 0, 0, {}
    while batches < 2000:
        for batch in loader:
            batch["label"].sum()
            batches += 1
            if batches == 200:
                torch.cuda.synchronize()
                free, stats = torch.cuda.mem_get_info()[0], loader.stats()
    torch.cuda.synchronize()
    after = loader.stats()
    assert stats["pinned_bytes"] > before["pinned_bytes"]
    assert free - torch.cuda.mem_get_info()[0] < (4 << 20)
    assert after["pinned_bytes"] <= stats["pinned_bytes"] + (2 << 20)
    assert after["device_bytes"] <= stats["device_bytes"] + (2 << 20)
    del loader, batch
    gc.collect()
    torch.cuda.synchronize()
    left = sluice.Loader(config(mixed, "cpu"), rank=0, world_size=1).stats()
    assert left["pinned_bytes"] == before["pinned_bytes"], "page-locked memory left behind"
    assert left["device_bytes"] == before["device_bytes"], "device memory left behind"


@needs_gpu
def test_samples_from_sluice_serve_land_on_the_gpu_intact(mixed: Path, tmp_path: Path) -> None:
    """Half the shards local, half from a `sluice serve` on loopback (UCX over TCP or shared
    memory), all of them copied into cuda:0: every sample's bytes as written."""
    even_dir, _, _, odd = split_shards(mixed, tmp_path)
    server = subprocess.Popen([sys.executable, "-m", "sluice._cli", "serve", str(mixed),
                               "--listen", "127.0.0.1:0", "--no-token", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()  # "" when it exits instead
        assert line, f"sluice serve exited: {server.stderr.read()}"
        address = json.loads(line)["address"]
        cfg = dict(config(even_dir, "cuda:0"), drop_last=False,
                   distributed={"peers": [{"address": address, "shards": odd}], "no_token": True})
        loader = sluice.Loader(cfg, rank=0, world_size=1)
        seen = []
        for batch in loader:
            assert batch["data"].is_cuda
            keep = ~batch["padding"]
            index = batch["index"][keep]
            data, offsets = batch["data"].cpu().numpy(), batch["data_offsets"].numpy()
            for k in torch.nonzero(keep).flatten().tolist():
                i = batch["index"][k].item()
                assert np.array_equal(data[offsets[k]:offsets[k + 1]], sample_fields(i)["data"]), i
            seen += index.tolist()
        assert sorted(seen) == list(range(N))
        loader.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
