"""The Python iterator over sluice's C++ Loader."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any, Union

from . import _C

Config = Union[str, "os.PathLike[str]", Mapping[str, Any]]

_STATE_VERSION = 1


def _scalar(value: Any) -> str:
    """A Python value as the YAML scalar LoaderOptions.set() parses."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return json.dumps(value)  # JSON is YAML: distributed.peers=[{"address": ..., "shards": [...]}]
    return str(value)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """{"io": {"threads": 2}} -> [("io.threads", "2")]; dotted keys pass through."""
    out: list[tuple[str, str]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(_flatten(value, name + "."))
        else:
            out.append((name, _scalar(value)))
    return out


class Loader:
    """Batches of a sluice dataset as dicts of torch tensors, for one rank.

    `config` is a YAML file or a dict with the same keys; keyword arguments override keys
    (`batch_size=512`, `shuffle={"mode": "block"}`, `**{"io.threads": 2}`). `rank` and
    `world_size` default to the config, then to RANK / WORLD_SIZE as torchrun sets them.

    Each `for` loop over the loader runs the rest of the current epoch; the next loop starts
    the following epoch unless `set_epoch` or `load_state_dict` says otherwise. Tensors are
    views of the loader's buffers (no copy) and keep them alive, also after the loader is gone;
    a buffer is reused once every tensor of its batch has died. Holding more than
    `max_batches_held` batches stops the loader, and the next batch then fails with a message
    that says so.

    Not fork-safe: create the loader in the process that iterates it. Errors: ValueError (bad
    config or state), FileNotFoundError, OSError (with errno), sluice.CorruptionError.
    """

    def __init__(
        self,
        config: Config,
        rank: int | None = None,
        world_size: int | None = None,
        **overrides: Any,
    ) -> None:
        path: str | None = None
        settings: list[tuple[str, str]] = []
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
        elif isinstance(config, Mapping):
            settings += _flatten(config)
        else:
            raise TypeError(f"sluice.Loader: config must be a path or a dict, not {type(config).__name__}")
        settings += _flatten(overrides)
        if rank is not None:
            settings.append(("distributed.rank", str(int(rank))))
        if world_size is not None:
            settings.append(("distributed.world_size", str(int(world_size))))
        # torch is imported here rather than with the package (sluice.Dataset and the writer do
        # not need it), and not at the first batch, where it would cost a second of the epoch.
        import torch.utils.dlpack

        # torch._C._from_dlpack is what torch.utils.dlpack.from_dlpack calls for a capsule
        # (torch 1.10 and later), minus a few microseconds of Python per tensor.
        self._from_dlpack = getattr(torch._C, "_from_dlpack", torch.utils.dlpack.from_dlpack)
        self._pid = os.getpid()
        self._c = _C.Loader(path, settings)
        #: LOCAL_RANK as torchrun sets it (0 when unset): the GPU this process should use.
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def _loader(self) -> _C.Loader:
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"sluice.Loader was created in process {self._pid} and used in forked process "
                f"{os.getpid()}; its threads do not survive fork. Create it in the process that "
                "iterates it (for DataLoader workers: use sluice.torch.IterableDataset, or "
                "num_workers=0)"
            )
        return self._c

    def __len__(self) -> int:
        """Batches this rank gets per epoch (the same on every rank)."""
        return self._loader().batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        loader = self._loader()
        first = True
        cuda_device = loader.cuda_device
        if cuda_device >= 0:
            import torch

            current_stream = torch.cuda.current_stream
        while True:
            # device: cuda:N: the current stream waits for the batch's copy (no host sync), and
            # the batch's device buffer is reused only after the work queued on it is done.
            stream = current_stream(cuda_device).cuda_stream if cuda_device >= 0 else 0
            tensors = loader.next(stream)
            if tensors is None:
                if first:
                    # The previous loop stopped after the epoch's last batch without reading its
                    # end: this loop is the next epoch.
                    first = False
                    continue
                return
            first = False
            from_dlpack = self._from_dlpack
            yield {key: from_dlpack(capsule) for key, capsule in tensors}

    def set_epoch(self, epoch: int) -> None:
        """Restarts at the beginning of `epoch` (dropping batches read ahead)."""
        self._loader().set_epoch(int(epoch))

    @property
    def epoch(self) -> int:
        return self._loader().epoch

    @property
    def rank(self) -> int:
        return self._loader().rank

    @property
    def world_size(self) -> int:
        return self._loader().world_size

    @property
    def num_samples(self) -> int:
        """Samples in the dataset (all ranks together)."""
        return self._loader().num_samples

    @property
    def classes(self) -> list[str]:
        """Label names stored in the dataset (`sluice pack` of an ImageFolder tree), or []."""
        return self._loader().classes

    @property
    def dataset_path(self) -> str:
        return self._loader().dataset_path

    def state_dict(self) -> dict[str, int]:
        """Where the consumer stands, as plain ints that torch.save stores. Loading it on any
        world size delivers exactly the samples not yet delivered in that epoch."""
        loader = self._loader()
        epoch, position = loader.state()
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "position": position,
            "num_samples": loader.num_samples,
            "seed": loader.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from state_dict(); ValueError when it belongs to another dataset or seed."""
        loader = self._loader()
        try:
            version, epoch, position = (int(state[k]) for k in ("version", "epoch", "position"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"sluice.Loader.load_state_dict: not a sluice state: {e!r}") from None
        if version != _STATE_VERSION:
            raise ValueError(f"sluice.Loader.load_state_dict: state version {version}, expected {_STATE_VERSION}")
        for key, mine in (("num_samples", loader.num_samples), ("seed", loader.seed)):
            if key in state and int(state[key]) != mine:
                raise ValueError(
                    f"sluice.Loader.load_state_dict: state is for {key} {state[key]}, this loader has {mine}"
                )
        loader.load_state(epoch, position)

    def stats(self) -> dict[str, Any]:
        """Counters: batches, samples, bytes, wait_seconds, engine, direct_io, batches_held."""
        return self._loader().stats()

    @property
    def fields(self) -> list[dict[str, Any]]:
        """The dataset's fields: name, dtype, shape (-1 for a variable dimension)."""
        return self._loader().fields()

    def close(self) -> None:
        """Stops the loader threads now; tensors already handed out stay valid."""
        self._c.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"sluice.Loader(rank={self.rank}, world_size={self.world_size}, batches={len(self)})"
