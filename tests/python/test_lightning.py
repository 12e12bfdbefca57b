"""PyTorch Lightning killed mid-epoch and resumed from its checkpoint: with
sluice.torch.DataLoader, Lightning saves and restores the loader's place itself and sets each
epoch, so every sample is trained on exactly once per epoch across the kill."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import N

pytest.importorskip("lightning", reason="lightning is installed by scripts/python-env.sh")

SCRIPT = Path(__file__).with_name("lightning_train.py")
STEPS_PER_EPOCH = N // 32  # drop_last: 31 steps of 32 samples, 8 samples left out each epoch


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=600, env=env)


def steps(log: Path) -> list[tuple[int, int, list[int]]]:
    out = []
    for line in log.read_text().splitlines():
        epoch, step, indices = line.split(" ")
        out.append((int(epoch), int(step), [int(i) for i in indices.split(",")]))
    return out


@pytest.mark.parametrize("kill_at", [45, 64])  # resumed mid-epoch 1; after the first step of epoch 2
def test_killed_mid_epoch_and_resumed_trains_each_sample_once_per_epoch(
        mixed: Path, tmp_path: Path, kill_at: int) -> None:
    epochs = 3
    first = run(str(mixed), str(tmp_path), str(epochs), "--kill-at", str(kill_at))
    assert first.returncode == -9, first.stderr[-3000:]
    ckpts = {int(re.search(r"step=(\d+)", p.name).group(1)): p
             for p in (tmp_path / "ckpt").glob("step=*.ckpt")}
    resume_step = max(ckpts)
    assert resume_step < kill_at, (resume_step, kill_at)
    killed_log = steps(tmp_path / "steps.log")
    (tmp_path / "steps.log").rename(tmp_path / "killed.log")
    second = run(str(mixed), str(tmp_path), str(epochs), "--resume", str(ckpts[resume_step]))
    assert second.returncode == 0, second.stderr[-3000:]
    # What the model trained on: the killed run up to its checkpoint, then the resumed run.
    trained = [s for s in killed_log if s[1] < resume_step] + steps(tmp_path / "steps.log")
    assert [s[1] for s in trained] == list(range(epochs * STEPS_PER_EPOCH)), "steps lost or repeated"
    per_epoch: dict[int, Counter] = {e: Counter() for e in range(epochs)}
    for epoch, step, indices in trained:
        assert epoch == step // STEPS_PER_EPOCH, f"step {step} trained in epoch {epoch}"
        per_epoch[epoch].update(indices)
    orders = []
    for epoch, seen in per_epoch.items():
        assert max(seen.values()) == 1, f"epoch {epoch}: samples repeated"
        assert sum(seen.values()) == STEPS_PER_EPOCH * 32, f"epoch {epoch}: samples missing"
        orders.append([i for e, _, ix in trained if e == epoch for i in ix])
    assert orders[0] != orders[1] != orders[2], "each epoch has its own order"
