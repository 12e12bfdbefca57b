"""Rendezvous of shard-server addresses through torch.distributed's store.

    peers = sluice.distributed.exchange_peers("10.0.0.5:7070", shards=[0, 1, 2, 3])
    loader = sluice.Loader("train.yaml", distributed={"listen": "0.0.0.0:7070", "peers": peers})
    # the cluster's token: $SLUICE_TOKEN, or distributed.token / token_file in the config

Every rank publishes the address other ranks should connect to (not 0.0.0.0) and the shards
its node holds; each gets back every other rank's entry, ready for `distributed.peers`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def exchange_peers(
    address: str,
    shards: Sequence[int],
    store: Any = None,
    rank: int | None = None,
    world_size: int | None = None,
    prefix: str = "sluice",
) -> list[dict[str, Any]]:
    """Publishes {address, shards} for this rank in `store` and returns the other ranks'
    entries in rank order. `store` defaults to the default process group's store (call
    torch.distributed.init_process_group first); rank and world size default to the process
    group's. Waits for every rank up to the store's timeout (then torch raises)."""
    import torch.distributed as dist

    if store is None:
        store = dist.distributed_c10d._get_default_store()
    if rank is None:
        rank = dist.get_rank()
    if world_size is None:
        world_size = dist.get_world_size()
    store.set(f"{prefix}/peer/{rank}", json.dumps({"address": address, "shards": [int(s) for s in shards]}))
    peers = []
    for r in range(world_size):
        if r != rank:
            peers.append(json.loads(store.get(f"{prefix}/peer/{r}")))
    return peers
