"""The learning-rate range test: --find-lr alone, --lr find before training, refused with --resume."""
from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import QUICK_VGG
from robustness import assert_one_line_error

from run import lr_find


@pytest.fixture(autouse=True)
def short_test(monkeypatch):
    monkeypatch.setattr(lr_find, "STEPS", 30)  # enough for a curve on tiny data, quick on a CPU


@pytest.mark.slow
@pytest.mark.parametrize(
    ("optimizer", "scheduler"), [("adam", "step"), ("sgd", "onecycle"), ("adamw", "cosine"), ("sgd", "none")]
)
def test_find_lr_plots_suggests_within_the_sweep_and_leaves_nothing(cli, tiny_data, tmp_path, monkeypatch, optimizer, scheduler):
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "runs"
    # Batches of 4: the 30 steps take a few epochs of the tiny data, not fifteen.
    result = cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--find-lr",
                 "--optimizer", optimizer, "--scheduler", scheduler, "--epochs", "2", "--batch-size", "4")
    assert result.code == 0, result.err
    folder = output / "vgg16" / "lr_find" / "version_0"
    numbers = json.loads((folder / "lr_find.json").read_text())
    assert lr_find.MIN_LR <= numbers["suggestion"] <= lr_find.MAX_LR
    assert len(numbers["lrs"]) == 30 and numbers["lrs"] == sorted(numbers["lrs"])
    assert (folder / "lr_find.png").stat().st_size > 10_000 and any(folder.glob("events.out.tfevents.*"))
    assert f"suggested lr {numbers['suggestion']:.3g}" in result.out
    # No checkpoint, no training run, nothing in the working folder.
    assert not list(tmp_path.rglob("*.ckpt"))
    assert sorted(p.name for p in (output / "vgg16").iterdir()) == ["lr_find"]
    assert not [p for p in os.listdir(tmp_path) if p not in ("runs",)]


@pytest.mark.slow
def test_lr_find_then_trains_with_the_suggestion_and_records_it(cli, tiny_data, tmp_path):
    output = tmp_path / "runs"
    result = cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--lr", "find",
                 "--epochs", "1")
    assert result.code == 0, result.err
    run = output / "vgg16" / "version_0"
    suggestion = json.loads((run / "lr_find.json").read_text())["suggestion"]
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == suggestion
    assert (run / "lr_find.png").is_file()
    assert result.out.splitlines()[0].startswith("learning-rate range test: suggested lr")


@pytest.mark.parametrize("flag", [["--find-lr"], ["--lr", "find"]])
def test_range_test_with_resume_is_refused(cli, tiny_data, tmp_path, flag):
    """--find-lr or --lr find with --resume."""
    result = cli("train", *flag, "--resume", "last", "--output-dir", str(tmp_path / "runs"), "--data-dir", str(tiny_data))
    assert_one_line_error(result, "with --resume", "--weights")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_range_test_restores_its_weights_from_a_slow_disk(cli, tiny_data, tmp_path, monkeypatch):
    """Lightning saves the weights before the sweep and loads them right after it: with every write
    0.5 s late (a slow disk), the load still finds the file whole."""
    import time

    from callbacks.checkpoints import AtomicCheckpointIO

    real = AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", lambda self, *a, **k: time.sleep(0.5) or real(self, *a, **k))
    result = cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(tmp_path), "--find-lr",
                 "--batch-size", "4")
    assert result.code == 0, result.err
    assert (tmp_path / "vgg16" / "lr_find" / "version_0" / "lr_find.json").is_file()
