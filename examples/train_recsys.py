"""A small DLRM-style click model trained from a sluice dataset, its embedding table on disk.

    PYTHONPATH=build/python .venv/bin/python examples/train_recsys.py --dir /tmp/recsys

A synthetic click log: each sample has 4 sparse fields, each a bag of 2 ids drawn Zipf-skewed
(as real click logs are) from the field's own range of one embedding table, 8 dense features
and a click drawn from a hidden model of both. The model sum-pools each field's bag, puts the
dense features through an MLP, and a top MLP over both gives the click logit.

The table lives on disk (sluice.EmbeddingTable); the Loader hands each batch its unique ids,
their rows (read ahead, the cache told the ids to come) and the inverse index. A step's rows are
a leaf tensor; after backward, sparse SGD writes the touched rows back with table.update, and
table.flush() makes them durable every `--flush-every` steps. Prints JSON: loss and AUC on a
held-out set before and after training, and how long the training loop waited for batches.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import sluice

FIELDS, BAG, DENSE, DIM = 4, 2, 8, 16


def make_click_log(path: Path, n: int, vocab: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    true_rows = rng.normal(0, 1.0, FIELDS * vocab)  # the hidden model: a weight per id
    true_dense = rng.normal(0, 0.5, DENSE)
    perm = rng.permutation(vocab)  # hot ids spread over the range
    with sluice.DatasetWriter(str(path), [
            {"name": "sparse", "dtype": "int64", "shape": [FIELDS, BAG]},
            {"name": "dense", "dtype": "float32", "shape": [DENSE]},
            {"name": "click", "dtype": "float32", "shape": []}]) as w:
        for _ in range(n):
            ranks = np.minimum(rng.zipf(1.2, (FIELDS, BAG)), vocab) - 1
            ids = perm[ranks] + np.arange(FIELDS)[:, None] * vocab
            dense = rng.normal(0, 1, DENSE).astype(np.float32)
            logit = true_rows[ids].sum() / 2 + dense @ true_dense
            click = np.float32(rng.random() < 1 / (1 + np.exp(-logit)))
            w.add([ids, dense, np.array(click, np.float32)])


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bottom = torch.nn.Sequential(torch.nn.Linear(DENSE, DIM), torch.nn.ReLU())
        self.top = torch.nn.Sequential(torch.nn.Linear((FIELDS + 1) * DIM, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 1))

    def forward(self, rows: torch.Tensor, inverse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        bags = rows[inverse].sum(dim=2)  # [B, FIELDS, BAG, DIM] -> [B, FIELDS, DIM]
        x = torch.cat([bags.flatten(1), self.bottom(dense)], dim=1)
        return self.top(x).squeeze(1)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / max(1, n_pos * n_neg))


def evaluate(model: Model, table: sluice.EmbeddingTable, data: Path) -> dict[str, float]:
    loader = sluice.Loader({"dataset": str(data), "batch_size": 1024, "drop_last": False,
                            "shuffle": {"mode": "none"}}, embeddings={"sparse": table})
    scores, labels, losses = [], [], []
    with torch.no_grad():
        for b in loader:
            keep = ~b["padding"] if "padding" in b else slice(None)
            logit = model(b["sparse_rows"], b["sparse_inverse"], b["dense"])[keep]
            click = b["click"][keep]
            losses.append(torch.nn.functional.binary_cross_entropy_with_logits(
                logit, click, reduction="sum").item())
            scores.append(logit.numpy())
            labels.append(click.numpy())
    s, y = np.concatenate(scores), np.concatenate(labels)
    return {"loss": sum(losses) / len(y), "auc": auc(s, y)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=40_000)
    ap.add_argument("--vocab", type=int, default=20_000, help="ids per sparse field")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.05, help="sparse SGD on the table's rows")
    ap.add_argument("--flush-every", type=int, default=50)
    ap.add_argument("--cache-bytes", type=int, default=1 << 20)
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    make_click_log(args.dir / "train", args.samples, args.vocab, seed=1)
    make_click_log(args.dir / "test", args.samples // 4, args.vocab, seed=1)  # same hidden model
    table = sluice.EmbeddingTable.create(args.dir / "table", rows=FIELDS * args.vocab, dim=DIM,
                                         init="normal:0.01", cache_bytes=args.cache_bytes)
    torch.manual_seed(0)
    model = Model()
    before = evaluate(model, table, args.dir / "test")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = sluice.Loader({"dataset": str(args.dir / "train"), "batch_size": args.batch_size,
                            "seed": 0}, embeddings={"sparse": table})
    step, waited, start = 0, 0.0, time.perf_counter()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        it = iter(loader)
        while True:
            t = time.perf_counter()
            b = next(it, None)
            waited += time.perf_counter() - t
            if b is None:
                break
            rows = b["sparse_rows"].clone().requires_grad_(True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                model(rows, b["sparse_inverse"], b["dense"]), b["click"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # sparse SGD: only the rows this batch touched
                table.update(b["sparse_unique"], rows - args.lr * rows.grad)
            step += 1
            if step % args.flush_every == 0:
                table.flush()
    table.flush()
    seconds = time.perf_counter() - start
    after = evaluate(model, table, args.dir / "test")
    print(json.dumps({"before": before, "after": after, "steps": step,
                      "train_seconds": round(seconds, 3),
                      "wait_fraction": round(waited / seconds, 4),
                      "table": table.stats()}))


if __name__ == "__main__":
    main()
