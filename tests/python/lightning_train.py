"""A small Lightning training run over sluice.torch.DataLoader, as a user writes it; run by
test_lightning.py in a subprocess (so that it can be killed with SIGKILL mid-epoch).

    python lightning_train.py DATASET WORKDIR EPOCHS [--kill-at STEP] [--resume CKPT]

Every training step appends "epoch global_step index,index,..." to WORKDIR/steps.log (flushed
at once), and ModelCheckpoint saves every 7 steps to WORKDIR/ckpt/step=N.ckpt.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import lightning as L
import torch

import sluice.torch


class Model(L.LightningModule):
    def __init__(self, log: Path) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(12, 1)
        self.log_file = open(log, "a")

    def training_step(self, batch, batch_idx):
        indices = batch["index"][~batch["padding"]].tolist() if "padding" in batch else batch["index"].tolist()
        self.log_file.write(f"{self.current_epoch} {self.global_step} {','.join(map(str, indices))}\n")
        self.log_file.flush()
        x = batch["feat"].reshape(batch["feat"].shape[0], -1)
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dataset")
    p.add_argument("workdir", type=Path)
    p.add_argument("epochs", type=int)
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume")
    a = p.parse_args()
    loader = sluice.torch.DataLoader({"dataset": {"path": a.dataset}, "batch_size": 32, "seed": 3,
                                      "io": {"threads": 2}})
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(
        dirpath=a.workdir / "ckpt", filename="{step}", every_n_train_steps=7, save_top_k=-1)]
    if a.kill_at is not None:
        callbacks.append(KillAt(a.kill_at))
    trainer = L.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(Model(a.workdir / "steps.log"), train_dataloaders=loader, ckpt_path=a.resume)


if __name__ == "__main__":
    main()
