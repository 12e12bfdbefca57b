"""sluice for PyTorch Lightning, torchdata-style training loops and torch.utils.data.DataLoader.

    loader = sluice.torch.DataLoader("config.yaml")   # return it from train_dataloader()

sluice.torch.DataLoader is what Lightning needs to resume mid-epoch exactly: Lightning saves its
state_dict() in every checkpoint and restores it with load_state_dict() before the epoch goes on,
and calls `loader.sampler.set_epoch(epoch)` at each epoch start, so the loader's epochs follow
the trainer's. `torch.utils.data.DataLoader(IterableDataset(...), batch_size=None)` works for
plain loops, but Lightning neither saves nor restores a plain DataLoader: resumed mid-epoch it
would replay the epoch from its start. torchdata's StatefulDataLoader around the IterableDataset
saves and restores it too.

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


class _EpochSetter:
    """What Lightning finds at `loader.sampler`: its set_epoch is the loader's."""

    def __init__(self, owner: DataLoader) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)


class DataLoader:
    """A sluice.Loader as the stateful data loader object that Lightning and torchdata-style
    code save and restore on their own: iterate it for one epoch's batches (dicts of tensors),
    `len()` is a whole epoch's batches, `state_dict()` / `load_state_dict()` resume exactly
    mid-epoch on any world size, and `sampler.set_epoch(e)` (what Lightning calls at each epoch
    start) picks the epoch, keeping a just-restored place in that epoch.

    Arguments as sluice.Loader's. The loader is created on first use, in the process that
    iterates (so the object can be made before DDP spawns or forks).
    """

    def __init__(
        self,
        config: Config,
        rank: int | None = None,
        world_size: int | None = None,
        **overrides: Any,
    ) -> None:
        self._dataset = IterableDataset(config, rank, world_size, **overrides)
        self.sampler = _EpochSetter(self)
        self.batch_size = None  # batches come whole from sluice, as DataLoader(batch_size=None)

    @property
    def loader(self) -> Loader:
        """The sluice.Loader behind this object (created on first use)."""
        return self._dataset._get()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._dataset)

    def __len__(self) -> int:
        return len(self._dataset)

    @property
    def batches_left(self) -> int:
        return self.loader.batches_left

    def set_epoch(self, epoch: int) -> None:
        self._dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return self._dataset.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._dataset.load_state_dict(state)

    def close(self) -> None:
        self._dataset.close()


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

    def close(self) -> None:
        """Stops the loader's threads now (it is made again on the next use)."""
        if self._loader is not None and self._pid == os.getpid():
            self._loader.close()
        self._loader = None
