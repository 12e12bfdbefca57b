"""device: pinned and cuda:N from Python. Without a GPU, cuda:N fails clearly and pinned falls
back to ordinary memory; the GPU tests skip with the reason (scripts/gpu-check.sh runs them on
a GPU machine)."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch

import sluice

from conftest import N, sample_fields

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


@needs_gpu
def test_a_kernel_on_the_consumer_stream_sees_complete_data(mixed: Path) -> None:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        loader = sluice.Loader(config(mixed, "cuda:0"), rank=0, world_size=1)
        sums = []
        for batch in loader:
            sums.append((batch["index"].clone(), batch["label"].sum()))  # a kernel on `stream`
    torch.cuda.synchronize()
    for index, total in sums:
        assert total.item() == sum(i % 10 for i in index.tolist())


@needs_gpu
def test_a_cuda_tensor_outlives_its_loader(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed, "cuda:0"), rank=0, world_size=1)
    batch = next(iter(loader))
    del loader
    gc.collect()
    check(batch)


@needs_gpu
def test_thousands_of_cuda_batches_keep_memory_flat(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed, "cuda:0"), rank=0, world_size=1)
    batches, baseline = 0, None
    while batches < 2000:
        for batch in loader:
            batch["label"].sum()
            batches += 1
            if batches == 200:
                torch.cuda.synchronize()
                baseline = torch.cuda.mem_get_info()[0]
    torch.cuda.synchronize()
    assert baseline - torch.cuda.mem_get_info()[0] < (4 << 20)
