"""sluice.Loader from Python: contents, exactly-once, resume, lifetime, errors, threads."""

from __future__ import annotations

import errno
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import sluice
from conftest import FIELDS, N, config, sample_fields


def real_indices(batch: dict[str, torch.Tensor]) -> list[int]:
    index = batch["index"]
    if "padding" in batch:
        index = index[~batch["padding"]]
    return index.tolist()


def check_batch(batch: dict[str, torch.Tensor]) -> None:
    """Every field of every sample equals what was written."""
    n = batch["index"].numel()
    assert batch["label"].shape == (n,) and batch["label"].dtype == torch.int64
    assert batch["feat"].shape == (n, 3, 4) and batch["feat"].dtype == torch.float32
    assert batch["mask"].shape == (n, 5) and batch["mask"].dtype == torch.bool
    assert batch["data"].dtype == torch.uint8 and batch["data"].dim() == 1
    assert batch["tokens"].dtype == torch.int32
    assert batch["data_offsets"].shape == (n + 1,)
    for k, i in enumerate(batch["index"].tolist()):
        want = sample_fields(i)
        lo, hi = batch["data_offsets"][k : k + 2].tolist()
        assert np.array_equal(batch["data"][lo:hi].numpy(), want["data"]), i
        lo, hi = batch["tokens_offsets"][k : k + 2].tolist()
        assert np.array_equal(batch["tokens"][lo:hi].numpy(), want["tokens"]), i
        assert batch["label"][k].item() == want["label"]
        assert np.array_equal(batch["feat"][k].numpy(), want["feat"])
        assert np.array_equal(batch["mask"][k].numpy(), want["mask"])


def epoch_indices(loader: sluice.Loader) -> list[int]:
    out: list[int] = []
    for batch in loader:
        out += real_indices(batch)
    return out


def test_fields_dtypes_shapes_and_bytes(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed), rank=0, world_size=1)
    assert [f["name"] for f in loader.fields] == [f["name"] for f in FIELDS]
    batches = 0
    for batch in loader:
        check_batch(batch)
        batches += 1
    assert batches == len(loader) == N // 32


def test_numpy_output_and_dlpack(mixed: Path) -> None:
    """output="numpy": the same batches as numpy arrays (views: no copy); torch tensors and
    numpy arrays both export DLPack, which is how JAX (jax.numpy.from_dlpack) takes them."""
    as_torch = list(sluice.Loader(config(mixed), rank=0, world_size=1))
    as_numpy = list(sluice.Loader(config(mixed), rank=0, world_size=1, output="numpy"))
    assert len(as_numpy) == len(as_torch) == N // 32
    for t, a in zip(as_torch, as_numpy):
        assert set(t) == set(a)
        for key in t:
            assert isinstance(a[key], np.ndarray) and not a[key].flags.owndata
            assert a[key].dtype == t[key].numpy().dtype and np.array_equal(a[key], t[key].numpy())
    batch = as_numpy[0]
    held = batch["feat"]
    del as_numpy, batch
    gc.collect()
    assert np.array_equal(held, as_torch[0]["feat"].numpy())  # the array keeps its buffer alive
    for value in (as_torch[0]["data"], held):
        assert np.array_equal(np.from_dlpack(value), np.asarray(value))
        assert value.__dlpack_device__()[0] == 1  # kDLCPU
    with pytest.raises(ValueError, match='output must be "torch" or "numpy"'):
        sluice.Loader(config(mixed), output="jax")


@pytest.mark.parametrize("world_size", [1, 3, 4])
@pytest.mark.parametrize("drop_last", [True, False])
def test_every_sample_exactly_once_across_ranks(mixed: Path, world_size: int, drop_last: bool) -> None:
    seen: Counter[int] = Counter()
    lengths = set()
    for rank in range(world_size):
        loader = sluice.Loader(config(mixed, drop_last=drop_last), rank=rank, world_size=world_size)
        lengths.add(len(loader))
        indices = epoch_indices(loader)
        seen.update(indices)
    assert len(lengths) == 1, "every rank gets the same number of batches"
    assert all(c == 1 for c in seen.values())
    if drop_last:
        assert len(seen) == (N // (32 * world_size)) * 32 * world_size
    else:
        assert sorted(seen) == list(range(N))


def test_same_seed_same_order_and_epochs_differ(mixed: Path) -> None:
    a = sluice.Loader(config(mixed, drop_last=False))
    b = sluice.Loader(config(mixed, drop_last=False))
    first = epoch_indices(a)
    assert first == epoch_indices(b)
    second = epoch_indices(a)  # the next loop is the next epoch
    assert a.epoch == 1 and sorted(second) == sorted(first) and second != first
    b.set_epoch(1)
    assert epoch_indices(b) == second


def test_state_dict_resume_delivers_exactly_the_rest(mixed: Path, tmp_path: Path) -> None:
    full = epoch_indices(sluice.Loader(config(mixed)))
    loader = sluice.Loader(config(mixed))
    got: list[int] = []
    for k, batch in enumerate(loader):
        got += real_indices(batch)
        if k == 9:
            break
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    del loader
    resumed = sluice.Loader(config(mixed))
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    rest = epoch_indices(resumed)
    assert got + rest == full


def test_elastic_resume_on_another_world_size(mixed: Path) -> None:
    # Two ranks consume 5 batches each, then the job resumes on three ranks.
    before: list[int] = []
    states = []
    for rank in range(2):
        loader = sluice.Loader(config(mixed, drop_last=False), rank=rank, world_size=2)
        for k, batch in enumerate(loader):
            before += real_indices(batch)
            if k == 4:
                break
        states.append(loader.state_dict())
    assert states[0] == states[1]
    after: list[int] = []
    for rank in range(3):
        loader = sluice.Loader(config(mixed, drop_last=False), rank=rank, world_size=3)
        loader.load_state_dict(states[0])
        after += epoch_indices(loader)
    assert sorted(before + after) == list(range(N))


def test_state_of_another_dataset_or_seed_is_refused(mixed: Path, fixed: Path) -> None:
    state = sluice.Loader(config(mixed)).state_dict()
    with pytest.raises(ValueError, match="num_samples"):
        sluice.Loader(config(fixed)).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        sluice.Loader(config(mixed, seed=8)).load_state_dict(state)
    with pytest.raises(ValueError, match="not a sluice state"):
        sluice.Loader(config(mixed)).load_state_dict({"epoch": 1})


def test_stats_say_where_the_time_went(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed), rank=0, world_size=1)
    for _ in loader:
        pass
    s = loader.stats()
    assert s["io_completions"] > 0 and s["cpu_seconds"] > 0
    assert len(s["io_inflight_hist"]) == 10 and abs(sum(s["io_inflight_hist"]) - 1) < 1e-9
    assert s["io_idle_fraction"] == s["io_inflight_hist"][0]
    assert 0 < s["io_inflight_mean"]
    assert set(s["stage_seconds"]) == {"window", "buffer", "plan", "cache", "read", "remote",
                                       "assemble", "device"}
    assert s["stage_seconds"]["read"] > 0


def test_tensors_are_views_that_outlive_the_loader(fixed: Path) -> None:
    loader = sluice.Loader(config(fixed, batch_size=64))
    batch = next(iter(loader))
    data = batch["data"]
    assert data.shape == (64, 4096)
    assert data.data_ptr() % 64 == 0
    # Zero copy: the tensor is the loader's buffer, so every tensor made from this batch
    # shares one allocation and nothing was copied to make it.
    assert data.untyped_storage().nbytes() == 64 * 4096
    assert loader.stats()["batches_held"] == 1
    indices = batch["index"].clone()
    del batch, loader
    gc.collect()
    for k, i in enumerate(indices.tolist()):
        assert torch.all(data[k] == i % 251)


def test_buffers_return_to_the_pool_when_the_last_tensor_dies(fixed: Path) -> None:
    loader = sluice.Loader(config(fixed, batch_size=64))
    it = iter(loader)
    held = [next(it) for _ in range(5)]
    index_only = [b["index"] for b in held]  # small metadata does not pin buffers
    assert loader.stats()["batches_held"] == 5
    data = held[2]["data"]
    del held
    gc.collect()
    assert loader.stats()["batches_held"] == 1  # the batch `data` still views
    del data
    gc.collect()
    assert loader.stats()["batches_held"] == 0
    assert len(index_only) == 5


def test_holding_too_many_batches_applies_back_pressure(fixed: Path) -> None:
    loader = sluice.Loader(config(fixed, batch_size=16, max_batches_held=4, prefetch=2,
                                  io={"timeout_ms": 300, "threads": 2}))
    held = []
    with pytest.raises(OSError, match="holds 5 batches \\(max_batches_held: 4\\) and asks for another"):
        for batch in loader:
            held.append(batch["data"])
    assert len(held) == 5  # failed at once when a sixth was asked for, not after a timeout
    del held, batch
    gc.collect()
    assert loader.stats()["batches_held"] == 0


def test_iterating_from_a_second_thread(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed))
    out: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.extend(epoch_indices(loader))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive() and not errors
    assert sorted(out) == sorted(epoch_indices(sluice.Loader(config(mixed))))


def test_rank_and_world_size_from_the_environment(mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    loader = sluice.Loader(config(mixed))
    assert (loader.rank, loader.world_size, loader.local_rank) == (1, 2, 1)
    assert epoch_indices(loader) == epoch_indices(sluice.Loader(config(mixed), rank=1, world_size=2))


def test_config_file_and_overrides(mixed: Path, tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(f"dataset: {{path: {mixed}}}\nbatch_size: 10\n")
    loader = sluice.Loader(tmp_path / "c.yaml", batch_size=50, shuffle={"mode": "none"},
                           **{"io.threads": 1})
    assert len(loader) == N // 50
    assert epoch_indices(loader) == list(range(N // 50 * 50))


def test_keyword_values_are_typed_not_yaml(mixed: Path, tmp_path: Path) -> None:
    # A path that reads as YAML (a mapping, a list, a comment) stays a path.
    odd = tmp_path / "ds: [x] #y"
    odd.symlink_to(mixed)
    loader = sluice.Loader({"batch_size": 32}, dataset=odd, seed=np.uint64(7), drop_last=np.bool_(True),
                           io={"threads": np.int32(1)})
    assert len(loader) == N // 32 and loader.dataset_path == str(odd)
    with pytest.raises(TypeError, match=r"sluice.Loader: seed: object is not a config value"):
        sluice.Loader(config(mixed), seed=object())
    with pytest.raises(ValueError, match=r'override: batch_size: expected a positive integer, got "1.5"'):
        sluice.Loader(config(mixed), batch_size=1.5)


def test_config_errors_are_value_errors(mixed: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='shuffle.mode: unknown value "globl"'):
        sluice.Loader(config(mixed), shuffle={"mode": "globl"})
    with pytest.raises(ValueError, match="batch_sise"):
        sluice.Loader(config(mixed), batch_sise=3)
    (tmp_path / "bad.yaml").write_text(f"dataset: {{path: {mixed}}}\nprefetch: 0\n")
    with pytest.raises(ValueError, match=r"bad.yaml:2: prefetch"):
        sluice.Loader(tmp_path / "bad.yaml")
    with pytest.raises(TypeError):
        sluice.Loader(42)  # type: ignore[arg-type]


def test_keyword_overrides_of_sections_say_what_they_expect(mixed: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r'shuffle: expected a mapping of mode, .* got "none"'):
        sluice.Loader(config(mixed), shuffle="none")
    with pytest.raises(ValueError, match=r"io: expected a mapping of engine, .* got nothing"):
        sluice.Loader(config(mixed), io=None)
    # dataset=PATH is the shorthand for dataset.path, as a keyword and in a dict or YAML file.
    assert len(sluice.Loader({"batch_size": 32}, dataset=str(mixed))) == N // 32
    assert len(sluice.Loader({"dataset": str(mixed), "batch_size": 32})) == N // 32
    (tmp_path / "short.yaml").write_text(f"dataset: {mixed}\nbatch_size: 32\n")
    assert len(sluice.Loader(tmp_path / "short.yaml")) == N // 32
    with pytest.raises(ValueError, match=r"a directory, not a config file"):
        sluice.Loader(mixed)
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ValueError, match=r"deep.yaml:1:\d+: invalid YAML: nested too deeply"):
        sluice.Loader(tmp_path / "deep.yaml")


def test_missing_dataset_and_config_are_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        sluice.Loader({"dataset": {"path": str(tmp_path / "nope")}})
    assert e.value.errno == errno.ENOENT and "nope" in str(e.value)
    with pytest.raises(FileNotFoundError):
        sluice.Loader(tmp_path / "missing.yaml")


def test_os_errors_carry_errno(mixed: Path, tmp_path: Path) -> None:
    # A shard that is a directory: reading it fails with EISDIR, named with the path.
    copy = tmp_path / "ds"
    copy.mkdir()
    for f in mixed.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = sorted(copy.glob("shard-*.sluice"))[0]
    shard.unlink()
    shard.mkdir()
    with pytest.raises(OSError) as e:
        sluice.Loader(config(copy))
    assert e.value.errno == errno.EISDIR and shard.name in str(e.value)


def test_corruption_is_a_corruption_error_naming_the_sample(mixed: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ds"
    copy.mkdir()
    for f in mixed.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    ds = sluice.Dataset(str(copy))
    path, offset, size = ds.extent(123)
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    loader = sluice.Loader(config(copy, shuffle={"mode": "none"}, batch_size=100))
    with pytest.raises(sluice.CorruptionError, match="sample 123"):
        for _ in loader:
            pass
    assert issubclass(sluice.CorruptionError, RuntimeError)


def test_unsupported_device_is_a_clear_error(mixed: Path) -> None:
    with pytest.raises(RuntimeError, match="device"):
        sluice.Loader(config(mixed, device="cuda:0"))


def test_use_after_fork_is_refused(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed))
    pid = os.fork()
    if pid == 0:
        try:
            next(iter(loader))
            os._exit(1)
        except RuntimeError as e:
            os._exit(0 if "forked" in str(e) else 2)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(epoch_indices(loader)) > 0  # the parent's loader is unaffected


def test_close_and_context_manager(mixed: Path) -> None:
    with sluice.Loader(config(mixed)) as loader:
        batch = next(iter(loader))
    with pytest.raises(ValueError, match="after close"):
        next(iter(loader))
    check_batch(batch)


def test_ctrl_c_interrupts_a_blocked_wait_promptly(fixed: Path, tmp_path: Path) -> None:
    # Shard 0 lives only on a "peer" that accepts connections and never answers, with a 60 s
    # peer timeout: the wait for the first batch is a long one, and SIGINT must end it with
    # KeyboardInterrupt at once.
    local = tmp_path / "ds"
    local.mkdir()
    for f in fixed.iterdir():
        if f.name != "shard-00000.sluice":
            os.symlink(f, local / f.name)
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(f"""
        import signal, socket, sys, sluice
        # A background job's shell leaves SIGINT ignored, and Python then raises no
        # KeyboardInterrupt: take the interactive default back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
        peer = "127.0.0.1:%d" % silent.getsockname()[1]
        loader = sluice.Loader({{"dataset": {{"path": {str(local)!r}}}, "batch_size": 16,
                                "shuffle": {{"mode": "none"}}, "io": {{"threads": 1}},
                                "distributed": {{"peers": [{{"address": peer, "shards": [0]}}],
                                                "token": "t", "peer_timeout_ms": 60000}}}})
        try:
            print(silent.getsockname()[1], flush=True)
            next(iter(loader))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(42)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ})
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    # In the wait once its loader thread has connected to the silent peer (next() started it).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ss = subprocess.run(["ss", "-tnp", "state", "established", f"( dport = :{port} )"],
                            capture_output=True, text=True).stdout
        if f"pid={proc.pid}," in ss:
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the loader never connected to the silent peer")
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=5)
    finally:
        proc.kill()
    assert code == 42
    assert "interrupted" in proc.stdout.read()


def test_dataset_reader_and_writer(mixed: Path, tmp_path: Path) -> None:
    ds = sluice.Dataset(str(mixed))
    assert len(ds) == N and len(ds.shards) > 1
    s = ds.sample(5)
    assert s["data"] == sample_fields(5)["data"].tobytes()
    with pytest.raises(ValueError, match="sample 1000 out of range"):
        ds.extent(N)
    # A writer that fails leaves no dataset behind.
    dest = tmp_path / "partial"
    with pytest.raises(RuntimeError):
        with sluice.DatasetWriter(str(dest), FIELDS) as w:
            w.add(sample_fields(0))
            raise RuntimeError("stop")
    assert not dest.exists()
    with pytest.raises(ValueError, match="unknown dtype"):
        sluice.DatasetWriter(str(dest), [{"name": "x", "dtype": "float128"}])


def test_writer_fields_as_a_dict_of_dtype_and_shape(tmp_path: Path) -> None:
    fields = {"image": ("uint8", [-1]), "label": ("int64", []), "box": (np.dtype("float32"), [4])}
    with sluice.DatasetWriter(str(tmp_path / "d"), fields) as w:
        w.add({"image": b"abc", "label": 7, "box": np.ones(4, np.float32)})
    ds = sluice.Dataset(str(tmp_path / "d"))
    assert [(f["name"], f["dtype"], f["shape"]) for f in ds.fields] == [
        ("image", "uint8", [-1]), ("label", "int64", []), ("box", "float32", [4])]
    with pytest.raises(TypeError, match=r"a dict \{name: \(dtype, shape\)\}"):
        sluice.DatasetWriter(str(tmp_path / "e"), {"x": "uint8"})


def test_a_dataset_smaller_than_a_global_batch_says_every_epoch_is_empty(
        mixed: Path, capfd: pytest.CaptureFixture) -> None:
    loader = sluice.Loader(config(mixed, batch_size=N + 1, drop_last=True))
    assert len(loader) == 0 and list(loader) == []
    assert (f"drop_last: true and {N} samples, fewer than one global batch of {N + 1}"
            in capfd.readouterr().err)


def test_one_epoch_per_loop_whatever_the_previous_loop_did(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed))
    n = len(loader)
    assert loader.batches_left == n
    first = [b["index"] for b in loader]
    assert len(first) == n and loader.batches_left == n  # the next loop is a whole epoch
    # A loop that stops right after the last batch (as Lightning does, never asking for more).
    it = iter(loader)
    second = [next(it)["index"] for _ in range(n)]
    assert loader.epoch == 1
    third = list(b["index"] for b in loader)  # the next loop: epoch 2, no batch of epoch 1
    assert len(third) == n and loader.epoch == 2
    assert len(second) == n
    del it
    # A loop broken off mid-epoch: the next loop delivers the rest of that epoch only.
    for k, _ in enumerate(loader):
        if k == 4:
            break
    assert loader.batches_left == n - 5
    assert len(list(b["index"] for b in loader)) == n - 5


def test_a_second_loop_or_set_epoch_inside_a_loop_raises(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed))
    it = iter(loader)
    next(it)
    with pytest.raises(RuntimeError, match="already running"):
        next(iter(loader))
    with pytest.raises(RuntimeError, match=r"set_epoch\(5\) inside a loop over epoch 0"):
        loader.set_epoch(5)
    with pytest.raises(RuntimeError, match="inside a running loop"):
        loader.load_state_dict(loader.state_dict())
    rest = list(it)  # the first loop goes on, unharmed
    assert len(rest) == len(loader) - 1
    loader.set_epoch(5)  # between loops: fine
    assert loader.epoch == 5


def test_threads_sharing_one_loader_get_an_error_not_a_shared_stream(mixed: Path) -> None:
    loader = sluice.Loader(config(mixed))
    started = threading.Barrier(4)
    results: list[object] = []

    def run() -> None:
        started.wait()
        try:
            results.append(len([b["index"] for b in loader]))
        except RuntimeError as e:
            results.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    counts = [r for r in results if isinstance(r, int)]
    errors = [r for r in results if isinstance(r, RuntimeError)]
    assert len(results) == 4
    # Each loop that ran delivered a whole epoch; the others were refused, not interleaved.
    assert all(c == len(loader) for c in counts) and counts
    assert all("already running" in str(e) for e in errors)


def test_set_epoch_after_load_state_dict_keeps_the_resumed_place(mixed: Path) -> None:
    full = epoch_indices(sluice.Loader(config(mixed)))
    loader = sluice.Loader(config(mixed))
    got: list[int] = []
    for k, batch in enumerate(loader):
        got += real_indices(batch)
        if k == 6:
            break
    state = loader.state_dict()
    resumed = sluice.Loader(config(mixed))
    resumed.load_state_dict(state)
    assert len(resumed) == len(loader) and resumed.batches_left == len(loader) - 7
    resumed.set_epoch(state["epoch"])  # what Lightning and `for epoch in range(start, ...)` do
    assert got + epoch_indices(resumed) == full
    resumed.set_epoch(0)  # not right after a load: the epoch starts over
    assert epoch_indices(resumed) == full


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1", None, [3]])
def test_load_state_dict_refuses_what_is_not_a_position(mixed: Path, bad: object) -> None:
    loader = sluice.Loader(config(mixed))
    state = loader.state_dict()
    state["position"] = bad
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict(state)
    state["position"] = np.int64(32)  # numpy and torch integers are integers
    loader.load_state_dict(state)
    state["position"] = torch.tensor(32)
    loader.load_state_dict(state)


def test_import_sluice_makes_sluice_torch_reachable_without_importing_torch() -> None:
    code = ("import sys, sluice; assert 'torch' not in sys.modules; "
            "ds = sluice.torch.IterableDataset; assert 'torch' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_writer_takes_numbers_tensors_and_strided_arrays_and_checks_dtype_and_shape(
        tmp_path: Path) -> None:
    fields = [{"name": "x", "dtype": "float32", "shape": [3]},
              {"name": "label", "dtype": "int64", "shape": []},
              {"name": "data", "dtype": "uint8", "shape": [-1]}]
    base = np.arange(12, dtype=np.float32)
    samples = [
        {"x": base[::4], "label": 7, "data": b"abc"},                       # strided, a Python int
        {"x": torch.tensor([1.0, 2.0, 3.0]), "label": np.int64(8),          # a tensor, numpy scalar
         "data": torch.arange(5, dtype=torch.uint8)},
        {"x": base.reshape(3, 4)[:, 1], "label": torch.tensor(9), "data": np.zeros(0, np.uint8)},
    ]
    with sluice.DatasetWriter(str(tmp_path / "ds"), fields) as w:
        for s in samples:
            w.add(s)
        for value, pattern in (
            (np.arange(3, dtype=np.float64), r'field "x" \(float32\): given float64'),
            (np.zeros((3, 1), np.float32), r'field "x" \(float32\): shape \[3, 1\]'),
            ("abc", r'field "x" \(float32\): cannot take a str'),
        ):
            with pytest.raises(ValueError, match=pattern):
                w.add({"x": value, "label": 1, "data": b""})
        with pytest.raises(ValueError, match=r'field "label" \(int64\): 1.5 is a float'):
            w.add({"x": base[:3], "label": 1.5, "data": b""})
        with pytest.raises(ValueError, match=r'field "label" \(int64\): \d+ does not fit int64'):
            w.add({"x": base[:3], "label": 2**70, "data": b""})
    ds = sluice.Dataset(str(tmp_path / "ds"))
    assert len(ds) == 3
    got = [ds.sample(i) for i in range(3)]
    assert np.frombuffer(got[0]["x"], np.float32).tolist() == [0.0, 4.0, 8.0]
    assert np.frombuffer(got[1]["x"], np.float32).tolist() == [1.0, 2.0, 3.0]
    assert np.frombuffer(got[2]["x"], np.float32).tolist() == [1.0, 5.0, 9.0]
    assert [np.frombuffer(g["label"], np.int64)[0] for g in got] == [7, 8, 9]
    assert got[1]["data"] == bytes(range(5)) and got[0]["data"] == b"abc"
