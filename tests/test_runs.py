"""A run owns its folder: one resolved configuration, resumes that continue exactly the run they name."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUICK_VGG
from robustness import assert_one_line_error, record_runs

from callbacks.checkpoints import NamedCheckpoint
from lit_modules import ImageClassifier
from models import build_model



def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_tilde_in_output_dir_is_expanded_and_runs_are_not_overwritten(cli, tiny_data, tmp_path, monkeypatch):
    """output_dir: ~/... in a config (and --output-dir=~/...) twice: two runs, absolute paths recorded."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "mine.yaml"
    config.write_text("output_dir: ~/cifar-runs\nepochs: 1\n")
    first = cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--config", str(config))
    second = cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir=~/cifar-runs", "--epochs", "1")
    assert first.code == 0 and second.code == 0, first.err + second.err
    runs = tmp_path / "home" / "cifar-runs" / "vgg16"
    kept = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []
    record_runs("two runs into output_dir ~/cifar-runs: each in its own folder", 2, 2 - len(kept))
    assert kept == ["version_0", "version_1"]
    assert not (tmp_path / "~").exists()
    saved = yaml.safe_load((runs / "version_1" / "config.yaml").read_text())
    assert saved["output_dir"] == str(tmp_path / "home" / "cifar-runs")
    assert saved["data_dir"] == str(tiny_data) and Path(saved["data_dir"]).is_absolute()


@pytest.mark.slow
def test_two_slurm_jobs_in_one_folder_each_resume_their_own_run(cli, tiny_data, tmp_path, sigterm_at):
    """The SLURM recipe of docs/multi-gpu.md: two jobs of different seeds/lr, both preempted, each requeue resumes its own run."""
    output = tmp_path / "runs"

    def job(job_id: str, seed: str, lr: str):
        return cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--epochs", "2",
                   "--seed", seed, "--lr", lr, "--run-name", f"slurm-{job_id}", "--resume", "last")

    sigterm_at(epoch=1)
    assert job("101", "0", "0.001").code == 143
    sigterm_at(epoch=1)
    assert job("102", "1", "0.002").code == 143
    first, second = output / "vgg16" / "slurm-101", output / "vgg16" / "slurm-102"
    second_before = (second / "checkpoints" / "last.ckpt").read_bytes()

    requeued = job("101", "0", "0.001")  # SLURM requeues job 101 with the same command
    continued = requeued.code == 0 and ckpt(first / "checkpoints" / "last.ckpt")["global_step"] == 4
    untouched = (second / "checkpoints" / "last.ckpt").read_bytes() == second_before
    record_runs("two preempted SLURM jobs in one folder, the first requeued", 2, (not continued) + (not untouched))
    assert requeued.code == 0, requeued.err
    assert f"resuming {first}" in requeued.out.splitlines()[0]
    assert ckpt(first / "checkpoints" / "last.ckpt")["global_step"] == 4  # 2 epochs of 2 steps
    assert (second / "checkpoints" / "last.ckpt").read_bytes() == second_before
    assert yaml.safe_load((first / "config.resumed.yaml").read_text())["seed"] == 0


@pytest.mark.slow
def test_resume_last_refuses_a_run_with_other_options(cli, tiny_data, tmp_path, sigterm_at):
    """--resume last picks the newest run; typed options that contradict it are refused, not silently applied."""
    output = tmp_path / "runs"
    common = [*QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--epochs", "2"]
    for seed in ("0", "1"):
        sigterm_at(epoch=1)
        assert cli("train", *common, "--seed", seed).code == 143
    newest = output / "vgg16" / "version_1" / "checkpoints" / "last.ckpt"
    before = newest.read_bytes()
    result = cli("train", *common, "--seed", "0", "--resume", "last")
    record_runs("--resume last with the other job's seed: the newest run is left as it was", 1, int(newest.read_bytes() != before))
    assert_one_line_error(result, "--seed 0 (the run has 1)")
    assert "version_1" in result.err and "--weights" in result.err


def test_a_moved_run_keeps_its_best_score(tmp_path):
    """A run folder moved or copied: the best score and kept checkpoints come back, rebased onto the new folder."""
    old, new = tmp_path / "old" / "checkpoints", tmp_path / "new" / "checkpoints"
    saved = NamedCheckpoint(dirpath=old, filename="best", monitor="acc/val", mode="max")
    saved.best_model_score = torch.tensor(0.75)
    saved.best_model_path = str(old / "best.ckpt")
    saved.best_k_models = {str(old / "best.ckpt"): torch.tensor(0.75)}
    saved.kth_best_model_path = str(old / "best.ckpt")
    state = saved.state_dict()
    moved = NamedCheckpoint(dirpath=new, filename="best", monitor="acc/val", mode="max")
    moved.load_state_dict(state)
    assert float(moved.best_model_score) == 0.75
    assert moved.best_model_path == str(new / "best.ckpt")
    assert list(moved.best_k_models) == [str(new / "best.ckpt")]


def best_state(checkpoint: Path) -> dict:
    return next(v for k, v in ckpt(checkpoint)["callbacks"].items() if "acc/val" in k)


@pytest.mark.slow
def test_a_moved_run_resumes_in_its_new_folder_without_losing_best(cli, tiny_data, tmp_path):
    """Trained, renamed, resumed by folder: writes only into the new folder; the best score is never lowered."""
    output = tmp_path / "runs"
    args = [*QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output)]
    assert cli("train", *args, "--epochs", "1").code == 0
    before = float(best_state(output / "vgg16" / "version_0" / "checkpoints" / "last.ckpt")["best_model_score"])
    moved = tmp_path / "elsewhere" / "my-run"
    moved.parent.mkdir()
    shutil.move(output / "vgg16" / "version_0", moved)
    result = cli("train", "--resume", str(moved), "--epochs", "3", "--accelerator", "cpu")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (output / "vgg16").iterdir()) == []
    state = best_state(moved / "checkpoints" / "last.ckpt")
    record_runs("a run folder moved, then resumed: its best score kept", 1, int(float(state["best_model_score"]) < before))
    assert state["dirpath"] == str(moved / "checkpoints")
    assert state["best_model_path"] == str(moved / "checkpoints" / "best.ckpt")
    assert float(state["best_model_score"]) >= before


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scheduler", "changed"),
    [
        ("onecycle", ["--batch-size", "10"]),
        ("onecycle", ["--limit-train-batches", "1"]),
        ("onecycle", ["--devices", "2"]),
        ("onecycle", ["--epochs", "3"]),
        ("cosine", ["--batch-size", "10"]),
        ("step", ["--lr", "0.5"]),
        ("step", ["--gamma", "0.1"]),
        ("step", ["--optimizer", "sgd"]),
        ("step", ["--seed", "3"]),
        ("step", ["--model", "resnet50"]),
    ],
)
def test_options_that_cannot_change_mid_run_are_refused(cli, tiny_data, tmp_path, scheduler, changed, sigterm_at):
    """Resumed with another batch size, limit, device count, length, lr, gamma...: one line naming it, no files touched."""
    output = tmp_path / "runs"
    args = [*QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--scheduler", scheduler]
    sigterm_at(epoch=1)
    assert cli("train", *args, "--epochs", "2").code == 143
    run = output / "vgg16" / "version_0"
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = cli("train", "--resume", str(run / "checkpoints" / "last.ckpt"), "--accelerator", "cpu", *changed)
    after = {p.name: p.stat().st_mtime_ns for p in run.rglob("*")}
    record_runs(f"resume with {' '.join(changed)}: refused, the run untouched", 1, int(after != before))
    assert_one_line_error(result, f"cannot resume {run} with {changed[0]} ")
    assert "--weights" in result.err
    assert after == before


@pytest.mark.slow
def test_options_that_may_change_are_applied_and_recorded(cli, tiny_data, tmp_path, sigterm_at):
    """A step-schedule run extended with more epochs and a larger eval batch: used, and recorded as used."""
    output = tmp_path / "runs"
    sigterm_at(epoch=1)
    assert cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--epochs", "2").code == 143
    run = output / "vgg16" / "version_0"
    result = cli("train", "--resume", str(run), "--epochs", "3", "--eval-batch-size", "7", "--accelerator", "cpu")
    assert result.code == 0, result.err
    resumed = yaml.safe_load((run / "config.resumed.yaml").read_text())
    assert resumed["epochs"] == 3 and resumed["eval_batch_size"] == 7 and resumed["lr"] == 0.001
    assert resumed["resume"] == str(run / "checkpoints" / "last.ckpt")
    assert ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 6  # 3 epochs of 2 steps
    assert "best epoch" in result.out and "of 3 " in result.out


def test_checkpoint_hparams_alone_rebuild_the_module(tmp_path):
    """Lightning's own load_from_checkpoint(weights_only=True) rebuilds the network, also from today's format."""
    backbone = build_model("resnet50", identity_shortcut=True)
    hparams = {  # what train.py wrote before the network was built from hparams
        "model_name": "resnet50", "num_classes": 10, "model_options": {"identity_shortcut": True},
        "class_names": [f"c{i}" for i in range(10)], "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
        "nesterov": True, "weight_decay": 5e-4, "scheduler": "onecycle", "step_size": 20, "gamma": 1 / 3,
        "label_smoothing": 0.1, "tta": "flip",
    }
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.0",
                "epoch": 3, "global_step": 40}, path)
    module = ImageClassifier.load_from_checkpoint(path, weights_only=True, map_location="cpu")
    assert module.network.model == "resnet50" and module.optim.lr == 0.05 and module.tta == "flip"
    assert module.hparams.network["model"] == "resnet50" and module.hparams.optim["lr"] == 0.05
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(module.backbone.state_dict()[key], value)


def test_resume_of_a_course_state_dict_points_to_weights(cli, tiny_data, tmp_path):
    """--resume given torch.save(model.state_dict()): one line, --weights named, no run folder left."""
    course = tmp_path / "vgg16_epoch250.pt"
    torch.save(build_model("vgg16").state_dict(), course)
    result = cli("train", "--resume", str(course), "--data-dir", str(tiny_data), "--output-dir", str(tmp_path / "runs"),
                 "--accelerator", "cpu")
    assert_one_line_error(result, "no run to continue", f"--weights {course}")
    assert not (tmp_path / "runs").exists()
    # The same file put where a run's last.ckpt would be: named for what it is.
    run = tmp_path / "runs" / "vgg16" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: vgg16\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(course.read_bytes())
    result = cli("train", "--resume", str(run), "--data-dir", str(tiny_data), "--accelerator", "cpu")
    assert_one_line_error(result, "plain state dict", "--weights")
    assert sorted(path.name for path in run.rglob("*")) == ["checkpoints", "config.yaml", "last.ckpt"]


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--devices", "0,1"], "a list names GPU indices"),
        (["--devices", "[0, 1]"], "a list names GPU indices"),
        (["--devices", "0"], "must be at least 1"),
        (["--devices", "two"], "expected number of devices"),
        (["--precision", "16-mixed"], "float16 autocast needs a GPU"),
    ],
)
def test_documented_hardware_values_are_resolved_or_refused_on_the_cpu(cli, tiny_data, tmp_path, flags, fragment):
    """--devices 0,1 / 16-mixed on a CPU: one line before any work, instead of a TypeError or a silent bf16."""
    result = cli("train", "--accelerator", "cpu", *flags, "--data-dir", str(tiny_data), "--output-dir", str(tmp_path))
    assert_one_line_error(result, fragment)
    assert list(tmp_path.iterdir()) == []


def test_devices_all_on_the_cpu_is_one_process(tmp_path):
    """-1 and auto ("all devices") are one process on the CPU, and recorded as such."""
    from cli.train import parse_run_config

    for value in ("-1", "auto"):
        config = parse_run_config(["--accelerator", "cpu", "--devices", value, "--output-dir", str(tmp_path)])
        assert config.devices == 1 and config.to_dict()["devices"] == 1


def test_a_checkpoint_folder_given_as_a_file_suggests_a_real_file(cli, tmp_path):
    """test.py --ckpt RUN/checkpoints: the suggestion is RUN/checkpoints/best.ckpt, not .../checkpoints/checkpoints/."""
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    result = cli("test", "--ckpt", str(folder))
    assert_one_line_error(result, f"such as {folder / 'best.ckpt'}")


@pytest.mark.slow
def test_first_line_names_the_run_and_test_py_uses_the_runs_data(cli, tiny_data, tmp_path, monkeypatch):
    """New and resumed runs say which run, with its options, first; test.py --ckpt tests on the run's data."""
    output = tmp_path / "runs"
    first = cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--epochs", "1")
    run = output / "vgg16" / "version_0"
    assert first.code == 0 and first.out.splitlines()[0].startswith(f"new run {run}: vgg16, 1 epoch, batch 20")
    # Into a log (no terminal): the model summary as plain text, nothing cut at 80 columns.
    assert "…" not in first.out and "┃" not in first.out
    resumed = cli("train", "--resume", "last", "--output-dir", str(output), "--epochs", "2", "--accelerator", "cpu")
    assert resumed.code == 0, resumed.err
    assert resumed.out.splitlines()[0].startswith(f"resuming {run} from last.ckpt: vgg16, 2 epochs")
    assert "best epoch" in resumed.out and " of 2 (counting from 1)" in resumed.out
    monkeypatch.chdir(tmp_path)  # no ./data here: test.py must find the run's data, offline
    tested = cli("test", "--ckpt", str(run / "checkpoints" / "best.ckpt"), "--accelerator", "cpu")
    assert tested.code == 0, tested.err
    assert f"data: image-folder tree {tiny_data}" in tested.out


@pytest.mark.slow
def test_an_interrupted_start_leaves_no_empty_run_and_last_resumes_the_newest(cli, tiny_data, tmp_path, monkeypatch):
    """A run stopped before its first checkpoint removes its folder, so --resume last cannot pick a stale one silently."""
    output = tmp_path / "runs"
    assert cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--epochs", "1").code == 0

    def fail_in_fit(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lightning.Trainer.fit", fail_in_fit)
    interrupted = cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--epochs", "1")
    assert interrupted.code == 130
    assert sorted(p.name for p in (output / "vgg16").iterdir()) == ["version_0"]
    assert "removed the run folder" in interrupted.out


def test_run_names_with_pattern_characters_are_taken_literally(tmp_path):
    """--run-name 'exp[1]' --resume last finds that run, not a glob pattern's matches."""
    from run.life.folder import find_resume

    run = tmp_path / "runs" / "vgg16" / "exp[1]"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: vgg16\n")
    assert find_resume("last", tmp_path / "runs", "vgg16", "exp[1]") is None  # no checkpoint yet: a fresh start
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {}}, run / "checkpoints" / "last.ckpt")
    assert find_resume("last", tmp_path / "runs", "vgg16", "exp[1]") == (run / "checkpoints" / "last.ckpt").resolve()
