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
    with pytest.raises(OSError, match="max_batches_held: 4"):
        for batch in loader:
            held.append(batch["data"])
    assert len(held) <= 4 + 2 + 2  # held + prefetch + loader threads: memory stays bounded
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
    # The consumer holds every batch it may, so the next wait is a long one (60 s timeout);
    # SIGINT must end it with KeyboardInterrupt at once.
    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(f"""
        import sys, sluice
        loader = sluice.Loader({{"dataset": {{"path": {str(fixed)!r}}}, "batch_size": 16,
                                "max_batches_held": 2, "prefetch": 1,
                                "io": {{"timeout_ms": 60000, "threads": 1}}}})
        held = []
        try:
            for batch in loader:
                held.append(batch["data"])
                if len(held) == 2:
                    print("blocked", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(42)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ})
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "blocked"
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
