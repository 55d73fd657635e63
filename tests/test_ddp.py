"""DDP through train.py with two CPU processes (gloo): disjoint data, global metrics, one run folder.

train.py runs as a real command under Lightning's subprocess launcher (``--strategy ddp``), as on
a multi-GPU machine, wrapped by tests/ddp_probe.py to record what each process was given.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.classification import MulticlassAccuracy

from datamodules import CLASSES

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PER_CLASS, TEST_PER_CLASS, VAL_SIZE = 12, 5, 20


def constant_image_folder(root: Path) -> set[int]:
    """An image folder whose every image is one colour, its red value a unique id; the training ids."""
    next_id = 1
    train_ids = set()
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                colour = np.array([next_id, 40 + 20 * label, 90], dtype=np.uint8)
                Image.fromarray(np.broadcast_to(colour, (32, 32, 3)).copy()).save(folder / f"{i:04d}.png")
                if split == "train":
                    train_ids.add(next_id)
                next_id += 1
    return train_ids


@pytest.mark.slow
def test_ddp_processes_share_the_data_and_report_global_metrics(tmp_path: Path) -> None:
    train_ids = constant_image_folder(tmp_path / "data")
    probe, output = tmp_path / "probe", tmp_path / "runs"
    probe.mkdir()
    command = [
        sys.executable, "tests/ddp_probe.py", "--model", "vgg16", "--data-dir", str(tmp_path / "data"),
        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--epochs", "1", "--batch-size", "10",
        "--val-size", str(VAL_SIZE), "--eval-batch-size", "50", "--data-path", "device", "--workers", "0",
        "--output-dir", str(output), "--log-every-n-steps", "1",
    ]
    env = {**os.environ, "DDP_PROBE_DIR": str(probe)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    # Each process trained on its own half of the training images, each image once.
    n_train = len(train_ids) - VAL_SIZE
    seen = [r["train_ids"] for r in ranks]
    assert [len(ids) for ids in seen] == [n_train // 2] * 2
    assert set(seen[0]).isdisjoint(seen[1]) and len(set(seen[0]) | set(seen[1])) == n_train
    # ... and validated on its own half of the held-out images.
    val = [r["val_ids"] for r in ranks]
    assert [len(ids) for ids in val] == [VAL_SIZE // 2] * 2 and set(val[0]).isdisjoint(val[1])
    assert set(seen[0]) | set(seen[1]) | set(val[0]) | set(val[1]) == train_ids

    # The logged metrics are those of all processes' data together, on every process.
    preds = torch.tensor(ranks[0]["val_preds"] + ranks[1]["val_preds"])
    labels = torch.tensor(ranks[0]["val_labels"] + ranks[1]["val_labels"])
    global_accuracy = float(MulticlassAccuracy(len(CLASSES), average="micro")(preds, labels))
    losses = [loss for r in ranks for loss in r["losses"]]
    global_loss = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    for r in ranks:
        assert r["metrics"]["acc/val"] == pytest.approx(global_accuracy, abs=1e-6)
        assert r["metrics"]["loss/train_epoch"] == pytest.approx(global_loss, rel=1e-5)

    # The dashboards' per-class accuracies are those of all processes' predictions too, and their
    # pictures are drawn once.
    events = EventAccumulator(str(output / "vgg16" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    for label, name in enumerate(CLASSES):
        if (labels == label).any():
            expected = float((preds[labels == label] == label).float().mean())
            assert events.Scalars(f"acc_per_class/val/{name}")[-1].value == pytest.approx(expected, abs=1e-6)
    assert [len(events.Images(tag)) for tag in ("confusion_matrix/val", "confusion_matrix/test", "misclassified/test")] == [1, 1, 1]

    # One run folder, written by rank 0 alone, and one summary.
    assert [p.name for p in (output / "vgg16").iterdir()] == ["version_0"]
    run = output / "vgg16" / "version_0"
    assert {"best.ckpt", "last.ckpt"} <= {p.name for p in (run / "checkpoints").iterdir()}
    assert (run / "config.yaml").is_file()
    assert done.stdout.count("test accuracy") == 1
