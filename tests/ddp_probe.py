#!/usr/bin/env python
"""train.py with a probe: each DDP process records what its model was given (for tests/test_ddp.py).

Run exactly like train.py; Lightning's DDP launcher starts the other processes with this same
command line, so every process gets the probe. Each writes ``$DDP_PROBE_DIR/rank<R>.json`` at the
end of fitting. The images must be constant, each with its own red value (the image id): a crop
then leaves the centre pixel's red at the id, whatever the offsets and the flip.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules import MEAN, STD  # noqa: E402

PROBE_DIR_ENV = "DDP_PROBE_DIR"


def image_ids(images: torch.Tensor) -> list[int]:
    """The red value of each image's centre pixel, undoing the normalisation."""
    red = images[:, 0, 16, 16].float() * STD[0] + MEAN[0]
    return (red * 255).round().long().tolist()


class Probe(L.Callback):
    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.record: dict[str, list[Any]] = {"train_ids": [], "losses": [], "val_ids": [], "val_preds": [], "val_labels": []}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.record["train_ids"] += image_ids(batch[0])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record["losses"].append((float(outputs["loss"]), len(batch[1])))

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking:
            return
        images, labels = batch
        self.record["val_ids"] += image_ids(images)
        self.record["val_preds"] += pl_module(images).argmax(1).tolist()
        self.record["val_labels"] += labels.tolist()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        result = {"rank": trainer.global_rank, "world_size": trainer.world_size, "metrics": metrics, **self.record}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


class ProbedTrainer(L.Trainer):
    def __init__(self, *args: Any, callbacks: list[L.Callback] | None = None, **kwargs: Any) -> None:
        probe = Probe(Path(os.environ[PROBE_DIR_ENV]))
        super().__init__(*args, callbacks=[*(callbacks or []), probe], **kwargs)


if __name__ == "__main__":
    L.Trainer = ProbedTrainer  # train.py looks up L.Trainer when it builds its trainer
    import train

    sys.exit(train.main())
