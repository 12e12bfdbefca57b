"""Remote reads from Python: a shard server inside one loader, found through a torch
distributed store, feeding another loader that holds the other half of the shards."""

from __future__ import annotations

import datetime
import socket
import threading
from pathlib import Path

import torch.distributed as dist

import sluice
from conftest import N, config, split_shards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exchange_peers_through_a_store() -> None:
    timeout = datetime.timedelta(seconds=30)
    master = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timeout, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", master.port, 2, False, timeout=timeout)
    got: dict[int, list] = {}

    def publish(rank: int, store) -> None:
        got[rank] = sluice.distributed.exchange_peers(f"10.0.0.{rank}:7070", [rank, rank + 2],
                                                      store=store, rank=rank, world_size=2)

    threads = [threading.Thread(target=publish, args=(r, s)) for r, s in ((0, master), (1, client))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert got[0] == [{"address": "10.0.0.1:7070", "shards": [1, 3]}]
    assert got[1] == [{"address": "10.0.0.0:7070", "shards": [0, 2]}]


def test_a_loader_reads_the_other_half_from_a_loader_that_serves_it(mixed: Path, tmp_path: Path) -> None:
    even_dir, odd_dir, even, odd = split_shards(mixed, tmp_path)
    listen = f"127.0.0.1:{free_port()}"
    serving = sluice.Loader(config(odd_dir), distributed={
        "listen": listen, "token": "tok", "peers": [{"address": "127.0.0.1:1", "shards": even}]})
    reader = sluice.Loader(config(even_dir, drop_last=False), distributed={
        "peers": [{"address": listen, "shards": odd}], "token": "tok"})
    seen = []
    for batch in reader:
        index = batch["index"][~batch["padding"]]
        seen += index.tolist()
    assert sorted(seen) == list(range(N))
    serving.close()
