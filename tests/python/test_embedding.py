"""sluice.EmbeddingTable from Python: create / from_array / open, gather and update against a
numpy copy, float16 and bfloat16 against numpy's and torch's own conversions, errors that name
the id or dtype, reopening after a kill -9, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import sluice

torch = pytest.importorskip("torch")


def test_from_array_gather_update_flush_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    want = rng.standard_normal((1000, 24)).astype(np.float32)
    table = sluice.EmbeddingTable.from_array(tmp_path / "t", want)
    assert (table.rows, table.dim, table.dtype) == (1000, 24, "float32")
    ids = np.array([5, 999, 5, 0, 17, 5])
    got = table.gather(ids)
    assert isinstance(got, np.ndarray) and got.shape == (6, 24) and got.dtype == np.float32
    assert np.array_equal(got, want[ids])
    assert table.stats()["unique_ids"] == 4  # 5 is read once
    # torch ids in, torch rows out; a list works too.
    assert torch.equal(table.gather(torch.tensor([3, 4])), torch.from_numpy(want[[3, 4]]))
    assert np.array_equal(table.gather([7]), want[[7]])
    # Read-your-writes, then durable across a reopen.
    new = rng.standard_normal((3, 24)).astype(np.float32)
    table.update([5, 6, 5], new)
    want[6] = new[1]
    want[5] = new[2]  # a repeated id: the last row
    assert np.array_equal(table.gather(np.arange(1000)), want)
    table.flush()
    table.close()
    again = sluice.EmbeddingTable(tmp_path / "t", cache_bytes=64 << 10, policy="lru")
    assert np.array_equal(again.gather(np.arange(1000)), want)
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["rows_per_unit"] == 4096 // (24 * 4) and manifest["unit_bytes"] == 4096


def test_half_and_bfloat16_match_numpy_and_torch(tmp_path: Path) -> None:
    # The same init in float32 and in the narrower types: each value rounded as numpy / torch
    # round float32 (nearest even).
    f32 = sluice.EmbeddingTable.create(tmp_path / "f32", rows=3000, dim=33, init="normal:30",
                                       seed=9)
    f16 = sluice.EmbeddingTable.create(tmp_path / "f16", rows=3000, dim=33, dtype="float16",
                                       init="normal:30", seed=9)
    bf16 = sluice.EmbeddingTable.create(tmp_path / "bf16", rows=3000, dim=33, dtype="bfloat16",
                                        init="normal:30", seed=9)
    ids = np.arange(3000)
    base = f32.gather(ids)
    assert np.array_equal(f16.gather(ids), base.astype(np.float16))
    got = bf16.gather(ids)
    assert got.dtype == torch.bfloat16  # no numpy bfloat16: torch
    assert torch.equal(got, torch.from_numpy(base).to(torch.bfloat16))
    # from_array of a bfloat16 tensor, updates in bfloat16.
    t = torch.randn(100, 8).to(torch.bfloat16)
    table = sluice.EmbeddingTable.from_array(tmp_path / "from-bf16", t)
    assert table.dtype == "bfloat16" and torch.equal(table.gather(torch.arange(100)), t)
    table.update(torch.tensor([1]), torch.ones(1, 8, dtype=torch.bfloat16))
    assert torch.equal(table.gather([1]), torch.ones(1, 8, dtype=torch.bfloat16))


def test_bad_ids_dtypes_and_shapes_are_named(tmp_path: Path) -> None:
    table = sluice.EmbeddingTable.create(tmp_path / "t", rows=10, dim=4)
    with pytest.raises(ValueError, match=r"id 10 at position 2 is out of range \(the table has 10 rows\)"):
        table.gather([1, 2, 10])
    with pytest.raises(ValueError, match=r"id -3 at position 0"):
        table.update([-3], np.zeros((1, 4), np.float32))
    with pytest.raises(TypeError, match=r"ids must be integers, got float32"):
        table.gather(np.array([1.0], np.float32))
    with pytest.raises(TypeError, match=r"ids must be integers, got a tensor of torch.float32"):
        table.gather(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"ids must be 1-D, got shape \(2, 2\)"):
        table.gather(np.zeros((2, 2), np.int64))
    with pytest.raises(TypeError, match=r"values are float64, the table holds float32"):
        table.update([1], np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"values have shape \(1, 3\), expected \(1, 4\)"):
        table.update([1], np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"dtype \"float64\": expected float32, float16 or bfloat16"):
        sluice.EmbeddingTable.create(tmp_path / "u", rows=1, dim=1, dtype="float64")
    with pytest.raises(ValueError, match=r"already exists"):
        sluice.EmbeddingTable.create(tmp_path / "t", rows=10, dim=4)
    with pytest.raises(FileNotFoundError, match=r"no such directory"):
        sluice.EmbeddingTable(tmp_path / "none")
    with pytest.raises(ValueError, match=r"policy \"fifo\""):
        sluice.EmbeddingTable(tmp_path / "t", policy="fifo", readonly=True)


def test_updates_survive_kill_9_and_each_row_is_whole(tmp_path: Path) -> None:
    """A process updates and flushes rows and is killed -9; the reopened table holds, per
    row, a value the process wrote (never a mix), at least what it flushed."""
    sluice.EmbeddingTable.create(tmp_path / "t", rows=256, dim=1100)  # two pages a row
    script = textwrap.dedent(f"""
        import sys, numpy as np, sluice
        t = sluice.EmbeddingTable({str(tmp_path / "t")!r})
        rng = np.random.default_rng(1)
        for version in range(1, 10**9):
            ids = rng.integers(0, 256, 32)
            t.update(ids, (ids[:, None] * 4096.0 + version).repeat(1100, 1).astype(np.float32))
            if version % 5 == 0:
                t.flush()
                print(version, flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    durable = [int(p.stdout.readline()) for _ in range(6)][-1]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    table = sluice.EmbeddingTable(tmp_path / "t")
    rows = table.gather(np.arange(256))
    rng = np.random.default_rng(1)
    last_flushed = np.zeros(256)
    for version in range(1, durable + 1):
        last_flushed[rng.integers(0, 256, 32)] = version
    for r in range(256):
        assert (rows[r] == rows[r][0]).all(), f"row {r} is torn"
        version = rows[r][0] - r * 4096.0 if rows[r][0] else 0
        assert version >= last_flushed[r], f"row {r} lost its flushed version {last_flushed[r]}"


def test_cli_create_and_inspect(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "sluice._cli"]
    subprocess.run(cli + ["embed", "create", str(tmp_path / "t"), "--rows", "5000", "--dim", "128",
                          "--dtype", "float16", "--init", "uniform:0.1"], check=True)
    out = subprocess.run(cli + ["embed", "inspect", str(tmp_path / "t"), "--json"], check=True,
                         capture_output=True, text=True).stdout
    info = json.loads(out)
    assert (info["rows"], info["dim"], info["dtype"], info["rows_per_unit"]) == (5000, 128, "float16", 16)
    table = sluice.EmbeddingTable(tmp_path / "t")
    assert np.abs(table.gather(np.arange(5000)).astype(np.float32)).max() <= 0.1
    # Open read-write here, so the CLI's read-only open is refused, naming the table.
    refused = subprocess.run(cli + ["embed", "inspect", str(tmp_path / "t")], capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "open read-write by another process" in refused.stderr
    table.close()
    text = subprocess.run(cli + ["embed", "inspect", str(tmp_path / "t")], check=True,
                          capture_output=True, text=True).stdout
    assert "5000 rows x 128 float16" in text


def id_table(path: Path, rows: int, dim: int, **kwargs) -> sluice.EmbeddingTable:
    """Row i holds i in every column."""
    return sluice.EmbeddingTable.from_array(
        path, np.repeat(np.arange(rows, dtype=np.float32)[:, None], dim, 1), **kwargs)


def test_loader_batches_carry_unique_ids_inverse_and_rows(mixed: Path, tmp_path: Path) -> None:
    from conftest import config

    tokens = id_table(tmp_path / "tokens", 30000, 8, cache_bytes=1 << 20)
    labels = id_table(tmp_path / "labels", 10, 4)
    loader = sluice.Loader(config(mixed, drop_last=False),
                           embeddings={"tokens": tokens, "label": labels})
    n = 0
    for batch in loader:
        for field, table in (("tokens", tokens), ("label", labels)):
            ids, unique = batch[field], batch[f"{field}_unique"]
            inverse, rows = batch[f"{field}_inverse"], batch[f"{field}_rows"]
            assert torch.equal(unique, torch.unique(ids.to(torch.int64)))
            assert inverse.shape == ids.shape and torch.equal(unique[inverse], ids.to(torch.int64))
            assert rows.shape == (len(unique), table.dim) and torch.equal(rows[:, 0], unique.float())
        n += 1
    assert n == len(loader)
    # The loader told the clairvoyant cache each batch's ids before gathering them.
    assert tokens.stats()["gathers"] == n and tokens.stats()["future_batches"] == 0
    with pytest.raises(ValueError, match=r"field 'feat' is float32, not an integer id field"):
        sluice.Loader(config(mixed), embeddings={"feat": labels})
    with pytest.raises(ValueError, match=r"'nope' is not a field of the dataset"):
        sluice.Loader(config(mixed), embeddings={"nope": labels})


def test_a_row_updated_after_its_batch_was_read_ahead_comes_updated(mixed: Path,
                                                                    tmp_path: Path) -> None:
    from conftest import config

    tokens = id_table(tmp_path / "tokens", 30000, 8)
    loader = sluice.Loader(config(mixed, prefetch=4), embeddings={"tokens": tokens})
    it = iter(loader)
    first = next(it)
    assert torch.equal(first["tokens_rows"][:, 0], first["tokens_unique"].float())
    import time

    deadline = time.monotonic() + 10
    while loader._lookahead._ready.qsize() < 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # the next batches gathered with the old rows
    assert loader._lookahead._ready.qsize() >= 1
    # Every row changes now; the batches read ahead must carry the new values.
    tokens.update(np.arange(30000), np.full((30000, 8), -1, np.float32))
    for batch in it:
        assert (batch["tokens_rows"] == -1).all(), batch["tokens_unique"][:5]


def test_resume_with_embeddings_is_exact(mixed: Path, tmp_path: Path) -> None:
    from conftest import config
    from test_loader import real_indices

    tokens = id_table(tmp_path / "tokens", 30000, 8)
    plain = [real_indices(b) for b in sluice.Loader(config(mixed, drop_last=False))]
    loader = sluice.Loader(config(mixed, drop_last=False), embeddings={"tokens": tokens})
    got = []
    for k, batch in enumerate(loader):
        got.append(real_indices(batch))
        if k == 4:
            # Inside the loop, as a training step saves it: the look-ahead has read further.
            state = loader.state_dict()
            break  # and the loader goes back to the consumer's place
    assert loader.state_dict() == state
    again = sluice.Loader(config(mixed, drop_last=False), embeddings={"tokens": tokens})
    again.load_state_dict(state)
    rest = [real_indices(b) for b in again]
    assert got + rest == plain
    # The first loader's next loop goes on from where its consumer stopped, too.
    assert [real_indices(b) for b in loader] == rest
    # Elastic: the rest on two ranks covers the same samples.
    halves = []
    for rank in (0, 1):
        r = sluice.Loader(config(mixed, drop_last=False), rank=rank, world_size=2,
                          embeddings={"tokens": tokens})
        r.load_state_dict(state)
        halves += [i for b in r for i in real_indices(b)]
    assert sorted(halves) == sorted(i for b in rest for i in b)


def test_the_recsys_example_learns(tmp_path: Path) -> None:
    """examples/train_recsys.py: a DLRM-style model, its table on disk updated by sparse SGD."""
    example = Path(__file__).resolve().parents[2] / "examples" / "train_recsys.py"
    out = subprocess.run([sys.executable, str(example), "--dir", str(tmp_path / "recsys"),
                          "--samples", "20000", "--epochs", "2"], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    before, after = result["before"], result["after"]
    assert after["loss"] < before["loss"] - 0.1, result
    assert after["auc"] > 0.75 > before["auc"], result
    assert result["table"]["rows_updated"] > 0 and result["table"]["flushes"] > 0
