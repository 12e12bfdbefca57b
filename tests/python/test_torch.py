"""sluice.torch.IterableDataset under torch.utils.data.DataLoader (and StatefulDataLoader's
protocol)."""

from __future__ import annotations

from pathlib import Path

import torch

import sluice.torch
from conftest import N, config


def indices(dl) -> list[int]:
    out: list[int] = []
    for batch in dl:
        index = batch["index"]
        if "padding" in batch:
            index = index[~batch["padding"]]
        out += index.tolist()
    return out


def test_dataloader_with_batch_size_none(mixed: Path) -> None:
    ds = sluice.torch.IterableDataset(config(mixed, drop_last=False))
    dl = torch.utils.data.DataLoader(ds, batch_size=None)
    assert len(dl) == len(ds) == (N + 31) // 32
    assert sorted(indices(dl)) == list(range(N))
    ds.set_epoch(5)
    again = indices(dl)
    assert sorted(again) == list(range(N))


def test_worker_processes_share_the_epoch_exactly_once(mixed: Path) -> None:
    ds = sluice.torch.IterableDataset(config(mixed, drop_last=False))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2,
                                     multiprocessing_context="spawn", timeout=60)
    got = indices(dl)  # each worker reads its own share of the rank's samples
    assert sorted(got) == list(range(N))


def test_state_dict_through_the_dataset(mixed: Path) -> None:
    full = indices(sluice.torch.IterableDataset(config(mixed)))
    ds = sluice.torch.IterableDataset(config(mixed))
    got: list[int] = []
    for k, batch in enumerate(ds):
        got += batch["index"].tolist()
        if k == 3:
            break
    state = ds.state_dict()
    resumed = sluice.torch.IterableDataset(config(mixed))
    resumed.load_state_dict(state)  # before the loader exists: applied when it is created
    assert got + indices(resumed) == full

