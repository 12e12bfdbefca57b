#!/usr/bin/env python3
"""Trains a small classifier through sluice, then the same training through
torch.utils.data.DataLoader over the original ImageFolder tree, and prints loss, accuracy and
samples/s for both.

  python examples/train.py CONFIG.yaml [--images DIR] [--epochs 3] [--batch-size 64]

The dataset is what `sluice pack` makes of an ImageFolder tree (examples/make_image_folder.py):
a variable-size `data` field (the file's bytes) and an int64 `label`. The model sees a byte
histogram of each sample, which is enough to learn the classes make_image_folder.py encodes.
Under torchrun, RANK / WORLD_SIZE give each process its share of every epoch.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import sluice


def histograms(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[B, 256] normalised byte histograms of the B samples values[offsets[i]:offsets[i+1]]."""
    lengths = offsets[1:] - offsets[:-1]
    sample = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    hist = torch.zeros(lengths.numel(), 256)
    hist.index_put_((sample, values.long()), torch.ones(values.numel()), accumulate=True)
    return hist / lengths.clamp(min=1).unsqueeze(1) * 256


def make_model(classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, classes))


def train(name: str, batches, epochs: int, classes: int, set_epoch=None) -> None:
    model = make_model(classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        if set_epoch:
            set_epoch(epoch)
        t0, samples, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        for values, offsets, labels in batches():
            logits = model(histograms(values, offsets))
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            samples += labels.numel()
            loss_sum += loss.item() * labels.numel()
            correct += int((logits.argmax(1) == labels).sum())
        dt = time.perf_counter() - t0
        print(f"{name:>10} epoch {epoch}: loss {loss_sum / max(samples, 1):.3f}  "
              f"accuracy {correct / max(samples, 1):.2f}  {samples / dt:,.0f} samples/s", flush=True)


class ImageFolderFiles(torch.utils.data.Dataset):
    """What users would otherwise write: one file read per sample, label from the directory."""

    def __init__(self, root: str) -> None:
        classes = sorted(os.listdir(root))
        self.items = [(os.path.join(root, c, f), k) for k, c in enumerate(classes)
                      for f in sorted(os.listdir(os.path.join(root, c)))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with open(path, "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), label


def collate(samples):
    """Variable-size samples as values + offsets, the same shape sluice delivers them in."""
    lengths = torch.tensor([len(s) for s, _ in samples])
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return torch.cat([s for s, _ in samples]), offsets, torch.tensor([l for _, l in samples])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--images", help="the ImageFolder tree the dataset was packed from, for the DataLoader run")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    loader = sluice.Loader(args.config, batch_size=args.batch_size)
    classes = len(loader.classes)
    print(f"sluice: {loader.num_samples} samples, {classes} classes, rank {loader.rank} of "
          f"{loader.world_size}, {len(loader)} batches of {args.batch_size} per epoch", flush=True)

    def sluice_batches():
        for batch in loader:
            yield batch["data"], batch["data_offsets"], batch["label"]

    train("sluice", sluice_batches, args.epochs, classes, loader.set_epoch)

    if args.images:
        dl = torch.utils.data.DataLoader(ImageFolderFiles(args.images), batch_size=args.batch_size,
                                         shuffle=True, num_workers=2, collate_fn=collate,
                                         drop_last=True, timeout=60)
        train("DataLoader", lambda: iter(dl), args.epochs, classes)


if __name__ == "__main__":
    main()
