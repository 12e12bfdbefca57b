"""sluice.checkpoint.Writer / Reader under torch.distributed.checkpoint, as users call it:
dcp.save / dcp.async_save / dcp.load, torchrun with two ranks saving a sharded DTensor and one
process loading it, a flipped byte, a save killed with SIGKILL at random points, copies on a peer
(`sluice serve --checkpoint-dir`) restored after the local copy is gone."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

import sluice  # noqa: E402
import sluice.checkpoint  # noqa: E402
from sluice.checkpoint import Reader, Writer  # noqa: E402

CLI = Path(__file__).resolve().parents[2] / "build" / "sluice"


def state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(300, 257, generator=g),
            "b": torch.randn(257, generator=g).to(torch.bfloat16),
            "steps": torch.randint(0, 1 << 40, (33,), generator=g),
            "mask": torch.rand(1000, generator=g) > 0.5,
            "scalar": torch.tensor(seed * 1.5),
        },
        "step": seed,
        "notes": ["anything", {"pickled": True}],
    }


def empty_like(s: dict) -> dict:
    m = s["model"]
    return {"model": {k: torch.zeros_like(v) for k, v in m.items()}, "step": -1,
            "notes": ["", {"pickled": False}]}  # DCP loads in place: the same structure


def assert_same(a: dict, b: dict) -> None:
    for k, v in a["model"].items():
        assert b["model"][k].dtype == v.dtype, k
        assert torch.equal(b["model"][k], v), k
    assert b["step"] == a["step"] and b["notes"] == a["notes"]


def dcp_error(fn) -> BaseException:
    """The error a DCP call raised on this rank: DCP wraps every rank's failure in a
    CheckpointException (failures: rank -> (exception, traceback))."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        fn()
    except CheckpointException as e:
        return e.failures[0][0]
    except Exception as e:
        return e
    raise AssertionError("no error")


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    want = state(1)
    dcp.save(want, storage_writer=Writer(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / ".metadata").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    got = empty_like(want)
    dcp.load(got, storage_reader=Reader(tmp_path / "ckpt"))
    assert_same(want, got)


def test_a_second_save_replaces_the_first_and_checkpoint_id_works(tmp_path: Path) -> None:
    w = Writer()
    dcp.save(state(1), storage_writer=w, checkpoint_id=tmp_path / "ckpt")
    dcp.save(state(2), storage_writer=w, checkpoint_id=tmp_path / "ckpt")
    assert w.last_result["bytes"] > 300 * 257 * 4
    got = empty_like(state(2))
    dcp.load(got, storage_reader=Reader(), checkpoint_id=tmp_path / "ckpt")
    assert_same(state(2), got)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_async_save(tmp_path: Path) -> None:
    want = state(3)
    future = dcp.async_save(want, storage_writer=Writer(tmp_path / "ckpt"))
    future.result()
    got = empty_like(want)
    dcp.load(got, storage_reader=Reader(tmp_path / "ckpt"))
    assert_same(want, got)


def test_a_flipped_byte_fails_naming_file_and_tensor(tmp_path: Path) -> None:
    dcp.save(state(4), storage_writer=Writer(tmp_path / "ckpt"))
    data = tmp_path / "ckpt" / "rank-00000.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01  # inside the first tensor written
    data.write_bytes(bytes(raw))
    err = dcp_error(lambda: dcp.load(empty_like(state(4)),
                                     storage_reader=Reader(tmp_path / "ckpt")))
    assert isinstance(err, sluice.CorruptionError), repr(err)
    assert re.search(r"rank-00000\.data: part model\.\w+ .*checksum mismatch", str(err)), err


def test_a_truncated_file_fails_naming_it(tmp_path: Path) -> None:
    dcp.save(state(5), storage_writer=Writer(tmp_path / "ckpt"))
    data = tmp_path / "ckpt" / "rank-00000.data"
    os.truncate(data, data.stat().st_size // 2)
    err = dcp_error(lambda: dcp.load(empty_like(state(5)),
                                     storage_reader=Reader(tmp_path / "ckpt")))
    assert isinstance(err, sluice.CorruptionError), repr(err)
    assert re.search(r"rank-00000\.data: part .*truncated", str(err)), err


def test_the_helpers_raise_what_the_readme_says_to_catch(tmp_path: Path) -> None:
    # dcp.load raises CheckpointException, a BaseException: `except Exception` misses it.
    sluice.checkpoint.save(state(8), tmp_path / "ckpt")
    got = empty_like(state(8))
    sluice.checkpoint.load(got, tmp_path / "ckpt")
    assert_same(state(8), got)
    data = tmp_path / "ckpt" / "rank-00000.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    try:
        sluice.checkpoint.load(empty_like(state(8)), tmp_path / "ckpt")
        raise AssertionError("a flipped byte went unnoticed")
    except sluice.CorruptionError as e:
        assert "rank-00000.data: part model." in str(e), e
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        sluice.checkpoint.load(empty_like(state(8)), tmp_path / "nothing")


def test_no_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    err = dcp_error(lambda: dcp.load(empty_like(state(1)),
                                     storage_reader=Reader(tmp_path / "nothing")))
    # DCP rewords a failed metadata read (AssertionError) around ours.
    assert "nothing: no checkpoint here (no .metadata" in str(err), repr(err)


KILLED_SAVER = textwrap.dedent("""
    import sys, torch, torch.distributed.checkpoint as dcp
    from sluice.checkpoint import Writer
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint import state
    big = state(7)
    big["model"]["big"] = torch.full((8 << 20,), 7.0)
    print("ready", flush=True)
    while True:
        dcp.save(big, storage_writer=Writer(sys.argv[1]))
""")


def test_a_save_killed_at_random_points_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    old = state(6)
    old["model"]["big"] = torch.full((8 << 20,), 6.0)
    dcp.save(old, storage_writer=Writer(ckpt))
    rng = random.Random(5)
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(ckpt),
                                  str(Path(__file__).parent)], stdout=subprocess.PIPE)
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        got = empty_like(old)
        dcp.load(got, storage_reader=Reader(ckpt))
        fill = float(got["model"]["big"][0])
        assert fill in (6.0, 7.0)
        assert torch.equal(got["model"]["big"], torch.full((8 << 20,), fill)), "a mix of saves"
        assert got["step"] == int(fill)
    dcp.save(old, storage_writer=Writer(ckpt))  # clears what the killed saves left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_save_killed_under_a_new_name_is_cleared_by_the_next_save_beside_it(
        tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    dcp.save(state(2), storage_writer=Writer(ck / "step-2"))
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(ck / "step-4"),
                              str(Path(__file__).parent)], stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 60
    while not list(ck.glob(".step-4.partial-*")):  # killed mid-save: its staging is there
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    live = sluice._C.make_partial_checkpoint_dir(str(ck / "step-5"))  # a save still running
    umask = os.umask(0o022)
    try:
        dcp.save(state(6), storage_writer=Writer(ck / "step-6"))
    finally:
        os.umask(umask)
    assert sorted(p.name for p in ck.iterdir()) == sorted(
        [Path(live.path).name, "step-2", "step-6"])
    assert (ck / "step-6").stat().st_mode & 0o777 == 0o755, "DCP's own are 0755 under umask 022"
    live.release()
    got = empty_like(state(6))
    dcp.load(got, storage_reader=Reader(ck / "step-6"))
    assert_same(state(6), got)


TORCHRUN_SAVER = textwrap.dedent("""
    import gc, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from sluice.checkpoint import Writer
    replica = dict(zip(("replica", "token_file"), sys.argv[2:4]))
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(64 * 1000, dtype=torch.float32).reshape(64, 1000)
    sharded = distribute_tensor(full, mesh, [Shard(0)])
    w = Writer(sys.argv[1], **replica)
    dcp.save({"w": sharded, "step": 9}, storage_writer=w)
    assert w.last_result["bytes"] >= 32 * 1000 * 4, w.last_result
    assert w.last_result.get("replica_error", "") == "", w.last_result
    # Gloo's worker threads end only when the last reference to the group goes (the mesh and
    # the DTensor hold it); one still running at exit drops a finished broadcast's tensors
    # without the GIL and aborts the process ("terminate called without an active exception").
    del sharded, mesh
    dist.destroy_process_group()
    gc.collect()
""")


@pytest.fixture
def replica(tmp_path: Path):
    """A `sluice serve --checkpoint-dir` on loopback: (address, token file, its directory)."""
    token_file = tmp_path / "token"
    token_file.write_text("checkpoint-copies\n")
    store = tmp_path / "peer"
    proc = subprocess.Popen([str(CLI), "serve", "--checkpoint-dir", str(store), "--listen",
                             "127.0.0.1:0", "--token-file", str(token_file), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "" when it exits instead
        assert line, f"sluice serve exited: {proc.stderr.read()}"
        yield json.loads(line)["address"], token_file, store
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_two_ranks_under_torchrun_save_and_one_process_loads(tmp_path: Path, replica) -> None:
    address, token_file, store = replica
    script = tmp_path / "save.py"
    script.write_text(TORCHRUN_SAVER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", str(script), str(tmp_path / "ckpt"), address,
                          str(token_file)],
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == [".metadata", "rank-00000.data", "rank-00001.data"], files
    # Each rank's file and the metadata, published together on the peer.
    name = sluice._C.checkpoint_copy_name(str(tmp_path / "ckpt"))
    assert name.startswith("ckpt-")
    assert sorted(p.name for p in store.iterdir()) == [name]
    for f in files:
        assert (store / name / f).read_bytes() == (tmp_path / "ckpt" / f).read_bytes(), f
    want = torch.arange(64 * 1000, dtype=torch.float32).reshape(64, 1000)
    got = {"w": torch.zeros(64, 1000), "step": 0}
    dcp.load(got, storage_reader=Reader(tmp_path / "ckpt"))  # another world size: resharded
    assert torch.equal(got["w"], want)
    assert got["step"] == 9
    # The node is replaced: its disk is empty; the reader fetches the copy.
    import shutil
    shutil.rmtree(tmp_path / "ckpt")
    got = {"w": torch.zeros(64, 1000), "step": 0}
    dcp.load(got, storage_reader=Reader(tmp_path / "ckpt", replica=address,
                                        token_file=token_file))
    assert torch.equal(got["w"], want) and got["step"] == 9
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == files


def test_a_replica_that_is_down_or_refuses_costs_the_copy_not_the_save(tmp_path: Path,
                                                                       replica) -> None:
    address, token_file, store = replica
    s = state(5)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"127.0.0.1:{sock.getsockname()[1]}"
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    for peer, tf in ((down, token_file), (address, wrong)):
        w = Writer(tmp_path / "ckpt", replica=peer, token_file=tf, replica_timeout_ms=3000)
        with pytest.warns(RuntimeWarning, match=f"its copy on {peer} is missing"):
            dcp.save(s, storage_writer=w)
        assert peer in w.last_result["replica_error"], w.last_result
        got = empty_like(s)
        dcp.load(got, storage_reader=Reader(tmp_path / "ckpt"))
        assert_same(s, got)
    assert list(store.iterdir()) == []
    # No copy anywhere: a restore says which peer had none.
    import shutil
    shutil.rmtree(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match=f"ckpt-[0-9a-f]{{16}} on peer {address}"):
        Reader(tmp_path / "ckpt", replica=address, token_file=token_file).read_metadata()


def test_loader_stats_report_checkpoint_writes(mixed: Path, tmp_path: Path) -> None:
    from conftest import config

    loader = sluice.Loader(config(mixed, drop_last=False))
    next(iter(loader))
    w = Writer(tmp_path / "ckpt")
    dcp.save(state(8), storage_writer=w)
    stats = loader.stats()
    assert stats["checkpoint_bytes"] >= w.last_result["bytes"] > 0
    assert stats["checkpoint_held_seconds"] >= 0
