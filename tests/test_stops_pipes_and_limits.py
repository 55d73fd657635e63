"""Real inputs: stops, pipes, crashes and limits that users of similar tools reported.

Each test replays one kind of fault: a hang-up of the terminal, a crash and its resume in the
curves, Ctrl-C in every phase, numbers beyond what a library takes, a reader that closes the pipe,
a default that would refuse a valid checkpoint, a picture of any size, a resume of the wrong
network, a mid-epoch resume (its time left and its epoch's metrics), a shipped recipe from another
folder, the disk a run's checkpoints take, messages of several processes, the progress bar's units.
Most run a registered tiny network (tests/test_model_catalog.py) for seconds.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from lightning.pytorch.callbacks import Callback
from robustness import assert_one_line_error, record_files, record_runs
from test_model_catalog import registered  # noqa: F401 - the fixture, for the tiny networks

from conftest import CPU, CliResult

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny_cnn", *CPU, "--batch-size", "20", "--val-size", "20", "--eval-batch-size", "50",
        "--log-every-n-steps", "1", "--data-path", "loader"]


def probe(script: str, *args: str, env: dict[str, str] | None = None) -> tuple[CliResult, str]:
    """``script`` run in a fresh process as its ``__main__`` does (tests/import_probe.py): the result,
    and which heavy libraries it had imported by its exit."""
    done = subprocess.run([sys.executable, "tests/import_probe.py", script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    err_lines = done.stderr.strip().splitlines()
    imported = err_lines.pop() if err_lines and err_lines[-1].startswith("IMPORTED: ") else "IMPORTED: ?"
    return CliResult(done.returncode, done.stdout, "\n".join(err_lines), script, tuple(args)), imported


# --- numbers beyond what a library takes --------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seed=4294967296"], "--seed: must be at most 4,294,967,295"),
        (["--seed", "99999999999999999999999"], "--seed: must be at most"),
        (["--epochs", "9223372036854775808"], "--epochs: must be at most 9,223,372,036,854,775,807"),
        (["--batch-size", "1" + "0" * 30], "--batch-size: must be at most"),
        (["--log-every-n-steps", "1" + "0" * 20], "--log-every-n-steps: must be at most"),
    ],
)
def test_numbers_beyond_what_numpy_or_torch_take_are_refused_with_the_flags(args, fragment):
    """--seed above 2**32 - 1 (numpy's seeds) and counts above int64: one line, before torch loads."""
    result, imported = probe("train", *args, "--accelerator", "cpu")
    assert_one_line_error(result, fragment)
    assert imported == "IMPORTED: none", imported


def test_the_largest_seed_is_taken(tmp_path):
    """2**32 - 1 itself is a seed Lightning takes."""
    from cli.train import parse_run_config

    config = parse_run_config(["--seed", str(2**32 - 1), "--accelerator", "cpu", "--output-dir", str(tmp_path)])
    assert config.seed == 2**32 - 1
    import lightning as L

    L.seed_everything(config.seed, verbose=False)


def test_a_seed_too_large_in_a_config_file_names_its_line(cli, tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("epochs: 1\nseed: 4294967296\n")
    result = cli("train", "--config", str(config), "--accelerator", "cpu")
    assert_one_line_error(result, "big.yaml", "line 2", "at most 4,294,967,295")


# --- predict.py: a default that refuses, a reader that leaves, a picture of any size ------------


@pytest.fixture
def two_class_checkpoint(registered, tmp_path) -> Path:  # noqa: F811 - the fixture imported above
    """A course-style state dict of the tiny CNN with 2 classes (a few kB)."""
    from models.catalog import build_model

    torch.manual_seed(0)
    path = tmp_path / "binary.ckpt"
    torch.save(build_model("tiny_cnn", 2).state_dict(), path)
    return path


def test_the_default_top_k_never_refuses_a_checkpoint_of_fewer_classes(cli, two_class_checkpoint, tmp_path):
    """No --top-k with a 2-class checkpoint: both classes are shown; a --top-k typed above 2 is still refused."""
    picture = tmp_path / "cat.png"
    Image.fromarray(np.full((40, 40, 3), 120, dtype=np.uint8)).save(picture)
    result = cli("predict", "--ckpt", str(two_class_checkpoint), str(picture), "--json", "--accelerator", "cpu")
    assert result.code == 0, result.err
    assert len(json.loads(result.out)["top_k"]) == 2
    assert_one_line_error(cli("predict", "--ckpt", str(two_class_checkpoint), str(picture), "--top-k", "3",
                              "--accelerator", "cpu"), "--top-k 3", "2 classes")


@pytest.mark.slow
def test_a_picture_of_any_size_is_classified_without_pillows_warning(cli, two_class_checkpoint, tmp_path, recwarn):
    """A 180-megapixel panorama (above Pillow's decompression-bomb limit) and a 90-megapixel one
    (above its warning): both classified, no warning, the same way as any picture."""
    from run.inference import load_image

    limit = Image.MAX_IMAGE_PIXELS
    huge, large = tmp_path / "panorama.jpg", tmp_path / "wide.jpg"
    # Saved as JPEG, which compresses a flat picture to a few hundred kB.
    Image.new("RGB", (30_000, 6_000), (200, 30, 30)).save(huge, quality=50)
    Image.new("RGB", (15_000, 6_000), (30, 30, 200)).save(large, quality=50)
    assert 30_000 * 6_000 > 2 * limit and 15_000 * 6_000 > limit
    result = cli("predict", "--ckpt", str(two_class_checkpoint), str(huge), str(large), "--json", "--accelerator", "cpu")
    assert result.code == 0, result.err
    assert result.err == "" and not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
    assert [Path(json.loads(line)["file"]).name for line in result.out.splitlines()] == ["panorama.jpg", "wide.jpg"]
    pixels = load_image(huge)
    assert pixels.shape == (3, 32, 32) and abs(int(pixels[0, 16, 16]) - 200) < 8
    assert Image.MAX_IMAGE_PIXELS == limit  # the guard is back for everything else in the process


def test_a_huge_picture_in_training_data_is_named_with_its_size(tmp_path):
    """The same panorama in a data folder: refused as not 32x32, not as Pillow's 'decompression bomb DOS attack'."""
    from base.errors import UserError
    from datamodules.sources import _decode_image

    huge = tmp_path / "panorama.jpg"
    Image.new("RGB", (30_000, 6_000), (200, 30, 30)).save(huge, quality=50)
    with pytest.raises(UserError) as error, open(huge, "rb") as data:
        _decode_image(data, "train/cat/panorama.jpg")
    assert "train/cat/panorama.jpg" in str(error.value) and "32x32" in str(error.value)
    assert "attack" not in str(error.value)


@pytest.mark.parametrize("script", [pytest.param("predict", marks=pytest.mark.slow), "train"])
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(tmp_path, script):
    """``predict.py --json FOLDER | head -n 1`` (and ``train.py --print-config | head -n 1``): no
    BrokenPipeError traceback, nothing on stderr, the exit code of a process ended by SIGPIPE (141)."""
    if script == "predict":
        from models.catalog import build_model

        folder = tmp_path / "pictures"
        folder.mkdir()
        for i in range(40):
            Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(folder / f"{i:02d}.png")
        checkpoint = tmp_path / "course.ckpt"
        # A course state dict of VGG16 without its weights' size: the file is read for its keys and shapes.
        torch.save({k: torch.zeros_like(v) for k, v in build_model("vgg16", 10).state_dict().items()}, checkpoint)
        args = ["--ckpt", str(checkpoint), "--json", "--batch-size", "1", "--accelerator", "cpu", str(folder)]
    else:
        args = ["--print-config", "--accelerator", "cpu"]
    command = [sys.executable, f"{script}.py", *args]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}) as process:
        first = process.stdout.readline()
        process.stdout.close()  # what head does after its line
        err = process.stderr.read().decode()
        code = process.wait(timeout=300)
    assert first, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err.strip() == "", err
    assert code in (0, 141), (code, err)


# --- stops: a hang-up, Ctrl-C in every phase, several processes ---------------------------------


class _SignalAt(Callback):
    """Sends this process ``signum`` after training step ``step``, or at the first batch of the sanity check."""

    def __init__(self, signum: int, step: int | None = None, sanity: bool = False) -> None:
        self.signum, self.step, self.sanity, self.sent = signum, step, sanity, False

    def _send(self) -> None:
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.sanity and trainer.sanity_checking:
            self._send()


@pytest.fixture
def signal_at(extra_callback):
    """``signal_at(signum, step=n)``: the next train.py run in this process gets ``signum`` there."""

    def arm(signum: int, step: int | None = None, sanity: bool = False) -> None:
        extra_callback(lambda: _SignalAt(signum, step, sanity))

    return arm


@pytest.fixture
def slow_disk(monkeypatch):
    """Every checkpoint takes 0.4 s more to write: the epoch's saves are still queued to the
    background writer when the next steps train."""
    import time

    from callbacks.checkpoints import AtomicCheckpointIO

    real = AtomicCheckpointIO.save_checkpoint

    def slow(self, *args, **kwargs):
        time.sleep(0.4)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", slow)


# SIGXCPU takes the same path as SIGHUP: the unit tier tries one of them.
@pytest.mark.parametrize("name", ["SIGHUP", pytest.param("SIGXCPU", marks=pytest.mark.slow)])
def test_a_hang_up_stops_the_run_as_sigterm_does_and_loses_no_queued_checkpoint(
        cli, registered, tiny_data, tmp_path, signal_at, slow_disk, name):  # noqa: F811
    """SIGHUP (the SSH session closed) in epoch 2, while epoch 1's checkpoints are still being
    written: exit 143, every checkpoint whole, last.ckpt at the stop, and --resume last finishes the run."""
    signum = getattr(signal, name)
    # Ignored outside the run: where a run left the signal's default action in place, the test
    # fails on its exit code instead of pytest itself being killed.
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        _hang_up_and_resume(cli, tiny_data, tmp_path, signal_at, name, signum)
    finally:
        signal.signal(signum, previous)


def _hang_up_and_resume(cli, tiny_data, tmp_path, signal_at, name, signum) -> None:
    signal_at(signum, step=3)
    run = tmp_path / "runs" / "tiny_cnn" / "version_0"
    args = [*TINY, "--train-limit", "40", "--epochs", "3", "--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "runs")]
    stopped = cli("train", *args)
    assert stopped.code == 143, stopped.err[-2000:]
    assert f"stopped by {name} in epoch 2, after step 3" in stopped.err
    saved = {path.name: torch.load(path, map_location="cpu", weights_only=True)
             for path in sorted((run / "checkpoints").glob("*.ckpt"))}
    record_files(f"checkpoints after {name} with saves queued", len(saved), 0)
    assert {"best.ckpt", "last.ckpt"} <= set(saved) and saved["last.ckpt"]["global_step"] == 3
    assert not list((run / "checkpoints").glob(".*.tmp"))
    signal_at(signal.SIGHUP, step=-1)  # armed for no step: the resume runs undisturbed
    resumed = cli("train", *CPU, "--resume", "last", "--output-dir", str(tmp_path / "runs"))
    record_runs(f"a run stopped by {name} and resumed", 1, int(resumed.code != 0))
    assert resumed.code == 0, resumed.err[-2000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 6


def test_ctrl_c_during_the_range_test_exits_130_with_our_own_line(cli, registered, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """Ctrl-C in the learning-rate range test (--lr find): exit 130 and one line of ours, not
    Lightning's exit 1 and its advice about ModelCheckpoint callbacks."""
    from lightning.pytorch.tuner import lr_finder

    # The sweep runs with Lightning's callback alone (it sets the trainer's callbacks aside): the key is pressed from it.
    real = lr_finder._LRCallback.on_train_batch_end

    def pressed(self, trainer, *args, **kwargs):
        real(self, trainer, *args, **kwargs)
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(lr_finder._LRCallback, "on_train_batch_end", pressed)
    result = cli("train", *TINY, "--lr", "find", "--epochs", "1", "--data-dir", str(tiny_data),
                 "--output-dir", str(tmp_path / "runs"))
    assert result.code == 130, result.err[-2000:]
    lines = [line for line in result.err.strip().splitlines() if line.strip()]
    assert lines == ["cli: stopped by Ctrl-C during the learning-rate range test; nothing was trained or saved"], result.err
    assert "ModelCheckpoint" not in result.out + result.err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_ctrl_c_before_the_first_training_step_exits_130_and_leaves_no_run(cli, registered, tiny_data, tmp_path,  # noqa: F811
                                                                           signal_at):
    """Ctrl-C during the sanity check (Lightning's own handling there: exit 1): 130, our line, no run folder left."""
    signal_at(signal.SIGINT, sanity=True)
    result = cli("train", *TINY, "--train-limit", "40", "--epochs", "1", "--data-dir", str(tiny_data),
                 "--output-dir", str(tmp_path / "runs"))
    assert result.code == 130, result.err[-2000:]
    assert "cli: stopped by Ctrl-C outside a training step" in result.err
    assert not list((tmp_path / "runs").glob("tiny_cnn/version_*"))


def test_stop_messages_come_from_the_first_process_only(capsys, monkeypatch):
    """Every process of a run gets the stop; only rank 0 says so (torchrun's RANK, SLURM's SLURM_PROCID,
    Lightning's rank once set)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from base.errors import Interrupted
    from base.slurm import process_rank
    from cli.flags import one_line_errors

    def stopped(argv):
        with one_line_errors(argv):
            raise Interrupted("stopped by Ctrl-C (exit code 130)")

    for rank in (0, 1):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        with pytest.raises(SystemExit) as exit_info:
            stopped([])
        assert exit_info.value.code == 130
        assert capsys.readouterr().err.count("stopped by Ctrl-C") == (1 if rank == 0 else 0)
    monkeypatch.delattr(rank_zero_only, "rank")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert process_rank() == 3


# --- the shipped recipes from any folder --------------------------------------------------------


@pytest.mark.parametrize("given", ["resnet50_fast", "resnet50_fast.yaml", "configs/resnet50_fast.yaml"])
def test_a_shipped_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch, capsys, given):
    """``cifar10-train --config resnet50_fast`` (or configs/resnet50_fast.yaml) typed in another folder
    reads the project's configs/resnet50_fast.yaml; the run records that file."""
    from cli.train import parse_run_config

    monkeypatch.chdir(tmp_path)
    config = parse_run_config(["--config", given, "--accelerator", "cpu"])
    assert config.model == "resnet50" and config.optimizer == "sgd" and config.batch_size == 128
    assert config.config == ROOT / "configs" / "resnet50_fast.yaml"
    said = capsys.readouterr().err
    assert ("using the shipped recipe" in said) == ("/" in given)


def test_a_file_of_the_same_path_in_the_current_folder_wins(tmp_path, monkeypatch):
    from cli.train import parse_run_config

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "resnet50_fast.yaml").write_text("model: vgg16\nepochs: 2\n")
    monkeypatch.chdir(tmp_path)
    config = parse_run_config(["--config", "configs/resnet50_fast.yaml", "--accelerator", "cpu"])
    assert config.model == "vgg16" and config.epochs == 2


@pytest.mark.parametrize(
    ("given", "meant"),
    [("resnet50_fats", "resnet50_fast"), ("configs/vgg16-fast.yaml", "configs/vgg16_fast.yaml"),
     ("vgg16_bn_fst.yaml", "vgg16_bn_fast.yaml")],
)
def test_an_unknown_recipe_name_lists_the_shipped_ones(tmp_path, given, meant):
    """A mistyped recipe, as a name or as the recipe's file: the closest one, typed the same way."""
    result, imported = probe("train", "--config", given, "--accelerator", "cpu")
    assert_one_line_error(result, f"--config {given}", f"did you mean {meant}?", "vgg16_fast")
    assert imported == "IMPORTED: none"


# --- which run --resume last continues -------------------------------------------------------------


@pytest.fixture
def two_networks_runs(tmp_path) -> Path:
    """runs/resnet50/version_0 (the one meant), then a stray runs/vgg16/version_0 written to later."""
    import time

    import yaml

    runs = tmp_path / "runs"
    for age, model in ((100, "resnet50"), (0, "vgg16")):
        run = runs / model / "version_0"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"model": model, "epochs": 3, "accelerator": "cpu",
                                                         "devices": 1, "precision": "32-true"}))
        (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04" + bytes(60))
        for path in (run / "config.yaml", run / "checkpoints" / "last.ckpt"):
            os.utime(path, (time.time() - age, time.time() - age))
    return runs


@pytest.mark.slow
def test_resume_last_with_a_model_means_that_networks_newest_run(two_networks_runs, tmp_path):
    """--model resnet50 (or a config naming it) with --resume last: the ResNet50 run, not the newer VGG16 one."""
    from run.life.folder import find_resume

    assert find_resume("last", two_networks_runs, "resnet50", None) == two_networks_runs / "resnet50/version_0/checkpoints/last.ckpt"
    config = tmp_path / "mine.yaml"
    config.write_text("model: resnet50\n")
    result, _ = probe("train", "--config", str(config), "--resume", "last", "--output-dir", str(two_networks_runs),
                      "--accelerator", "cpu")
    # The stand-in checkpoint is refused once read: the one read is the ResNet50 run's.
    assert "resnet50/version_0" in result.err and "vgg16" not in result.err, result.err


@pytest.mark.slow
def test_resume_last_without_a_model_says_which_run_before_any_work(two_networks_runs):
    """Without --model the newest run of any network is continued, and where another network has runs
    too the first line, before torch loads, names it and how to take the other network's newest run."""
    result, _ = probe("train", "--resume", "last", "--output-dir", str(two_networks_runs), "--accelerator", "cpu")
    first = result.out.splitlines()[0]
    assert first.startswith("--resume last: continuing ") and "vgg16/version_0" in first, result.out
    assert "add --model resnet50" in first
    # The stand-in checkpoint is then refused: still one line on stderr.
    assert len(result.err.strip().splitlines()) == 1 and "error:" in result.err
    alone, imported = probe("train", "--resume", "last", "--output-dir", str(two_networks_runs), "--model", "vgg16",
                            "--accelerator", "cpu")
    assert "continuing" not in alone.out


def test_resume_last_of_a_run_killed_while_writing_last_ckpt_names_what_it_has(two_networks_runs):
    """A newest run with best.ckpt but no last.ckpt did not stop 'before its first epoch ended': its checkpoints are named."""
    run = two_networks_runs / "vgg16" / "version_0" / "checkpoints"
    (run / "last.ckpt").rename(run / "best.ckpt")
    result, imported = probe("train", "--resume", "last", "--output-dir", str(two_networks_runs), "--accelerator", "cpu")
    assert_one_line_error(result, "has no last.ckpt, only best.ckpt", "--resume ")
    assert "first epoch" not in result.err and imported == "IMPORTED: none"


# --- a mid-epoch resume: the time left, the epoch's metrics --------------------------------------


def test_the_epoch_a_resume_came_into_counts_as_a_whole_epoch_in_the_eta(monkeypatch):
    """Resumed at batch 75 of 100 (6 s a batch, 10 s of validation): the next ETA paces epochs at
    610 s, not at the 160 s that the partial epoch took (4x too low)."""
    from types import SimpleNamespace

    from callbacks import progress

    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    trainer = SimpleNamespace(num_training_batches=100, max_epochs=10, current_epoch=2, is_global_zero=True,
                              sanity_checking=False, strategy=SimpleNamespace(root_device=SimpleNamespace(type="cuda")),
                              precision="32-true")
    clock = progress.RunClock()
    clock.on_train_start(trainer, None)
    for batch_idx in range(75, 100):
        now[0] += 6
        clock.on_train_batch_end(trainer, None, None, None, batch_idx)
    clock.on_validation_start(trainer, None)
    now[0] += 10
    clock.on_train_epoch_end(trainer, None)
    assert clock.epoch_seconds == [pytest.approx(610)]
    trainer.current_epoch = 3
    clock.on_train_epoch_start(trainer, None)
    assert clock.eta_seconds(trainer) == pytest.approx(7 * 610)
    # A whole epoch after it is timed as it is.
    for batch_idx in range(100):
        now[0] += 6
        clock.on_train_batch_end(trainer, None, None, None, batch_idx)
    now[0] += 10
    clock.on_train_epoch_end(trainer, None)
    assert clock.epoch_seconds[-1] == pytest.approx(610)


def test_the_progress_bar_shows_accuracies_as_percentages(monkeypatch):
    """acc/val 0.342 on the bar reads 34.20 %, as the epoch lines and the summary say it; losses stay numbers."""
    from lightning.pytorch.callbacks import RichProgressBar

    from callbacks.progress import ThrottledProgressBar

    monkeypatch.setattr(RichProgressBar, "get_metrics",
                        lambda self, trainer, module: {"acc/val": 0.342, "acc/train": 0.1586, "loss/val": 2.045, "v_num": 0})
    bar = ThrottledProgressBar()
    shown = bar.get_metrics(type("T", (), {"training": False})(), None)
    assert shown == {"acc/val": "34.20 %", "acc/train": "15.86 %", "loss/val": 2.045}


# --- the disk a run's checkpoints take ------------------------------------------------------------


@pytest.mark.parametrize(("free_mib", "expected"), [(2048, "nothing"), (500, "heads-up"), (100, "refused")])
def test_checkpoint_disk_use_is_announced_when_large_against_the_free_disk(tmp_path, monkeypatch, capsys, free_mib,
                                                                            expected):
    """A 250-epoch run keeps 15 checkpoints (best, last, a temporary one, one every 20 epochs) of 12 MiB
    here: said before the run with 500 MiB free (36 %), refused with 100, nothing said with 2 GiB."""
    import shutil
    from collections import namedtuple

    from torch import nn

    from base.errors import UserError
    from cli.train import parse_run_config
    from run.life.session import check_outputs

    config = parse_run_config(["--accelerator", "cpu", "--output-dir", str(tmp_path / "runs")])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 0, free_mib * 2**20))
    module = nn.Linear(1024, 1024, bias=False)  # 4 MiB of weights, 12 MiB with Adam's two moments
    if expected == "refused":
        with pytest.raises(UserError, match="0.2 GiB of checkpoints"):
            check_outputs(config, module)
        return
    check_outputs(config, module)
    said = capsys.readouterr().err
    if expected == "nothing":
        assert said == ""
    else:
        assert said.startswith("heads-up: this run keeps about 0.2 GiB of checkpoints (15 of 12 MiB") and "36 %" in said


# --- a small /dev/shm with loader workers ------------------------------------------------------------


def test_loader_workers_that_dev_shm_cannot_take_are_refused_before_the_run(cli, registered, tiny_data, tmp_path,  # noqa: F811
                                                                             monkeypatch):
    """Docker's 64 MB /dev/shm, nearly full, with --data-path loader --workers 2: one line naming
    the shared memory, --workers 0 and --shm-size, before any run folder (also for test.py's loader)."""
    from run import hardware

    monkeypatch.setattr(hardware, "_shared_memory", lambda: (64 * 2**20, 2**20))
    result = cli("train", *TINY, "--workers", "2", "--train-limit", "40", "--epochs", "1", "--data-dir", str(tiny_data),
                 "--output-dir", str(tmp_path / "runs"))
    assert_one_line_error(result, "--workers 2", "shared memory", "--workers 0", "--shm-size", "64 MiB")
    assert not (tmp_path / "runs" / "tiny_cnn").exists()
    # The device path has no workers, hence needs none.
    fine = cli("train", *TINY, "--data-path", "device", "--workers", "2", "--train-limit", "40", "--epochs", "1",
               "--limit-test-batches", "1", "--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "runs"))
    assert fine.code == 0, fine.err[-2000:]


def test_a_worker_that_runs_out_of_shared_memory_is_one_line(cli, registered, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """The estimate may fall short (other processes fill /dev/shm): torch's 'unable to allocate shared
    memory' from a worker process becomes the same one line, and the run folder goes."""
    from datamodules.cifar10 import TransformedTensorDataset

    def full(self, index):
        raise RuntimeError("unable to allocate shared memory(shm) for file </torch_4242_1_0>: Success (28)")

    monkeypatch.setattr(TransformedTensorDataset, "__getitem__", full)
    result = cli("train", *TINY, "--workers", "1", "--train-limit", "40", "--epochs", "1", "--data-dir", str(tiny_data),
                 "--output-dir", str(tmp_path / "runs"))
    lines = [line for line in result.err.strip().splitlines() if "error:" in line]
    assert result.code == 2 and len(lines) == 1 and "Traceback" not in result.err, result.err[-3000:]
    assert "ran out of shared memory" in lines[0] and "--workers 0" in lines[0]
    assert not list((tmp_path / "runs").glob("tiny_cnn/version_*"))


# --- --compile without a compiler ------------------------------------------------------------------


def test_compile_without_a_compiler_is_refused_before_training(cli, registered, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """--compile on a machine without g++ (or $CXX): one line naming the compiler and the fix,
    before the data is read or a run folder made, not a 150-line InvalidCxxCompiler at the first step."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CXX", raising=False)
    result = cli("train", *TINY, "--compile", "--epochs", "1", "--train-limit", "40", "--data-dir", str(tiny_data),
                 "--output-dir", str(tmp_path / "runs"))
    assert_one_line_error(result, "--compile needs a C++ compiler", "g++", "without --compile")
    assert not (tmp_path / "runs").exists()


def test_the_compiler_looked_for_is_torchs_own_choice(tmp_path):
    """$CXX names the C++ compiler (as TorchInductor reads it), $CC Triton's C compiler; found on PATH, nothing is said."""
    from base.errors import UserError
    from run.hardware import check_compiler

    (tmp_path / "my-g++").write_text("#!/bin/sh\n")
    (tmp_path / "my-g++").chmod(0o755)
    check_compiler("cpu", {"PATH": str(tmp_path), "CXX": "my-g++"})
    with pytest.raises(UserError, match=r"\$CC"):
        check_compiler("gpu", {"PATH": str(tmp_path)})
    check_compiler("gpu", {"PATH": str(tmp_path), "CC": "my-g++ -O2"})
    check_compiler("mps", {"PATH": str(tmp_path)})


# --- curves after a crash and its resume ------------------------------------------------------------


class _CrashAt(Callback):
    """Raises at training step ``step`` as a kill -9 would end the process: nothing saved on the way out."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            from base.errors import UserError

            raise UserError("crash")  # ends the command at once (exit 2), saving nothing


def _curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of ``run`` as TensorBoard shows it: all its events files read as one, purges applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.mark.slow
def test_curves_after_a_crash_and_a_resume_show_each_step_once(cli, registered, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """A crash in epoch 3 of a run whose last.ckpt is epoch 1's (written at most once a minute),
    then --resume last: every curve has one point per step, the steps of the same run uninterrupted."""
    from run import build as run_build

    args = [*TINY, "--train-limit", "40", "--epochs", "3", "--limit-test-batches", "1", "--data-dir", str(tiny_data)]
    straight = cli("train", *args, "--output-dir", str(tmp_path / "straight"))
    assert straight.code == 0, straight.err[-2000:]
    expected = {tag: [step for step, _ in points] for tag, points in _curves(tmp_path / "straight/tiny_cnn/version_0").items()}

    real = run_build.build_callbacks

    def build_callbacks(*a, **k):
        callbacks = real(*a, **k)
        callbacks.all.append(_CrashAt(5))
        return callbacks

    with monkeypatch.context() as patch:
        patch.setattr(run_build, "build_callbacks", build_callbacks)
        crashed = cli("train", *args, "--output-dir", str(tmp_path / "runs"))
    assert crashed.code != 0
    run = tmp_path / "runs" / "tiny_cnn" / "version_0"
    assert torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    resumed = cli("train", *CPU, "--resume", "last", "--output-dir", str(tmp_path / "runs"))
    assert resumed.code == 0, resumed.err[-2000:]
    curves = _curves(run)
    for tag, steps in expected.items():
        got = [step for step, _ in curves[tag]]
        assert got == steps, (tag, got, steps)
    record_runs("a run crashed (kill -9) after last.ckpt, resumed: its curves", 1, 0)


@pytest.mark.slow
def test_the_epoch_a_run_was_stopped_in_reports_the_training_metrics_of_all_its_batches(
        cli, registered, tiny_data, tmp_path, sigterm_at):  # noqa: F811
    """Stopped after the first of epoch 2's three batches and resumed: that epoch's loss/train_epoch and
    acc/train, in the console and the curves, are those of the run without the stop (not of its last two batches)."""
    args = [*TINY, "--train-limit", "60", "--epochs", "2", "--limit-test-batches", "1", "--data-dir", str(tiny_data)]
    sigterm_at()
    straight = cli("train", *args, "--output-dir", str(tmp_path / "straight"))
    assert straight.code == 0, straight.err[-2000:]
    sigterm_at(step=4)
    stopped = cli("train", *args, "--output-dir", str(tmp_path / "runs"))
    assert stopped.code == 143, stopped.err[-2000:]
    sigterm_at()
    resumed = cli("train", *CPU, "--resume", "last", "--output-dir", str(tmp_path / "runs"))
    assert resumed.code == 0, resumed.err[-2000:]
    expected = _curves(tmp_path / "straight/tiny_cnn/version_0")
    got = _curves(tmp_path / "runs/tiny_cnn/version_0")
    for tag in ("loss/train_epoch", "acc/train"):
        assert [step for step, _ in got[tag]] == [step for step, _ in expected[tag]], tag
        assert [value for _, value in got[tag]] == pytest.approx([value for _, value in expected[tag]], abs=1e-5), tag
    epoch_2 = [line for line in resumed.out.splitlines() if line.startswith("epoch 2/2")]
    assert epoch_2 and epoch_2[0].split(" | ")[1] == next(
        line for line in straight.out.splitlines() if line.startswith("epoch 2/2")).split(" | ")[1]
    record_runs("a run stopped mid-epoch and resumed: the epoch's training metrics", 1, 0)


@pytest.mark.parametrize("where", [
    {"during": "validation", "epoch": 2},
    pytest.param({"step": 4}, marks=pytest.mark.slow),
    pytest.param({"epoch": 1}, marks=pytest.mark.slow),
])
def test_a_resume_after_a_stop_keeps_every_point_of_the_curves(cli, registered, tiny_data, tmp_path, sigterm_at,  # noqa: F811
                                                               where):
    """The purge of a resume's first step never hides a point that the resume does not log again: a stop
    during validation, in an epoch's last batch or at its end, resumed, shows the uninterrupted run's curves."""
    args = [*TINY, "--train-limit", "40", "--epochs", "3", "--limit-test-batches", "1", "--data-dir", str(tiny_data)]
    sigterm_at()
    assert cli("train", *args, "--output-dir", str(tmp_path / "straight")).code == 0
    sigterm_at(**where)
    stopped = cli("train", *args, "--output-dir", str(tmp_path / "runs"))
    assert stopped.code == 143, stopped.err[-2000:]
    sigterm_at()
    assert cli("train", *CPU, "--resume", "last", "--output-dir", str(tmp_path / "runs")).code == 0
    expected = _curves(tmp_path / "straight/tiny_cnn/version_0")
    got = _curves(tmp_path / "runs/tiny_cnn/version_0")
    for tag in ("acc/val", "loss/val", "acc/train", "loss/train_epoch", "loss/train_step", "grad_norm/train", "lr", "acc/test"):
        assert [step for step, _ in got[tag]] == [step for step, _ in expected[tag]], (tag, got[tag], expected[tag])
