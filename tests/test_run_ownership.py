"""One process trains a run at a time, and a resume continues the run as it last ran.

No training here: run folders are made as train.py leaves them (config.yaml, a last.ckpt holding
the counters a resume reads), and every case stops before the data is read or at the lock.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUICK_VGG, TEST_PER_CLASS, TRAIN_PER_CLASS
from fakedata import make_image_folder
from robustness import assert_one_line_error, record_runs

from base.errors import UserError
from cli.train import parse_run_config
from run.life.folder import LOCK_NAME, hold_run

ROOT = Path(__file__).resolve().parents[1]
CPU = ["--accelerator", "cpu"]


def make_run(output: Path, *flags: str, epochs_trained: int = 1, name: str = "version_0") -> Path:
    """A run folder of train.py with the options ``flags`` and a last.ckpt after ``epochs_trained`` epochs."""
    config = parse_run_config(["--output-dir", str(output), "--data-dir", str(output / "no-data"), *CPU, *flags])
    run = output / config.model / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    progress = {"fit_loop": {"epoch_progress": {"current": {"processed": epochs_trained}}}}
    torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {}, "epoch": epochs_trained - 1, "loops": progress},
               run / "checkpoints" / "last.ckpt")
    return run


def ckpt_epoch(run: Path) -> int:
    """Epochs the run's last.ckpt has trained."""
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["epoch"] + 1


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of ``run`` but the (empty) lock file, which stays once a process has held the run."""
    return {str(path.relative_to(run)): path.read_bytes() for path in sorted(run.rglob("*"))
            if path.is_file() and path.name != LOCK_NAME}


@contextmanager
def trained_elsewhere(run: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``run`` the way a train.py that trains it does."""
    holder = "import sys, time\nfrom pathlib import Path\nfrom run.life.folder import hold_run\n" \
             "with hold_run(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(300)\n"
    child = subprocess.Popen([sys.executable, "-c", holder, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_run_being_trained_is_not_resumed_by_a_second_process(cli, tmp_path):
    """--resume of a run another process trains right now: refused, the run untouched; once that
    process is gone (even by SIGKILL) the run is free again."""
    run = make_run(tmp_path / "runs", "--epochs", "3")
    before = snapshot(run)
    with trained_elsewhere(run) as holder:
        for target in (str(run), "last"):
            result = cli("train", "--resume", target, "--output-dir", str(tmp_path / "runs"), *CPU)
            assert_one_line_error(result, "being trained by another process", str(run))
        holder.kill()
        holder.wait()
    with hold_run(run):  # a killed trainer leaves no lock behind
        pass
    record_runs("a run resumed while another process trains it", 1, int(snapshot(run) != before))
    assert snapshot(run) == before


def test_a_run_name_in_use_by_a_starting_run_is_refused(cli, tiny_data, tmp_path):
    """Two jobs started with one --run-name: the second is refused while the first has no checkpoint
    yet, and the first one's folder is left to it."""
    folder = tmp_path / "runs" / "vgg16" / "shared"
    folder.mkdir(parents=True)
    with trained_elsewhere(folder):
        result = cli("train", *QUICK_VGG, "--epochs", "1", "--data-dir", str(tiny_data),
                     "--output-dir", str(tmp_path / "runs"), "--run-name", "shared")
        assert_one_line_error(result, "being trained by another process", str(folder))
        assert folder.is_dir()


def test_a_resume_starts_from_what_the_previous_resume_changed(tmp_path):
    """epochs raised on one resume stay raised on the next (a requeued job repeats its first command)."""
    run = make_run(tmp_path / "runs", "--epochs", "3", epochs_trained=3)
    resumed = parse_run_config(["--resume", str(run), *CPU, "--epochs", "5"])
    (run / "config.resumed.yaml").write_text(yaml.safe_dump(resumed.to_dict(), sort_keys=False))
    assert parse_run_config(["--resume", str(run), *CPU]).epochs == 5
    assert parse_run_config(["--resume", "last", "--output-dir", str(tmp_path / "runs"), *CPU]).epochs == 5


def test_fewer_epochs_than_already_trained_are_refused(tmp_path):
    run = make_run(tmp_path / "runs", "--epochs", "6", epochs_trained=4)
    with pytest.raises(UserError, match="already trained 4 epochs"):
        parse_run_config(["--resume", str(run), *CPU, "--epochs", "3"])
    assert parse_run_config(["--resume", str(run), *CPU, "--epochs", "4"]).epochs == 4  # the final test again


def test_a_resume_keeps_the_runs_test_limit_and_why_its_precision(tmp_path):
    """Options not typed again are the run's: the quick-test limit, and the reason for the precision."""
    run = make_run(tmp_path / "runs", "--limit-test-batches", "2", "--precision", "auto")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    resumed = parse_run_config(["--resume", str(run), *CPU])
    assert resumed.limit_test_batches == 2
    assert resumed.precision == saved["precision"] and resumed.precision_reason == saved["precision_reason"]
    assert parse_run_config(["--resume", str(run), *CPU, "--precision", "32-true"]).precision_reason == "asked for"
    with pytest.raises(UserError, match="--limit-val-batches 3"):
        parse_run_config(["--resume", str(run), *CPU, "--limit-val-batches", "3"])


def test_a_runs_saved_config_starts_the_same_run_again(tmp_path):
    """--config RUN/config.yaml: the same options (the resolved facts in it are ignored), a new run."""
    run = make_run(tmp_path / "runs", "--model", "resnet50", "--epochs", "7", "--lr", "0.01", "--optimizer", "sgd")
    again = parse_run_config(["--config", str(run / "config.yaml")])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    for name in ("model", "epochs", "lr", "optimizer", "batch_size", "precision", "output_dir", "seed"):
        assert again.to_dict()[name] == saved[name], name
    assert again.resume is None


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--weights", "{run}/checkpoints/last.ckpt"], "--weights with --resume"),
        (["--run-name", "other"], "--run-name other with --resume"),
    ],
)
def test_options_that_would_start_another_run_are_refused_on_resume(cli, tmp_path, flags, fragment):
    run = make_run(tmp_path / "runs")
    before = snapshot(run)
    result = cli("train", "--resume", str(run), *CPU, *[flag.replace("{run}", str(run)) for flag in flags])
    assert_one_line_error(result, fragment)
    assert snapshot(run) == before


def test_resume_last_with_a_run_name_of_several_models_asks_for_the_model(cli, tmp_path):
    output = tmp_path / "runs"
    make_run(output, "--model", "vgg16", name="exp1")
    make_run(output, "--model", "resnet50", name="exp1")
    result = cli("train", "--resume", "last", "--run-name", "exp1", "--output-dir", str(output), *CPU)
    assert_one_line_error(result, "several models", "--model")
    assert parse_run_config(["--resume", "last", "--run-name", "exp1", "--output-dir", str(output), "--model",
                             "resnet50", *CPU]).model == "resnet50"


@pytest.mark.slow
def test_a_run_resumes_only_on_its_own_data(cli, tiny_data, tmp_path, sigterm_at):
    """--data-dir may move with the data, not change it: other images with the same counts and
    labels, or fewer images, are refused before training; the run's own data resumes."""
    output = tmp_path / "runs"
    sigterm_at(epoch=1)
    assert cli("train", *QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--epochs", "2").code == 143
    run = output / "vgg16" / "version_0"
    before = snapshot(run)
    moved = shutil.copytree(tiny_data, tmp_path / "moved" / "cifar10")
    lookalike = make_image_folder(tmp_path / "other" / "cifar10", TRAIN_PER_CLASS, TEST_PER_CLASS, seed=7)
    fewer = make_image_folder(tmp_path / "fewer" / "cifar10", 5, 2)
    sigterm_at()
    for other, fragment in ((lookalike, "other images or another order"), (fewer, "this data gives 30 training")):
        result = cli("train", "--resume", str(run), "--data-dir", str(other), *CPU)
        assert_one_line_error(result, "not the data the run was trained on", fragment)
        assert snapshot(run) == before
    record_runs("a run resumed on other data", 2, int(snapshot(run) != before))
    result = cli("train", "--resume", str(run), "--data-dir", str(moved), *CPU)
    assert result.code == 0, result.err
    assert ckpt_epoch(run) == 2


def test_a_named_run_without_last_ckpt_names_the_checkpoints_it_has(cli, tmp_path):
    """--resume last --run-name NAME of a run that has checkpoints but no last.ckpt: which to resume from."""
    run = make_run(tmp_path / "runs", name="exp")
    (run / "checkpoints" / "last.ckpt").rename(run / "checkpoints" / "best.ckpt")
    result = cli("train", "--resume", "last", "--run-name", "exp", "--output-dir", str(tmp_path / "runs"), *CPU)
    assert_one_line_error(result, "has no last.ckpt", f"--resume {run / 'checkpoints' / 'best.ckpt'}")


def test_a_run_in_use_is_refused_before_torch_loads(tmp_path):
    """The refusal of a run another process trains comes with the flags, not after seconds of imports."""
    run = make_run(tmp_path / "runs", "--epochs", "3")
    with trained_elsewhere(run):
        done = subprocess.run([sys.executable, "tests/import_probe.py", "train", "--resume", str(run), *CPU],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "being trained by another process" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "IMPORTED: none"


def test_a_named_runs_saved_config_starts_a_new_run(tmp_path):
    """--config RUN/config.yaml (or config.resumed.yaml) of a named run: its options, not its name or resume."""
    run = make_run(tmp_path / "runs", "--run-name", "exp", "--epochs", "4", name="exp")
    resumed = parse_run_config(["--resume", str(run), *CPU])
    (run / "config.resumed.yaml").write_text(yaml.safe_dump(resumed.to_dict(), sort_keys=False))
    for saved in ("config.yaml", "config.resumed.yaml"):
        again = parse_run_config(["--config", str(run / saved)])
        assert again.run_name is None and again.resume is None and again.epochs == 4


def test_a_whole_split_fraction_is_the_same_as_no_limit(tmp_path):
    """--limit-val-batches 1.0 is every batch, as without the flag: not a change on resume."""
    run = make_run(tmp_path / "runs")
    assert parse_run_config(["--resume", str(run), *CPU, "--limit-val-batches", "1.0"]).limit_val_batches is None


def test_sgd_only_options_of_an_adam_run_may_change_on_resume(tmp_path):
    """--momentum and --nesterov mean nothing to adam: not refused as changes of an adam run, but of an sgd one."""
    adam = make_run(tmp_path / "adam")
    assert parse_run_config(["--resume", str(adam), *CPU, "--momentum", "0.5"]).momentum == 0.5
    sgd = make_run(tmp_path / "sgd", "--optimizer", "sgd", "--lr", "0.05")
    with pytest.raises(UserError, match="--momentum 0.5"):
        parse_run_config(["--resume", str(sgd), *CPU, "--momentum", "0.5"])
