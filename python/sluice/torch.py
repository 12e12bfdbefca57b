"""sluice for torch.utils.data.DataLoader and Lightning.

    ds = sluice.torch.IterableDataset("config.yaml")
    dl = torch.utils.data.DataLoader(ds, batch_size=None)   # sluice batches already

Use num_workers=0 (the default). sluice reads with its own threads; worker processes only add
a copy of every batch through shared memory. With workers, each one runs its own loader on a
share of the rank's samples (rank * num_workers + worker id), so every sample is still
delivered once per epoch, but the DataLoader interleaves their batches and a state_dict is
not available. Never create a sluice.Loader before workers fork: its threads do not survive.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch.utils.data

from .loader import Config, Loader


class IterableDataset(torch.utils.data.IterableDataset):
    """A sluice.Loader as an IterableDataset yielding whole batches (use batch_size=None).

    set_epoch, state_dict and load_state_dict work as on sluice.Loader (torchdata's
    StatefulDataLoader calls the latter two). The loader is created on first use, in the
    process that iterates.
    """

    def __init__(
        self,
        config: Config,
        rank: int | None = None,
        world_size: int | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self._args = (config, rank, world_size, overrides)
        self._loader: Loader | None = None
        self._pid: int | None = None
        self._epoch: int | None = None
        self._state: Mapping[str, Any] | None = None

    def _get(self) -> Loader:
        if self._loader is not None and self._pid == os.getpid():
            return self._loader
        config, rank, world_size, overrides = self._args
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 0:
            warnings.warn(
                "sluice.torch.IterableDataset under DataLoader workers: sluice reads with its own "
                "threads, and workers add a copy of every batch; use num_workers=0",
                stacklevel=2,
            )
            base = Loader(config, rank, world_size, **overrides)  # resolves rank from config/env
            rank = base.rank * info.num_workers + info.id
            world_size = base.world_size * info.num_workers
            base.close()
        self._loader = Loader(config, rank, world_size, **overrides)
        self._pid = os.getpid()
        if self._state is not None:
            self._loader.load_state_dict(self._state)
        elif self._epoch is not None:
            self._loader.set_epoch(self._epoch)
        self._state = None
        self._epoch = None
        return self._loader

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def set_epoch(self, epoch: int) -> None:
        if self._loader is not None and self._pid == os.getpid():
            self._loader.set_epoch(epoch)
        else:
            self._epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return self._get().state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self._loader is not None and self._pid == os.getpid():
            self._loader.load_state_dict(state)
        else:
            self._state = dict(state)
