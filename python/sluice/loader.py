"""The Python iterator over sluice's C++ Loader."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, Union

from . import _C

Config = Union[str, "os.PathLike[str]", Mapping[str, Any]]

_STATE_VERSION = 1


def _non_negative_int(value: Any, what: str) -> int:
    """An int >= 0 (numpy and torch integers too); ValueError naming `what` for anything else:
    bools, floats, strings, negative numbers."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor/array
            return _non_negative_int(value.item(), what)
        raise ValueError(f"sluice.Loader.{what}: expected an integer >= 0, got {value!r}")
    if int(value) < 0:
        raise ValueError(f"sluice.Loader.{what}: expected an integer >= 0, got {int(value)}")
    return int(value)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """{"io": {"threads": 2}} -> [("io.threads", 2)]; dotted keys pass through. The values go
    to LoaderOptions.set as they are (typed: no YAML text in between)."""
    out: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(_flatten(value, name + "."))
        else:
            out.append((name, value))
    return out


class _Exported:
    """A DLPack capsule of sluice's behind the protocol numpy.from_dlpack takes (once)."""

    __slots__ = ("capsule",)

    def __init__(self, capsule: Any) -> None:
        self.capsule = capsule

    def __dlpack__(self, stream: Any = None, **kwargs: Any) -> Any:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


class Loader:
    """Batches of a sluice dataset as dicts of torch tensors, for one rank.

    `output="numpy"` gives numpy arrays instead (host memory, no torch needed); both are views
    of sluice's buffers and speak DLPack, so JAX takes either without a copy
    (`jax.numpy.from_dlpack(batch["data"])`).

    `config` is a YAML file or a dict with the same keys; keyword arguments override keys
    (`batch_size=512`, `shuffle={"mode": "block"}`, `**{"io.threads": 2}`). `rank` and
    `world_size` default to the config, then to RANK / WORLD_SIZE as torchrun sets them.

    Each `for` loop over the loader runs one epoch: the rest of the current one, or the next
    one once the current one is delivered, unless `set_epoch` or `load_state_dict` says
    otherwise (between loops; inside a running loop they raise, as does a second loop while
    one runs). `len(loader)` is a whole epoch's batches; `batches_left` what the next loop
    delivers. Tensors are
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
        *,
        output: str = "torch",
        embeddings: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        path: str | None = None
        settings: list[tuple[str, Any]] = []
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
        elif isinstance(config, Mapping):
            settings += _flatten(config)
        else:
            raise TypeError(f"sluice.Loader: config must be a path or a dict, not {type(config).__name__}")
        settings += _flatten(overrides)
        if rank is not None:
            settings.append(("distributed.rank", int(rank)))
        if world_size is not None:
            settings.append(("distributed.world_size", int(world_size)))
        if output == "torch":
            # torch is imported here rather than with the package (sluice.Dataset and the
            # writer do not need it), and not at the first batch, where it would cost a second
            # of the epoch. torch._C._from_dlpack is what torch.utils.dlpack.from_dlpack calls
            # for a capsule (torch 1.10 and later), minus a few microseconds of Python per tensor.
            try:
                import torch.utils.dlpack
            except ModuleNotFoundError as e:
                if e.name != "torch":
                    raise
                raise ModuleNotFoundError(
                    "sluice.Loader gives torch tensors by default and torch is not installed: "
                    "pip install torch, or sluice.Loader(..., output=\"numpy\") for numpy "
                    "arrays", name="torch") from None

            self._from_dlpack = getattr(torch._C, "_from_dlpack", torch.utils.dlpack.from_dlpack)
        elif output == "numpy":
            import numpy

            self._from_dlpack = lambda capsule: numpy.from_dlpack(_Exported(capsule))
        else:
            raise ValueError(f"sluice.Loader: output must be \"torch\" or \"numpy\", not {output!r}")
        self._pid = os.getpid()
        self._c = _C.Loader(path, settings)
        if output == "numpy" and self._c.cuda_device >= 0:
            raise ValueError("sluice.Loader: output=\"numpy\" holds batches in host memory: "
                             "use device: cpu or pinned (or output=\"torch\" for cuda:N)")
        if output == "torch" and self._c.stats()["pinned"]:
            # Batch buffers are page-locked by sluice's own CUDA runtime; torch answers
            # is_pinned() False for them until its CUDA is initialized (seen with torch 2.11 on
            # an H200), and a caller may ask before any other CUDA call.
            import torch.cuda

            torch.cuda.init()
        self._as_torch = output == "torch"
        self._embeddings = self._check_embeddings(dict(embeddings or {}))
        self._lookahead: Any = None  # the loop's _lookahead.LookAhead, while it runs
        self._lookahead_batches = 0  # batches the loop with a look-ahead delivers in all
        # With embeddings: the C++ loader's state after the last batch the consumer was given
        # (the look-ahead thread takes batches ahead of it); None: the C++ loader's own.
        self._consumed_state: tuple[int, int] | None = None
        #: LOCAL_RANK as torchrun sets it (0 when unset): the GPU this process should use.
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # The loop in progress: a token its generator holds from its first batch until it has
        # delivered its epoch's last one (or is closed). One at a time.
        self._running: object | None = None
        self._delivered = 0  # batches the loop in progress has delivered
        # load_state_dict placed the loader inside an epoch and no loop has started since:
        # set_epoch of that same epoch keeps the place (what Lightning does on resume).
        self._resumed = False

    def _check_embeddings(self, embeddings: dict[str, Any]) -> dict[str, Any]:
        """Each key an integer field of the dataset, each value an EmbeddingTable."""
        from .embedding import EmbeddingTable

        fields = {f["name"]: f for f in self._c.fields()}
        taken = set(fields) | {f"{n}_offsets" for n in fields}
        for name, table in embeddings.items():
            if name not in fields:
                raise ValueError(f"sluice.Loader: embeddings: {name!r} is not a field of the dataset "
                                 f"(fields: {', '.join(sorted(fields))})")
            dtype = fields[name]["dtype"]
            if not dtype.startswith(("int", "uint")):
                raise ValueError(f"sluice.Loader: embeddings: field {name!r} is {dtype}, not an integer id field")
            if not isinstance(table, EmbeddingTable):
                raise TypeError(f"sluice.Loader: embeddings[{name!r}] is a {type(table).__name__}, "
                                "not a sluice.EmbeddingTable")
            if table.dtype == "bfloat16" and not self._as_torch:
                raise ValueError(f"sluice.Loader: embeddings[{name!r}] holds bfloat16, which numpy "
                                 "has no type for: output=\"torch\"")
            for key in (f"{name}_unique", f"{name}_inverse", f"{name}_rows"):
                if key in taken:
                    raise ValueError(f"sluice.Loader: embeddings: {key!r} is already a field of the dataset")
        return embeddings

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
        """Batches this rank gets in a whole epoch (the same on every rank), as torch's
        DataLoader counts them, also after load_state_dict; `batches_left` is what the next loop
        still delivers."""
        return self._loader().batches_per_epoch

    @property
    def batches_left(self) -> int:
        """Batches the loop in progress still delivers, or the next loop will: the rest of a
        resumed epoch after load_state_dict, a whole epoch once the last one is done. For
        progress bars (`tqdm(loader, total=loader.batches_left)`) and schedules."""
        loader = self._loader()
        left = loader.batches_left
        if self._lookahead is not None:  # its thread takes batches ahead of the consumer
            left = self._lookahead_batches - self._delivered
        if self._running is None and left == 0:
            return loader.batches_per_epoch
        return left

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch: the rest of the current one, or the next one when the current one has
        been delivered. Never more than one epoch per loop, and one loop at a time."""
        return self._epoch(self._loader())

    def _epoch(self, loader: _C.Loader) -> Iterator[dict[str, Any]]:
        # Runs from the loop's first next(): a loop created but not started (Lightning calls
        # iter() before set_epoch) holds nothing.
        if self._running is not None:
            raise RuntimeError(
                f"sluice.Loader: a loop over epoch {loader.epoch} is already running "
                f"({self._delivered} of {len(self)} batches delivered); a loader delivers one "
                "epoch to one loop at a time. Finish or break out of that loop first (several "
                "consumers need a loader each, with rank/world_size splitting the data)"
            )
        token = object()
        self._running = token
        self._resumed = False
        self._delivered = 0
        cuda_device = loader.cuda_device
        if cuda_device >= 0:
            import torch

            current_stream = torch.cuda.current_stream
        from_dlpack = self._from_dlpack
        try:
            if loader.batches_left == 0:
                # The epoch the loader stands in was delivered: this loop is the next one. Its
                # end may not have been read yet (a loop that stopped after the last batch).
                tensors = loader.next(0)
                if tensors is not None:  # pragma: no cover - the C++ loader's contract
                    raise RuntimeError("sluice.Loader: [internal] a batch past the epoch's end")
            if self._embeddings:
                yield from self._epoch_with_rows(loader, token)
                return
            while True:
                # device: cuda:N: the current stream waits for the batch's copy (no host sync),
                # and the batch's device buffer is reused only after the work queued on it.
                stream = current_stream(cuda_device).cuda_stream if cuda_device >= 0 else 0
                tensors = loader.next(stream)
                if tensors is None:
                    return
                self._delivered += 1
                last = loader.batches_left == 0
                if last:  # the epoch is delivered: the loop is done, whatever the caller does
                    self._running = None
                # "__key__" comes as a list of str (the samples' keys); the rest as tensors.
                yield {key: value if key == "__key__" else from_dlpack(value)
                       for key, value in tensors}
                if last:
                    return
        finally:
            if self._running is token:
                self._running = None

    def _epoch_with_rows(self, loader: _C.Loader, token: object) -> Iterator[dict[str, Any]]:
        """_epoch with the embedding look-ahead (sluice/_lookahead.py) between the C++ loader
        and the consumer."""
        cuda_device = loader.cuda_device
        stream = 0
        if cuda_device >= 0:
            import torch

            stream = torch.cuda.current_stream(cuda_device).cuda_stream
        from . import _lookahead  # numpy: only with embeddings

        from_dlpack = self._from_dlpack

        def next_batch() -> dict[str, Any] | None:
            tensors = loader.next(stream)
            if tensors is None:
                return None
            return {key: value if key == "__key__" else from_dlpack(value) for key, value in tensors}

        device = (f"cuda:{cuda_device}" if cuda_device >= 0
                  else "pinned" if loader.stats()["pinned"] else "cpu")
        start = loader.state()
        self._consumed_state = start
        self._lookahead_batches = loader.batches_left
        self._lookahead = _lookahead.LookAhead(next_batch, loader.state, self._lookahead_batches,
                                               self._embeddings, loader.prefetch, device,
                                               self._as_torch)
        try:
            while True:
                got = self._lookahead.next()
                if got is None:
                    return
                batch, self._consumed_state = got
                self._delivered += 1
                last = self._delivered == self._lookahead_batches
                if last:
                    self._running = None
                yield batch
                if last:
                    return
        finally:
            taken = self._lookahead.taken
            self._lookahead.close()
            self._lookahead = None
            if taken > self._delivered:  # batches read ahead and never given: back to the place
                loader.load_state(*self._consumed_state)
            self._consumed_state = None  # the C++ loader stands at the consumer's place again
            if self._running is token:
                self._running = None

    def set_epoch(self, epoch: int) -> None:
        """The next loop runs `epoch` from its start (batches read ahead are dropped). Right
        after load_state_dict of a state inside `epoch`, it keeps that place instead. Raises
        RuntimeError inside a running loop."""
        epoch = _non_negative_int(epoch, "set_epoch: epoch")
        loader = self._loader()
        if self._running is not None:
            raise RuntimeError(
                f"sluice.Loader.set_epoch({epoch}) inside a loop over epoch {loader.epoch} "
                f"({self._delivered} of {len(self)} batches delivered): call it between loops"
            )
        if self._resumed and epoch == loader.state()[0]:
            return  # resuming: the restored place is where this epoch continues
        self._resumed = False
        self._consumed_state = None
        loader.set_epoch(epoch)

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
        epoch, position = self._consumed_state or loader.state()
        return {
            "version": _STATE_VERSION,
            "epoch": epoch,
            "position": position,
            "num_samples": loader.num_samples,
            "seed": loader.seed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes from state_dict(): the next loop delivers exactly what was not delivered of
        that epoch, on any world size. ValueError when the state is malformed or belongs to
        another dataset or seed; RuntimeError inside a running loop."""
        loader = self._loader()
        if self._running is not None:
            raise RuntimeError("sluice.Loader.load_state_dict inside a running loop: call it between loops")
        if not isinstance(state, Mapping):
            raise ValueError(f"sluice.Loader.load_state_dict: expected the dict from state_dict(), got {type(state).__name__}")
        missing = [k for k in ("version", "epoch", "position") if k not in state]
        if missing:
            raise ValueError(f"sluice.Loader.load_state_dict: not a sluice state: missing {', '.join(missing)}")
        version, epoch, position = (
            _non_negative_int(state[k], f"load_state_dict: {k}") for k in ("version", "epoch", "position"))
        if version != _STATE_VERSION:
            raise ValueError(f"sluice.Loader.load_state_dict: state version {version}, expected {_STATE_VERSION}")
        for key, mine in (("num_samples", loader.num_samples), ("seed", loader.seed)):
            if key in state and _non_negative_int(state[key], f"load_state_dict: {key}") != mine:
                raise ValueError(
                    f"sluice.Loader.load_state_dict: state is for {key} {state[key]}, this loader has {mine}"
                )
        loader.load_state(epoch, position)
        self._consumed_state = None
        self._resumed = True

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
