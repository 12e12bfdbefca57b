"""Datasets in an object store: sluice reads s3:// paths from moto's S3-compatible server on
loopback (started here, stopped after), uploaded with boto3 as users upload them."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sluice

from conftest import FIELDS, N, config, sample_fields

boto3 = pytest.importorskip("boto3")
MOTO = Path(sys.executable).parent / "moto_server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto server on loopback and the AWS_* environment that points at it."""
    if not MOTO.exists():
        pytest.skip(f"{MOTO} not found (scripts/python-env.sh installs moto[server])")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    deadline = time.monotonic() + 30
    while True:
        try:
            client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on port {port}")
            time.sleep(0.2)
    yield client
    proc.terminate()
    proc.wait(timeout=10)
    log.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def upload(client, directory: Path, bucket: str, prefix: str) -> None:
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for f in sorted(directory.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(directory)}")


def check_epoch(loader: sluice.Loader) -> list[int]:
    seen = []
    for batch in loader:
        data, offsets = batch["data"], batch["data_offsets"]
        for j, i in enumerate(batch["index"].tolist()):
            want = sample_fields(i)
            got = data[offsets[j]:offsets[j + 1]].numpy()
            assert np.array_equal(got, want["data"]), f"sample {i}"
            assert int(batch["label"][j]) == i % 10
            seen.append(i)
    return seen


@pytest.fixture(scope="module")
def bucket(s3, mixed: Path) -> str:
    upload(s3, mixed, "train", "mixed")
    return "s3://train/mixed"


@pytest.mark.parametrize("policy", ["clairvoyant", "lru"])
def test_every_sample_once_through_a_cache_half_the_dataset(bucket: str, tmp_path: Path,
                                                            policy: str) -> None:
    cfg = config(bucket, drop_last=False,
                 cache={"dir": str(tmp_path / "cache"), "capacity": "1M", "policy": policy})
    loader = sluice.Loader(cfg)
    for _ in range(2):
        seen = check_epoch(loader)
        assert sorted(set(seen)) == list(range(N))
    stats = loader.stats()
    assert stats["cache_hits"] + stats["cache_misses"] >= 2 * N
    assert stats["source_bytes"] > 0 and stats["source_requests"] > 0


def test_without_a_cache_section_the_cache_is_in_memory(bucket: str) -> None:
    loader = sluice.Loader(config(bucket, drop_last=False))
    assert sorted(check_epoch(loader)) == list(range(N))
    assert loader.stats()["source_bytes"] > 0


def test_the_default_memory_cache_is_split_among_the_nodes_ranks(
        bucket: str, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    megabytes = {}
    for ranks in (1, 2, 4):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        capfd.readouterr()
        sluice.Loader(config(bucket, drop_last=False))
        err = capfd.readouterr().err
        shared = f", shared by {ranks} ranks on this node" if ranks > 1 else ""
        m = re.search(rf"cache: (\d+) MB \(a quarter of the free memory{shared}\)", err)
        assert m, err
        megabytes[ranks] = int(m[1])
    for ranks in (2, 4):  # free memory moves a little between the loaders
        assert megabytes[ranks] * ranks == pytest.approx(megabytes[1], rel=0.1), megabytes


def test_a_restart_reuses_the_cache_directory(bucket: str, tmp_path: Path) -> None:
    cfg = config(bucket, drop_last=False, cache={"dir": str(tmp_path / "cache"), "capacity": "64M"})
    first = sluice.Loader(cfg)
    check_epoch(first)
    fetched = first.stats()["source_bytes"]
    del first
    again = sluice.Loader(cfg)
    assert sorted(check_epoch(again)) == list(range(N))
    assert again.stats()["source_bytes"] == 0, "the first run's samples were fetched again"
    assert fetched > 0


def test_inspect_verify_and_order_take_s3_paths(bucket: str, mixed: Path, s3,
                                               tmp_path: Path) -> None:
    cli = Path(__file__).resolve().parents[2] / "build" / "sluice"
    run = lambda *args: subprocess.run([str(cli), *args], capture_output=True, text=True,
                                       timeout=120)
    r = run("inspect", bucket, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["path"] == bucket and info["samples"] == N
    r = run("verify", bucket)
    assert r.returncode == 0 and f"OK: {N} samples" in r.stdout, r.stdout + r.stderr
    (tmp_path / "order.yaml").write_text(f"dataset: {{path: {bucket}}}\nbatch_size: 8\n")
    r = run("order", str(tmp_path / "order.yaml"), "--rank", "0", "--world-size", "1")
    assert r.returncode == 0, r.stderr
    assert sorted(int(line) for line in r.stdout.split()) == list(range(N - N % 8))
    # A byte flipped in one object at the source: verify names the object and the sample.
    file, offset, size = sluice.Dataset(str(mixed)).extent(N // 2)
    shard = Path(file)
    raw = bytearray(shard.read_bytes())
    raw[offset + size // 2] ^= 0x40
    (tmp_path / "bad").mkdir()
    for f in mixed.iterdir():
        (tmp_path / "bad" / f.name).write_bytes(raw if f == shard else f.read_bytes())
    upload(s3, tmp_path / "bad", "train", "bad")
    r = run("verify", "s3://train/bad")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"s3://train/bad/{shard.name}" in r.stderr and f"sample {N // 2}" in r.stderr, r.stderr
    assert "verify FAILED" in r.stderr and "sluice-verify-" not in r.stderr, r.stderr


def test_missing_bucket_and_prefix_are_errors_naming_them(s3, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket"):
        sluice.Loader(config("s3://no-such-bucket/ds"))
    s3.create_bucket(Bucket="empty")
    with pytest.raises(FileNotFoundError, match="s3://empty/nothing"):
        sluice.Loader(config("s3://empty/nothing"))


def test_an_object_changed_under_a_running_loader_is_refused_naming_it(
        s3, mixed: Path, tmp_path: Path) -> None:
    upload(s3, mixed, "changing", "ds")
    loader = sluice.Loader(config("s3://changing/ds", cache={"dir": str(tmp_path / "c"),
                                                             "capacity": "64K"}))
    # Same size, other bytes: the ETag changes, and every read carries the listed one (If-Match);
    # a store that ignores it is caught by the samples' checksums (tests/cache/cache_test.cc).
    shard = sorted(p for p in mixed.iterdir() if p.name.startswith("shard-"))[0]
    body = bytearray(shard.read_bytes())
    body[4096:4096 + 64] = bytes(64)
    s3.put_object(Bucket="changing", Key=f"ds/{shard.name}", Body=bytes(body))
    with pytest.raises(sluice.CorruptionError,
                       match=rf"s3://changing/ds/{shard.name} \[\d+\+\d+\]: the object changed at "
                             "the source since it was listed"):
        for _ in range(2):
            for _ in loader:
                pass


def test_tokens_file_in_a_bucket(s3, tmp_path: Path) -> None:
    tokens = np.arange(10_000, dtype=np.uint16)
    (tmp_path / "t").mkdir()
    tokens.tofile(tmp_path / "t" / "train.bin")
    upload(s3, tmp_path / "t", "tok", "set")
    cfg = config("s3://tok/set/train.bin", drop_last=False)
    cfg["dataset"].update({"format": "tokens", "seq_len": 100})
    seen = {}
    for batch in sluice.Loader(cfg):
        for j, i in enumerate(batch["index"].tolist()):
            seen[i] = batch["tokens"][j].numpy()
    assert len(seen) == 100
    for i, row in seen.items():
        assert np.array_equal(row, tokens[i * 100:(i + 1) * 100])


def test_a_single_tar_or_npy_object_reads_as_the_local_file_does(s3, tmp_path: Path) -> None:
    from test_sources import write_shards

    samples = write_shards(tmp_path / "wds", shards=1)
    array = np.arange(300 * 7, dtype=np.float32).reshape(300, 7)
    (tmp_path / "one").mkdir()
    np.save(tmp_path / "one" / "a201.npy", array)
    upload(s3, tmp_path / "wds", "single", "wds")
    upload(s3, tmp_path / "one", "single", "one")
    got = {}
    cfg = {"dataset": {"path": "s3://single/wds/shard-0000.tar"}, "batch_size": 10,
           "drop_last": False}
    for b in sluice.Loader(cfg, rank=0, world_size=1):
        jpg, jo = b["jpg"].numpy(), b["jpg_offsets"].numpy()
        for k, i in enumerate(b["index"].tolist()):
            got[i] = jpg[jo[k]:jo[k + 1]].tobytes()
    assert got == {i: s["jpg"] for i, s in enumerate(samples)}
    rows = {}
    cfg = {"dataset": {"path": "s3://single/one/a201.npy"}, "batch_size": 64, "drop_last": False}
    for b in sluice.Loader(cfg, rank=0, world_size=1):
        for k, i in enumerate(b["index"].tolist()):
            rows[i] = b["data"][k].numpy()
    assert sorted(rows) == list(range(300))
    assert all(np.array_equal(rows[i], array[i]) for i in rows)


def test_tokens_under_a_prefix_name_the_file_to_give(s3, tmp_path: Path) -> None:
    # A directory of token files is not one token array, locally or in a bucket: the error
    # names the file to give instead (a wrong count or EISDIR on the first batch before).
    (tmp_path / "t").mkdir()
    np.arange(10_000, dtype=np.uint16).tofile(tmp_path / "t" / "train.bin")
    upload(s3, tmp_path / "t", "tok", "dir")
    for path in ("s3://tok/dir", str(tmp_path / "t")):
        cfg = {"dataset": {"path": path, "format": "tokens", "seq_len": 100}, "batch_size": 4}
        with pytest.raises(ValueError, match=re.escape(
                f"{path}: format tokens reads one file, and this is a directory of train.bin: "
                f"give one file's path (dataset.path: {path}/train.bin)")):
            sluice.Loader(cfg)


@pytest.mark.parametrize("capacity", ["256K", "64M"])
def test_webdataset_tars_in_a_bucket(s3, tmp_path: Path, capacity: str) -> None:
    from test_sources import write_shards

    samples = write_shards(tmp_path / "wds")
    upload(s3, tmp_path / "wds", "wds", f"shards-{capacity}")
    cfg = {"dataset": {"path": f"s3://wds/shards-{capacity}"}, "batch_size": 16,
           "drop_last": False, "cache": {"dir": str(tmp_path / "cache"), "capacity": capacity}}
    for run in range(2):  # the second finds the first's cache (and the tar headers) again
        loader = sluice.Loader(cfg, rank=0, world_size=1)
        assert [f["name"] for f in loader.fields] == ["cls", "jpg", "json"]
        for _ in range(2):
            seen = []
            for b in loader:
                jpg, jo = b["jpg"].numpy(), b["jpg_offsets"].numpy()
                js, so = b["json"].numpy(), b["json_offsets"].numpy()
                for k, i in enumerate(b["index"].tolist()):
                    assert jpg[jo[k]:jo[k + 1]].tobytes() == samples[i]["jpg"], f"sample {i}"
                    assert js[so[k]:so[k + 1]].tobytes() == samples[i]["json"]
                    assert b["cls"][k].item() == i % 7
                seen += b["index"][~b["padding"]].tolist()
            assert sorted(seen) == list(range(len(samples)))
        if run == 1 and capacity == "64M":
            assert loader.stats()["source_bytes"] == 0, "the first run's samples were fetched again"
        del loader


def test_a_files_tree_in_a_bucket(s3, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    want = {}
    for c in ("cat", "dog"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for k in range(20):
            body = rng.integers(0, 256, int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()
            (tmp_path / "tree" / c / f"{k:03d}.bin").write_bytes(body)
            want[f"{c}/{k:03d}.bin"] = body
    upload(s3, tmp_path / "tree", "files", "tree")
    loader = sluice.Loader({"dataset": {"path": "s3://files/tree", "format": "files"},
                            "batch_size": 8, "drop_last": False,
                            "cache": {"dir": str(tmp_path / "cache"), "capacity": "32K"}},
                           rank=0, world_size=1)
    names = sorted(want)
    for _ in range(2):
        got = []
        for b in loader:
            data, off = b["data"].numpy(), b["data_offsets"].numpy()
            for j, i in enumerate(b["index"].tolist()):
                got.append(i)
                assert data[off[j]:off[j + 1]].tobytes() == want[names[i]], names[i]
                assert b["label"][j].item() == ["cat", "dog"].index(names[i].split("/")[0])
        assert sorted(got) == list(range(40))


def test_a_restart_after_the_object_was_rewritten_reads_the_new_bytes(s3, tmp_path: Path) -> None:
    # A token file has no checksums and its size stays: only the object's ETag tells.
    (tmp_path / "t").mkdir()
    cfg = config("s3://tok/rewritten/train.bin", drop_last=False,
                 cache={"dir": str(tmp_path / "cache"), "capacity": "1M"})
    cfg["dataset"].update({"format": "tokens", "seq_len": 100})
    for version in range(2):
        tokens = np.arange(10_000, dtype=np.uint16) + version
        tokens.tofile(tmp_path / "t" / "train.bin")
        upload(s3, tmp_path / "t", "tok", "rewritten")
        loader = sluice.Loader(cfg)
        rows = 0
        for batch in loader:
            for j, i in enumerate(batch["index"].tolist()):
                assert np.array_equal(batch["tokens"][j].numpy(), tokens[i * 100:(i + 1) * 100]), \
                    f"version {version}, window {i}"
                rows += 1
        assert rows == 100
        del loader


def test_the_memory_cache_of_a_killed_process_is_removed_by_the_next(bucket: str) -> None:
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    before = set(shm.glob("sluice-cache-*"))
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, sluice\n"
         f"loader = sluice.Loader({{'dataset': {{'path': '{bucket}'}}, 'batch_size': 4}},"
         " rank=0, world_size=1)\n"
         "next(iter(loader)); print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(os.environ,
                                                                PYTHONPATH=":".join(sys.path)))
    try:
        assert child.stdout.readline().strip() == b"ready"
        made = set(shm.glob("sluice-cache-*")) - before
        assert len(made) == 1, made
    finally:
        child.kill()  # SIGKILL: no destructor runs
        child.wait()
    (left,) = made
    assert left.exists()
    old = time.time() - 60  # its lock was taken long ago
    os.utime(left / "lock", (old, old))
    loader = sluice.Loader(config(bucket, drop_last=False))
    next(iter(loader))
    assert not left.exists(), "a killed process's memory cache was left behind"
    del loader


RANK_CHILD = r"""
import json, sys
import numpy as np
import sluice
from conftest import sample_fields
rank, epochs, pause, cfg = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
loader = sluice.Loader(cfg, rank=rank, world_size=2)
seen, batches = [], 0
for epoch in range(epochs):
    for batch in loader:
        data, offsets = batch["data"], batch["data_offsets"]
        for j, i in enumerate(batch["index"].tolist()):
            assert np.array_equal(data[offsets[j]:offsets[j + 1]].numpy(), sample_fields(i)["data"]), i
            seen.append(i)
        batches += 1
        if batches == pause:
            print("paused", flush=True)
            sys.stdin.readline()
print(json.dumps({"seen": seen, **loader.stats()}), flush=True)
"""


def rank_process(rank: int, epochs: int, cfg: dict, pause: int = -1) -> subprocess.Popen:
    env = dict(os.environ, LOCAL_WORLD_SIZE="2",
               PYTHONPATH=":".join([str(Path(__file__).parent), *sys.path]))
    return subprocess.Popen([sys.executable, "-c", RANK_CHILD, str(rank), str(epochs), str(pause),
                             json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().splitlines()[-1])


def test_the_ranks_of_a_node_share_one_cache(bucket: str, s3, tmp_path: Path) -> None:
    """Two rank processes over one cache.dir that holds the dataset, reading side by side: each
    sample comes from the source once for both over 3 epochs (with a cache per rank, each
    fetches what the other read in the epochs before). fetch_size 0: no gap bytes counted."""
    stored = sum(o["Size"] for o in s3.list_objects_v2(Bucket="train", Prefix="mixed/")["Contents"])
    cfg = config(bucket, drop_last=False, cache={"dir": str(tmp_path / "cache"), "capacity": "64M",
                                                 "fetch_size": 0})
    ranks = [rank_process(r, 3, cfg, pause=1) for r in (0, 1)]
    for p in ranks:  # both open before either reads on
        assert p.stdout.readline().strip() == b"paused"
    for p in ranks:
        p.stdin.write(b"go\n")
        p.stdin.flush()
    stats = [finish(p) for p in ranks]
    for epoch in range(3):
        got = []
        for s in stats:
            share = len(s["seen"]) // 3
            got += s["seen"][epoch * share:(epoch + 1) * share]
        assert sorted(set(got)) == list(range(N))
    fetched = [s["source_bytes"] for s in stats]
    assert sum(fetched) <= stored, (fetched, stored)
    assert sum(s["cache_hits"] for s in stats) > 2 * N


def test_a_rank_killed_while_it_fetches_for_the_node_is_taken_over(bucket: str,
                                                                   tmp_path: Path) -> None:
    """The first rank process leads (fetches and evicts for both); killed with -9 in the middle
    of the other's epoch, the other takes the fetching over and delivers every sample."""
    cfg = config(bucket, drop_last=False, cache={"dir": str(tmp_path / "cache"), "capacity": "1M"})
    first = rank_process(0, 1, cfg, pause=1)
    try:
        assert first.stdout.readline().strip() == b"paused"
        second = rank_process(1, 2, cfg, pause=4)
        assert second.stdout.readline().strip() == b"paused"
    finally:
        first.kill()
        first.wait()
    second.stdin.write(b"go\n")
    second.stdin.flush()
    stats = finish(second)
    share = len(stats["seen"]) // 2
    assert len(stats["seen"]) == 2 * share and share >= N // 2
    for epoch in range(2):
        assert len(set(stats["seen"][epoch * share:(epoch + 1) * share])) == share
