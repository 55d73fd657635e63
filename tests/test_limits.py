"""Fractional --limit-*-batches that leave no batch: one error line before any training, as Lightning counts.

The tiny data (conftest) holds 120 training and 50 test images; with QUICK's --val-size 20 and
--batch-size 20 that is 5 training batches, and --eval-batch-size 10 makes 2 validation and 5
test batches.
"""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from conftest import QUICK, QUICK_VGG
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from robustness import assert_one_line_error

from base.errors import UserError
from cli.train import parse_run_config
from datamodules import CIFAR10DataModule
from models import build_model
from run import lr_find
from run.build import build_datamodule, least_fraction

EVAL10 = ["--eval-batch-size", "10"]
VGG = ["--model", "vgg16", *QUICK, *EVAL10]  # all 100 training images (QUICK_VGG keeps 40)
STAGES = {"train": RunningStage.TRAINING, "val": RunningStage.VALIDATING, "test": RunningStage.TESTING}


@pytest.mark.parametrize(
    ("batches", "fraction"), [(1, "1"), (2, "0.5"), (3, "0.334"), (6, "0.167"), (391, "0.00256"), (1000, "0.001")]
)
def test_least_fraction_is_the_smallest_three_digit_one_that_keeps_a_batch(batches, fraction):
    assert least_fraction(batches) == fraction
    assert int(batches * float(fraction)) == 1


def _loaders(datamodule: CIFAR10DataModule, rank: int, world_size: int) -> dict[str, object]:
    """Each split's loader as process ``rank`` of ``world_size`` gets it (a stand-in Trainer)."""
    datamodule.trainer = SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device("cpu")), global_rank=rank, world_size=world_size
    )
    try:
        return {"train": datamodule.train_dataloader(), "val": datamodule.val_dataloader(), "test": datamodule.test_dataloader()}
    finally:
        datamodule.trainer = None


@pytest.mark.parametrize("data_path", ["loader", "device"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_batches_per_process_is_every_process_loader_length(tiny_data, data_path, world_size):
    # 100 training, 20 validation and 50 test images: uneven shares under 3 processes, partial batches.
    datamodule = CIFAR10DataModule(tiny_data, batch_size=7, eval_batch_size=6, val_size=20, workers=0,
                                   data_path=data_path, download=False)
    datamodule.setup()
    for rank in range(world_size):
        for split, loader in _loaders(datamodule, rank, world_size).items():
            assert len(loader) == datamodule.batches_per_process(split, world_size), (split, rank)


@pytest.mark.parametrize("devices", ["1", "2", "3"])
def test_the_check_refuses_exactly_what_lightning_refuses(tiny_data, devices):
    """Lightning's own rule (_parse_num_batches) on each process's loader, against the check, flag by flag."""
    for flag, split in (("--limit-train-batches", "train"), ("--limit-val-batches", "val"), ("--limit-test-batches", "test")):
        for fraction in (0.1, 0.2, 0.3, 0.34, 0.5, 0.99):
            config = parse_run_config([*QUICK, *EVAL10, "--data-dir", str(tiny_data), "--devices", devices, flag, str(fraction)])
            try:
                build_datamodule(config)
                refused = False
            except UserError:
                refused = True
            datamodule = CIFAR10DataModule(tiny_data, batch_size=20, eval_batch_size=10, val_size=20, download=False)
            datamodule.setup()
            loader = _loaders(datamodule, 0, int(devices))[split]
            try:
                _parse_num_batches(STAGES[split], len(loader), fraction)
                lightning_refuses = False
            except MisconfigurationException:
                lightning_refuses = True
            assert refused == lightning_refuses, (flag, fraction, devices)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit-train-batches", "0.1"],
         "--limit-train-batches 0.1 is 0 of the 5 training batches (batch size 20); "
         "give a fraction of at least 0.2 or a number of batches"),
        (["--limit-val-batches", "0.4"],
         "--limit-val-batches 0.4 is 0 of the 2 validation batches (eval batch size 10); give a fraction of at least 0.5"),
        # Found before training, not once it is over.
        (["--limit-test-batches", "0.1"],
         "--limit-test-batches 0.1 is 0 of the 5 test batches (eval batch size 10); give a fraction of at least 0.2"),
        # Lightning takes the fraction of each process's batches: 50 training images each, 3 batches.
        (["--devices", "2", "--limit-train-batches", "0.3"],
         "--limit-train-batches 0.3 is 0 of the 3 training batches per process (batch size 20, 2 processes); "
         "give a fraction of at least 0.334"),
        # --lr find: refused before the range test, not after it.
        (["--lr", "find", "--limit-test-batches", "0.1"], "--limit-test-batches 0.1 is 0 of the 5 test batches"),
        (["--lr", "find", "--limit-val-batches", "0.4"], "--limit-val-batches 0.4 is 0 of the 2 validation batches"),
    ],
)
def test_train_refuses_a_fraction_that_leaves_no_batch_before_the_run_folder(cli, tiny_data, tmp_path, args, message):
    output = tmp_path / "runs"
    result = cli("train", *VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), *args)
    assert_one_line_error(result, message)
    assert "suggested lr" not in result.out
    assert not output.exists()


@pytest.fixture(scope="module")
def course_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "vgg16.pt"
    torch.save(build_model("vgg16").state_dict(), path)
    return path


def test_test_refuses_a_fraction_that_leaves_no_batch(cli, tiny_data, course_weights):
    result = cli("test", "--ckpt", str(course_weights), "--data-dir", str(tiny_data), "--accelerator", "cpu",
                 "--workers", "0", *EVAL10, "--limit-test-batches", "0.01")
    assert_one_line_error(result, "--limit-test-batches 0.01 is 0 of the 5 test batches (eval batch size 10); "
                                  "give a fraction of at least 0.2 or a number of batches")


@pytest.mark.slow
def test_the_least_fractions_train_and_test_as_lightning_counts(cli, tiny_data, tmp_path):
    """At the suggested fractions Lightning runs: 1 training, 1 validation and 1 test batch."""
    result = cli("train", *VGG, "--data-dir", str(tiny_data),
                 "--output-dir", str(tmp_path / "runs"), "--epochs", "1", "--limit-train-batches", "0.2",
                 "--limit-val-batches", "0.5", "--limit-test-batches", "0.2")
    assert result.code == 0, result.err
    assert "on 10 test images" in result.out


@pytest.mark.slow
def test_fast_dev_run_replaces_the_limits_and_keeps_nothing(cli, tiny_data, tmp_path):
    result = cli("train", *VGG, "--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "runs"),
                 "--fast-dev-run", "2", "--limit-test-batches", "0.01")
    assert result.code == 0, result.err
    # Its first line says what it runs (not the recipe's epochs, which it replaces) and that nothing stays.
    assert result.out.splitlines()[0].startswith("fast dev run (nothing is kept): vgg16, 2 batches of each stage, batch")
    assert not any(path.is_file() for path in (tmp_path / "runs").rglob("*"))


def test_the_range_test_bar_is_hidden_off_a_terminal_and_put_back():
    from lightning.pytorch.tuner import lr_finder as lightning_lr_finder

    own = lightning_lr_finder.tqdm
    for shown in (False, True):
        written = io.StringIO()
        with lr_find.sweep_bar(shown):
            bar = lightning_lr_finder.tqdm(desc="Finding best initial lr", total=3, file=written)
            bar.update()
            bar.close()
        assert ("Finding best initial lr" in written.getvalue()) == shown
        assert lightning_lr_finder.tqdm is own


@pytest.mark.slow
def test_find_lr_off_a_terminal_prints_no_bar(cli, tiny_data, tmp_path, monkeypatch):
    """Captured output is not a terminal: plain lines only, no tqdm bar with carriage returns."""
    monkeypatch.setattr(lr_find, "STEPS", 30)  # enough for a curve on tiny data, quick on a CPU
    # A test limit that leaves no batch is no matter to --find-lr alone: it never tests.
    result = cli("train", *QUICK_VGG, *EVAL10, "--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "runs"),
                 "--find-lr", "--epochs", "2", "--batch-size", "4", "--limit-test-batches", "0.01")
    assert result.code == 0, result.err
    assert "suggested lr" in result.out
    for output in (result.out, result.err):
        assert "\r" not in output and "Finding best initial lr" not in output
