"""train.py -> checkpoints -> test.py on tiny generated data, on the CPU, in-process."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from models import build_model
from models.resnet import Bottleneck

# Flags that keep a run on the tiny data to a few seconds on 2 CPU cores.
QUICK = ["--accelerator", "cpu", "--workers", "0", "--batch-size", "20", "--val-size", "20", "--eval-batch-size", "50",
         "--log-every-n-steps", "1"]


def scalar_tags(run_dir: Path) -> set[str]:
    tags: set[str] = set()
    for events in run_dir.glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data) -> Path:
    """One vgg16 run of 2 epochs with a periodic checkpoint every epoch; returns its run folder."""
    from conftest import load_script

    output = tmp_path_factory.mktemp("runs")
    args = ["--model", "vgg16", "--data-dir", str(tiny_data), "--epochs", "2", "--checkpoint-every", "1"]
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(load_script("train").main([*args, *QUICK, "--output-dir", str(output)]))
    assert exit_info.value.code == 0
    yield output / "vgg16" / "version_0"
    shutil.rmtree(output, ignore_errors=True)  # checkpoints are large; pytest would keep them


@pytest.mark.slow
def test_training_writes_checkpoints_logs_and_config(trained: Path):
    checkpoints = {path.name for path in (trained / "checkpoints").iterdir()}
    assert {"best.ckpt", "last.ckpt", "epoch000.ckpt", "epoch001.ckpt"} <= checkpoints
    config = (trained / "config.yaml").read_text()
    assert "model: vgg16" in config and "epochs: 2" in config
    tags = scalar_tags(trained)
    assert {"loss/train_step", "loss/train_epoch", "acc/train", "loss/val", "acc/val", "acc_top5/val", "lr"} <= tags
    assert {"acc/test", "loss/test", "acc_per_class/test/cat"} <= tags


def test_checkpoint_alone_rebuilds_the_model_with_weights_only(trained: Path):
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    hparams = checkpoint["hyper_parameters"]
    assert hparams["network"]["model"] == "vgg16" and len(hparams["dataset"]["classes"]) == 10
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 2 * 5  # 100 images / batch 20
    model = build_model(hparams["network"]["model"], len(hparams["dataset"]["classes"]))
    weights = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items()}
    model.load_state_dict(weights, strict=True)


def test_test_py_reports_every_test_image_and_each_class(cli, trained: Path, tiny_data: Path, tmp_path: Path):
    report = tmp_path / "result.json"
    ckpt = trained / "checkpoints" / "best.ckpt"
    result = cli("test", "--ckpt", str(ckpt), "--data-dir", str(tiny_data), "--accelerator", "cpu",
                 "--workers", "0", "--json", str(report))
    assert result.code == 0, result.err
    data = json.loads(report.read_text())
    assert data["images"] == 50 and data["model"] == "vgg16" and data["checkpoint_kind"] == "lightning"
    assert len(data["per_class_accuracy"]) == 10 and 0.0 <= data["accuracy"] <= 1.0
    assert "all (top-1)" in result.out and "airplane" in result.out
    assert "Testing ━" not in result.out and "it/s" not in result.out  # no progress bar: output is not a terminal


@pytest.mark.slow
def test_resume_last_continues_the_same_run(cli, trained: Path, tiny_data: Path):
    output = trained.parent.parent
    result = cli("train", "--resume", "last", "--epochs", "3", "--output-dir", str(output),
                 "--data-dir", str(tiny_data), *QUICK)
    assert result.code == 0, result.err
    assert not (output / "vgg16" / "version_1").exists()
    checkpoint = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["epoch"] == 2 and checkpoint["global_step"] == 3 * 5
    assert (trained / "config.resumed.yaml").is_file()


@pytest.mark.slow
def test_course_state_dict_is_tested_and_used_as_starting_weights(cli, tiny_data: Path, tmp_path: Path, caplog):
    # A course checkpoint of the old skeleton: ResNet50 with the unused layer5 block.
    torch.manual_seed(0)
    model = build_model("resnet50")
    state = dict(model.state_dict())
    state.update({f"layer5.{k}": v for k, v in Bottleneck(1024, 256, 1024).state_dict().items()})
    course = tmp_path / "resnet50_epoch285.ckpt"
    torch.save(state, course)

    report = tmp_path / "course.json"
    result = cli("test", "--ckpt", str(course), "--data-dir", str(tiny_data), "--accelerator", "cpu",
                 "--workers", "0", "--json", str(report))
    assert result.code == 0, result.err
    assert json.loads(report.read_text())["model"] == "resnet50"
    assert "layer5" in caplog.text

    output = tmp_path / "runs"
    result = cli("train", "--weights", str(course), "--epochs", "1", "--limit-train-batches", "2",
                 "--data-dir", str(tiny_data), "--output-dir", str(output), *QUICK)
    assert result.code == 0, result.err
    run = output / "resnet50" / "version_0"
    assert "model: resnet50" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_config_file_gives_defaults_and_flags_override(cli, tiny_data: Path, tmp_path: Path):
    output = tmp_path / "runs"
    result = cli("train", "--config", "configs/resnet50.yaml", "--epochs", "1", "--fast-dev-run", "1",
                 "--data-dir", str(tiny_data), "--output-dir", str(output), *QUICK)
    assert result.code == 0, result.err
    assert "none written (--fast-dev-run)" in result.out
