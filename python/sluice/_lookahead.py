"""The Loader's embedding look-ahead (`sluice.Loader(cfg, embeddings={"FIELD": table})`).

A thread takes batches from the C++ loader ahead of the consumer. For each it makes FIELD's ids
unique (`FIELD_unique`, `FIELD_inverse`) and tells the table they are a future gather
(`feed_future`, what the clairvoyant cache evicts by); `depth` batches later it gathers the
rows (`FIELD_rows`), so each gather is made knowing the ids of the next `depth` batches, and
the consumer finds `depth` batches with their rows ready. While the consumer has none ready
(an epoch's first batches) a batch is gathered as soon as it is taken. The rows are held
(`gather_held`): until the batch is delivered, every `table.update` of one of them writes it
into the batch too, so a batch always carries its rows' latest values and delivery does no
work. For device "cuda:N" the rows are held in pinned host memory and copied at delivery.

The consumer's place is the C++ loader's state after the last batch it was given (not after
the last batch the thread took), so state_dict() stays exact; a loop that stops early puts
the C++ loader back there.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from typing import Any, Callable

import numpy as np

_END = object()


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class LookAhead:
    # Kept on the class: close() may run at interpreter exit (a generator left open), after
    # the module's globals are gone.
    _Empty = queue.Empty

    def __init__(self, next_batch: Callable[[], Any], state: Callable[[], tuple[int, int]],
                 count: int, embeddings: dict[str, Any], depth: int, device: str,
                 as_torch: bool) -> None:
        self._next_batch = next_batch
        self._state = state
        self._count = count
        self._embeddings = embeddings
        self._depth = max(1, depth)
        self._device = device
        self._as_torch = as_torch
        self._ready: queue.Queue = queue.Queue(maxsize=self._depth)
        self._stop = threading.Event()
        self.taken = 0  # batches taken from the C++ loader
        self._thread = threading.Thread(target=self._run, name="sluice-embeddings", daemon=True)
        self._thread.start()

    # The thread.
    def _run(self) -> None:
        # SCHED_BATCH, as sluice's C++ threads (common/thread.h): woken, it does not preempt
        # the consumer on its core. Linux applies it to the calling thread alone.
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except (AttributeError, OSError):
            pass
        pending: collections.deque = collections.deque()
        try:
            for _ in range(self._count):
                if self._stop.is_set():
                    return
                batch = self._next_batch()
                if batch is None:
                    break
                self.taken += 1
                uniques = {}
                for field, table in self._embeddings.items():
                    ids = batch[field]
                    flat = (ids.detach().cpu().numpy() if hasattr(ids, "detach")
                            else np.asarray(ids)).reshape(-1)
                    unique, inverse = table._t.unique_and_feed(
                        np.ascontiguousarray(flat, dtype=np.int64))
                    uniques[field] = (unique, inverse.reshape(tuple(ids.shape)))
                pending.append((batch, self._state(), uniques))
                # Gathered once `depth` batches after it are fed, or at once while the consumer
                # has nothing ready (an epoch's first batches: latency before foresight).
                while pending and (len(pending) > self._depth or self._ready.empty()):
                    self._put(self._gather(*pending.popleft()))
            while pending:
                self._put(self._gather(*pending.popleft()))
            self._put(_END)
        except BaseException as e:  # to the consumer, who raises it
            self._put(_Failed(e))

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        self._release(item)  # stopped: nobody will deliver it

    def _release(self, item: Any) -> None:
        if isinstance(item, tuple):
            for field, hold in item[3].items():
                self._embeddings[field]._t.release(hold)

    def _tensor(self, array: np.ndarray) -> Any:
        if not self._as_torch:
            return array
        import torch

        t = torch.from_numpy(array)
        if self._device.startswith("cuda"):
            return t.pin_memory().to(self._device, non_blocking=True)
        return t.pin_memory() if self._device == "pinned" else t

    def _gather(self, batch: dict, state: tuple[int, int], uniques: dict) -> tuple:
        holds = {}
        for field, (unique, inverse) in uniques.items():
            table = self._embeddings[field]
            batch[f"{field}_unique"] = self._tensor(unique)
            batch[f"{field}_inverse"] = self._tensor(inverse)
            as_torch = self._as_torch or self._device != "cpu" or table.dtype == "bfloat16"
            rows, view = table._empty(len(unique), as_torch, pinned=self._device != "cpu")
            holds[field] = table._t.gather_held(unique, view)
            batch[f"{field}_rows"] = rows
        return batch, state, uniques, holds

    # The consumer.
    def next(self) -> tuple[dict, tuple[int, int]] | None:
        """The next batch with its rows, and the C++ loader's state after it; None at the end."""
        while True:
            try:
                item = self._ready.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._ready.empty():
                    raise RuntimeError("sluice.Loader: [internal] the embedding thread ended "
                                       "without a word") from None
        if item is _END:
            return None
        if isinstance(item, _Failed):
            raise item.error
        self._release(item)  # the rows are the consumer's now: updates leave them alone
        batch, state, _, holds = item
        if self._device.startswith("cuda"):
            for field in holds:
                key = f"{field}_rows"
                batch[key] = batch[key].to(self._device, non_blocking=True)
        return batch, state

    def close(self) -> None:
        """Stops the thread; marks of batches never delivered are released."""
        self._stop.set()
        self._thread.join()
        while True:
            try:
                self._release(self._ready.get_nowait())
            except self._Empty:
                break
