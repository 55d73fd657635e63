"""Nothing lost: atomic checkpoints, exact resume, preemption by signal, divergence, portable checkpoints."""
from __future__ import annotations

import errno
import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from robustness import assert_one_line_error, record_files

from base.errors import UserError
from lit_modules import ImageClassifier
from callbacks.checkpoints import AtomicCheckpointIO
from callbacks.resume import capture_rng_state, restore_rng_state
from models import build_model

# Tiny runs: 40 training images in 2 batches, 20 for validation, on the CPU in this process.
QUICK = ["--model", "vgg16", "--accelerator", "cpu", "--workers", "0", "--batch-size", "20", "--train-limit", "40",
         "--val-size", "20", "--eval-batch-size", "50", "--log-every-n-steps", "1"]
STEPS_PER_EPOCH = 2


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, tiny_data) -> Path:
    """A finished one-epoch run; returns its run folder. Tests must leave its checkpoints as they are."""
    from conftest import load_script

    output = tmp_path_factory.mktemp("runs")
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(load_script("train").main([*QUICK, "--data-dir", str(tiny_data), "--epochs", "1",
                                            "--output-dir", str(output)]))
    assert exit_info.value.code == 0
    yield output / "vgg16" / "version_0"
    shutil.rmtree(output, ignore_errors=True)  # checkpoints are large; pytest would keep them


# --- atomic checkpoints ------------------------------------------------------------------------


def _write_half_then_fail(error: BaseException):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half a file is on disk when the failure strikes
        raise error

    return save


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that fails half-way (after bytes were written) keeps the previous checkpoint."""
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "epoch": 1}, target)
    before = digest(target)
    monkeypatch.setattr(torch, "save", _write_half_then_fail(RuntimeError("simulated crash")))
    with pytest.raises(RuntimeError, match="simulated crash"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "epoch": 2}, target)
    intact = digest(target) == before and load(target)["epoch"] == 1
    record_files("last.ckpt after a save that raised half-way", 1, int(not intact))
    assert intact
    assert temp_files(tmp_path) == []


@pytest.mark.slow
def test_disk_full_during_training_keeps_every_checkpoint(cli, one_epoch_run, tiny_data, monkeypatch):
    """A full disk while training saves: one-line error, the previous checkpoints intact."""
    checkpoints = one_epoch_run / "checkpoints"
    before = {path.name: digest(path) for path in checkpoints.glob("*.ckpt")}
    monkeypatch.setattr(torch, "save", _write_half_then_fail(OSError(errno.ENOSPC, "No space left on device")))
    result = cli("train", *QUICK, "--resume", str(checkpoints / "last.ckpt"), "--epochs", "2",
                 "--data-dir", str(tiny_data))
    monkeypatch.undo()
    assert_one_line_error(result, "cannot write checkpoint", "No space left on device", "the previous one is intact")
    after = {path.name: digest(path) for path in checkpoints.glob("*.ckpt")}
    damaged = [name for name in before if after.get(name) != before[name]]
    record_files("checkpoints of the run after a disk-full save", len(before), len(damaged))
    assert not damaged and after.keys() == before.keys()
    assert load(checkpoints / "last.ckpt")["epoch"] == 0
    assert temp_files(checkpoints) == []


def test_checkpoint_io_refuses_non_finite_weights(tmp_path):
    """The checkpoint writer itself refuses NaN/inf weights and leaves the old file."""
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    with pytest.raises(UserError, match="refusing to write checkpoint .*1 weight tensor.*w"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("inf"), 0.0])}}, target)
    assert torch.equal(load(target)["state_dict"]["w"], torch.ones(3))


_SAVE_AND_STOP = """
import io, os, sys, time
import torch
sys.path.insert(0, {root!r})
import base.files
from callbacks.checkpoints import BackgroundCheckpointIO
from callbacks.checkpoints import AtomicCheckpointIO

target, stage, background = sys.argv[1], sys.argv[2], sys.argv[3] == "background"
writer = BackgroundCheckpointIO(AtomicCheckpointIO()) if background else AtomicCheckpointIO()


def save(step):
    writer.save_checkpoint({{"step": step, "state_dict": {{"w": torch.full((1 << 20,), float(step))}}}}, target)
    if background:
        writer.wait()


def stop_here():
    # The parent kills this process once it reads the line: the kill lands exactly here.
    print(f"at {{stage}}", flush=True)
    time.sleep(600)
    os._exit(3)


save(1)  # complete on disk
real_save, real_replace, real_fsync_folder = torch.save, os.replace, base.files._fsync_folder


def torch_save(obj, f, *args, **kwargs):
    if stage == "created":
        stop_here()  # the temporary file exists, empty
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    if stage == "half":
        f.write(data[: len(data) // 2])
        f.flush()
        stop_here()
    f.write(data)
    f.flush()
    if stage == "written":
        stop_here()  # all of it written, neither fsynced nor renamed


def replace(source, destination):
    if stage == "renaming":
        stop_here()  # fsynced, not renamed
    real_replace(source, destination)


def fsync_folder(folder):
    if stage == "renamed":
        stop_here()  # renamed, the folder's entry not yet fsynced
    real_fsync_folder(folder)


torch.save, os.replace, base.files._fsync_folder = torch_save, replace, fsync_folder
save(2)
print("at end", flush=True)
"""
# Where the SIGKILL lands in the second save, and which checkpoint must be on disk after it.
KILL_POINTS = [("created", 1), ("half", 1), ("written", 1), ("renaming", 1), ("renamed", 2)]


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["atomic", "background"])
def test_sigkill_during_saves_never_leaves_a_broken_checkpoint(tmp_path, writer):
    """SIGKILL of a real process at each point of a save (file created, half written, written,
    fsynced, renamed), directly or from the background writer: the checkpoint loads, whole, and the
    temporary file stays apart. The kill is sent from inside the save, so it always lands there."""
    script = tmp_path / "save_and_stop.py"
    script.write_text(_SAVE_AND_STOP.format(root=str(ROOT)))
    folder = tmp_path / "checkpoints"
    target = folder / "last.ckpt"
    for stage, expected in KILL_POINTS:
        process = subprocess.Popen([sys.executable, str(script), str(target), stage, writer], stdout=subprocess.PIPE,
                                   text=True)
        try:
            reached = process.stdout.readline().strip()
        finally:
            process.kill()
            process.wait(timeout=60)
            process.stdout.close()
        assert reached == f"at {stage}", reached
        leftovers = temp_files(folder)
        checkpoint = load(target)
        complete = checkpoint["step"] == expected and torch.equal(checkpoint["state_dict"]["w"],
                                                                  torch.full((1 << 20,), float(expected)))
        record_files(f"last.ckpt after SIGKILL {stage} ({writer} writer)", 1, int(not complete))
        assert complete, (stage, checkpoint["step"])
        # What --resume last and a user's *.ckpt glob see: the real checkpoint only.
        assert list(folder.glob("*.ckpt")) == [target]
        assert all(p.name.startswith(".last.ckpt.") for p in leftovers)
        assert bool(leftovers) == (expected == 1), (stage, leftovers)
    AtomicCheckpointIO().save_checkpoint({"step": 0, "state_dict": {}}, target)
    assert temp_files(folder) == [], "the next save removes what killed saves left"


# --- exact resume ------------------------------------------------------------------------------


def test_rng_state_survives_weights_only_loading(tmp_path):
    """The RNG states go into checkpoints as plain types, so weights_only loading accepts them."""
    torch.manual_seed(3)
    state = capture_rng_state()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    expected = (torch.rand(3), np.random.rand(), random.random())
    restore_rng_state(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.rand(), random.random()) == expected[1:]


@pytest.mark.slow
@pytest.mark.parametrize("data_path", ["loader", "device"])
def test_resume_is_exact(cli, tiny_data, tmp_path, data_path):
    """2 epochs, then resumed to 4, equal 4 straight: weights, optimiser, scheduler and step, all exactly."""
    # The loader path shuffles and augments from the global RNGs, the device path from per-epoch
    # generators; dropout draws from the global RNG on both.
    recipe = [*QUICK, "--data-dir", str(tiny_data), "--data-path", data_path, "--step-size", "1", "--gamma", "0.5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli("train", *recipe, "--epochs", "4", "--output-dir", str(straight)).code == 0
    assert cli("train", *recipe, "--epochs", "2", "--output-dir", str(split)).code == 0
    resumed = cli("train", *recipe, "--epochs", "4", "--output-dir", str(split), "--resume", "last")
    assert resumed.code == 0, resumed.err
    assert not (split / "vgg16" / "version_1").exists()

    a = load(straight / "vgg16" / "version_0" / "checkpoints" / "last.ckpt")
    b = load(split / "vgg16" / "version_0" / "checkpoints" / "last.ckpt")
    assert a["epoch"] == b["epoch"] == 3 and a["global_step"] == b["global_step"] == 4 * STEPS_PER_EPOCH
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][key], b["state_dict"][key]) for key in a["state_dict"])
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 0
    for index in state_a:
        assert all(torch.equal(state_a[index][name], state_b[index][name]) for name in state_a[index])
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["lr_schedulers"][0]["_last_lr"] == [1e-3 * 0.5**4]
    assert a["loops"]["fit_loop"]["epoch_progress"] == b["loops"]["fit_loop"]["epoch_progress"]


# --- preemption --------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_refuses_to_stretch_a_per_step_schedule(cli, tiny_data, tmp_path):
    """--resume of a one-cycle run with more epochs than its schedule was built for."""
    recipe = [*QUICK, "--data-dir", str(tiny_data), "--output-dir", str(tmp_path), "--scheduler", "onecycle"]
    assert cli("train", *recipe, "--epochs", "1").code == 0
    last = tmp_path / "vgg16" / "version_0" / "checkpoints" / "last.ckpt"
    before = digest(last)
    result = cli("train", *recipe, "--epochs", "2", "--resume", "last")
    assert_one_line_error(result, "--epochs 2 (the run has 1): its onecycle schedule was built", "--weights")
    record_files("the resumed run's last.ckpt", 1, int(digest(last) != before))
    assert digest(last) == before


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_last_checkpoint_exits_143_and_resumes(cli, tiny_data, tmp_path, signame):
    """SIGTERM (or the --requeue-signal) to a real train.py: last.ckpt saved, exit 143, --resume last works."""
    output = tmp_path / "runs"
    last = output / "vgg16" / "version_0" / "checkpoints" / "last.ckpt"
    requeue = ["--requeue-signal", signame] if signame != "SIGTERM" else []
    command = [sys.executable, "train.py", *QUICK, "--data-dir", str(tiny_data), "--epochs", "1000",
               "--output-dir", str(output), *requeue]
    with (tmp_path / "out.txt").open("w") as out, (tmp_path / "err.txt").open("w") as err:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 300
            while not last.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert last.exists(), (tmp_path / "err.txt").read_text()[-2000:]
            process.send_signal(getattr(signal, signame))
            code = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    stderr = (tmp_path / "err.txt").read_text()
    assert code == 143, stderr[-2000:]
    assert f"stopped by {signame}" in stderr and f"saved {last}" in stderr
    try:
        checkpoint = load(last)
    finally:
        record_files(f"last.ckpt after {signame}", 1, int("checkpoint" not in locals()))
    epoch, step = checkpoint["epoch"], checkpoint["global_step"]
    assert step >= STEPS_PER_EPOCH and checkpoint["state_dict"]
    if signame != "SIGTERM":
        return  # the requeue signal is forwarded as SIGTERM: from here on the path is the same

    result = cli("train", "--resume", "last", "--output-dir", str(output), "--epochs", str(epoch + 2),
                 "--data-dir", str(tiny_data), *QUICK)
    assert result.code == 0, result.err
    finished = load(last)
    # The interrupted epoch is completed, not repeated nor skipped.
    assert finished["epoch"] == epoch + 1 and finished["global_step"] == (epoch + 2) * STEPS_PER_EPOCH


# --- divergence --------------------------------------------------------------------------------


@pytest.mark.slow
def test_exploding_learning_rate_stops_with_one_line(cli, tiny_data, tmp_path):
    """A learning rate so high that the loss becomes NaN: stopped, no checkpoint written."""
    output = tmp_path / "runs"
    result = cli("train", *QUICK, "--data-dir", str(tiny_data), "--epochs", "3", "--lr", "1e30",
                 "--output-dir", str(output))
    assert_one_line_error(result, "training diverged", "step 2 (epoch 0)", "--lr 1e+29")
    assert list(output.rglob("*.ckpt")) == []


@pytest.mark.slow
def test_nan_loss_found_at_epoch_end_before_any_checkpoint(cli, tiny_data, tmp_path, monkeypatch):
    """A NaN loss between two checks is caught at the epoch's end, before its checkpoints."""
    training_step = ImageClassifier.training_step

    def nan_from_step_5(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= 4 else loss

    monkeypatch.setattr(ImageClassifier, "training_step", nan_from_step_5)
    output = tmp_path / "runs"
    # 5 batches an epoch, checked every 4 steps: step 5 is seen by the check after the last batch.
    result = cli("train", *QUICK, "--train-limit", "100", "--log-every-n-steps", "4", "--epochs", "2",
                 "--data-dir", str(tiny_data), "--output-dir", str(output))
    assert_one_line_error(result, "training diverged", "step 5 (epoch 0)")
    assert list(output.rglob("*.ckpt")) == []


@pytest.mark.slow
def test_non_finite_weights_are_never_saved(cli, tiny_data, tmp_path, monkeypatch):
    """Weights that became NaN while the loss stayed finite: stopped when the checkpoint is due, none written."""
    training_step = ImageClassifier.training_step

    def poison_the_last_layer(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        if self.global_step == 1:
            with torch.no_grad():
                self.backbone.classifier[5].bias.fill_(float("nan"))
        return loss

    monkeypatch.setattr(ImageClassifier, "training_step", poison_the_last_layer)
    output = tmp_path / "runs"
    result = cli("train", *QUICK, "--epochs", "2", "--data-dir", str(tiny_data), "--output-dir", str(output))
    assert_one_line_error(result, "training diverged: the weights became NaN or infinite by step 2",
                          "backbone.classifier.5.bias", "(epoch 0)")
    assert list(output.rglob("*.ckpt")) == []


# --- checkpoints from elsewhere ----------------------------------------------------------------


def _save_as_if_on_cuda(obj: object, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.save records each storage's device; tag them "cuda:0" as a GPU run would.
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(obj, path)


@pytest.mark.slow
def test_wrapped_and_gpu_checkpoints_test_like_the_plain_one(cli, tiny_data, tmp_path, monkeypatch):
    """Lightning checkpoints with DDP "module." / torch.compile "_orig_mod." prefixes or GPU tensors work in test.py."""
    torch.manual_seed(0)
    weights = build_model("vgg16").state_dict()
    hparams = {"model_name": "vgg16", "num_classes": 10, "model_options": {}}

    def lightning_checkpoint(prefix: str) -> dict:
        return {"hyper_parameters": hparams, "state_dict": {prefix + key: value for key, value in weights.items()}}

    files = {
        "plain": lightning_checkpoint("backbone."),
        "ddp": lightning_checkpoint("module.backbone."),
        "compiled": lightning_checkpoint("backbone._orig_mod."),
        "ddp_compiled": lightning_checkpoint("module._orig_mod.backbone."),
    }
    for name, checkpoint in files.items():
        torch.save(checkpoint, tmp_path / f"{name}.ckpt")
    _save_as_if_on_cuda(files["plain"], tmp_path / "gpu.ckpt", monkeypatch)
    if not torch.cuda.is_available():
        # Proof that the file is a real GPU checkpoint: without map_location it cannot load here.
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.ckpt", weights_only=True)

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(kwargs) or real_load(*args, **kwargs))
    results = {}
    for name in [*files, "gpu"]:
        report = tmp_path / f"{name}.json"
        result = cli("test", "--ckpt", str(tmp_path / f"{name}.ckpt"), "--data-dir", str(tiny_data),
                     "--accelerator", "cpu", "--workers", "0", "--json", str(report))
        assert result.code == 0, (name, result.err)
        results[name] = json.loads(report.read_text())
    assert loads and all(kwargs.get("weights_only") is True and kwargs.get("map_location") == "cpu" for kwargs in loads)
    plain = results["plain"]
    for name, result in results.items():
        assert result["checkpoint_kind"] == "lightning"
        assert (result["accuracy"], result["loss"]) == (plain["accuracy"], plain["loss"]), name


@pytest.mark.slow
def test_resume_from_a_gpu_checkpoint_on_the_cpu(cli, one_epoch_run, tiny_data, tmp_path, monkeypatch):
    """A last.ckpt written on a GPU resumes on a CPU-only machine."""
    run = tmp_path / "gpu-run"  # the run folder as copied from the GPU machine
    shutil.copytree(one_epoch_run, run)
    gpu_last = run / "checkpoints" / "last.ckpt"
    _save_as_if_on_cuda(load(one_epoch_run / "checkpoints" / "last.ckpt"), gpu_last, monkeypatch)
    result = cli("train", *QUICK, "--resume", str(gpu_last), "--epochs", "2", "--data-dir", str(tiny_data))
    assert result.code == 0, result.err
    resumed = load(gpu_last)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * STEPS_PER_EPOCH


@pytest.mark.slow
def test_ctrl_c_saves_last_checkpoint_exits_130_and_a_second_one_aborts(tiny_data, tmp_path):
    """A real SIGINT to train.py in the middle of a run: last.ckpt saved, the way to continue printed, exit 130."""
    output = tmp_path / "runs"
    last = output / "vgg16" / "version_0" / "checkpoints" / "last.ckpt"
    command = [sys.executable, "train.py", *QUICK, "--data-dir", str(tiny_data), "--epochs", "1000",
               "--output-dir", str(output)]

    def run_and_interrupt(signals: int) -> tuple[int, str]:
        with (tmp_path / "err.txt").open("w") as err:
            process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
            try:
                deadline = time.monotonic() + 300
                while not last.exists() and process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert last.exists(), (tmp_path / "err.txt").read_text()[-2000:]
                for _ in range(signals):
                    process.send_signal(signal.SIGINT)
                return process.wait(timeout=300), (tmp_path / "err.txt").read_text()
            finally:
                if process.poll() is None:
                    process.kill()

    code, stderr = run_and_interrupt(1)
    assert code == 130, stderr[-2000:]
    assert "interrupted: saving last.ckpt" in stderr and f"--resume {last.parent.parent}" in stderr
    assert "Traceback" not in stderr
    assert load(last)["global_step"] >= STEPS_PER_EPOCH
    shutil.rmtree(output)
    code, stderr = run_and_interrupt(2)
    assert code == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    load(last)  # whatever was on disk is whole


def test_atomic_writes_keep_the_permissions_of_a_plain_open(tmp_path):
    """Under umask 022 checkpoints, configs and exports are 0644 (mkstemp alone would make them 0600)."""
    import os

    from base.files import atomic_write_text

    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")
        assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o644
        (tmp_path / "config.yaml").chmod(0o640)  # a replaced file keeps what its owner gave it
        atomic_write_text(tmp_path / "config.yaml", "a: 2\n")
        assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)
