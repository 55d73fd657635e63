"""Stops anywhere, rewinds, reruns and late failures: a run ends as if nothing had happened, or says why not.

Each test names the fault it replays: a stop during validation, the final test or a save; a
resume from an earlier checkpoint or of a finished run; a rerun from a run's saved config; a run
name or output too long for the file system, a full disk under ``test.py --log-to-run``, a run
whose data was moved.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUICK_VGG
from robustness import assert_one_line_error, record_files, record_runs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# Three epochs of 2 training batches; validation and the final test in 2 and 5 batches of 10, so
# that a stop can land in the middle of either.
EPOCHS = 3
RECIPE = [*QUICK_VGG, "--eval-batch-size", "10", "--epochs", str(EPOCHS)]


def ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every ``tag`` point in every events file of ``run``, in file order: a point
    logged twice (by a stopped process and its resume) is counted twice."""
    points = []
    for events in sorted(run.glob("events.out.tfevents.*"), key=lambda path: path.stat().st_mtime_ns):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            points += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return points


def outcome(run: Path) -> dict:
    """What a finished run decided: its best checkpoint's epoch and score, every acc/val and acc/test point."""
    best = ckpt(run / "checkpoints" / "best.ckpt")
    state = next(value for key, value in best["callbacks"].items() if "acc/val" in key)
    return {
        "best_epoch": best["epoch"],
        "best_score": float(state["best_model_score"]),
        "acc/val": scalars(run, "acc/val"),
        "acc/test": scalars(run, "acc/test"),
        "last_step": ckpt(run / "checkpoints" / "last.ckpt")["global_step"],
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data) -> dict:
    """The outcome of RECIPE run without a stop."""
    from cli.flags import run_main
    from conftest import load_script

    output = tmp_path_factory.mktemp("straight")
    with pytest.raises(SystemExit) as exit_info:
        run_main(load_script("train").main, [*RECIPE, "--data-dir", str(tiny_data), "--output-dir", str(output)])
    assert exit_info.value.code == 0
    result = outcome(output / "vgg16" / "version_0")
    shutil.rmtree(output, ignore_errors=True)  # checkpoints are large; pytest would keep them
    return result


# --- a stop anywhere --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("during", "epoch"),
    [("validation", 2), ("validation", 3), ("sanity", None), ("save", 2), ("test", None)],
)
def test_a_stop_anywhere_resumes_to_the_uninterrupted_result(cli, tiny_data, tmp_path, sigterm_at, uninterrupted,
                                                              during, epoch):
    """SIGTERM during validation, the sanity check, a checkpoint save or the final test, then --resume:
    the same best checkpoint and score, every epoch's acc/val and the acc/test logged exactly once."""
    output = tmp_path / "runs"
    args = [*RECIPE, "--data-dir", str(tiny_data), "--output-dir", str(output)]
    sigterm_at(epoch=epoch, during=during)
    stopped = cli("train", *args)
    assert stopped.code == 143, stopped.err[-3000:]
    sigterm_at()
    resumed = cli("train", *args, "--resume", "last")
    assert resumed.code == 0, resumed.err[-3000:]
    run = output / "vgg16" / "version_0"
    result = outcome(run)
    record_runs(f"SIGTERM during {during}{f' of epoch {epoch}' if epoch else ''}, resumed: the result of a run "
                "without the stop", 1, int(result != uninterrupted))
    assert [step for step, _ in result["acc/val"]] == [step for step, _ in uninterrupted["acc/val"]]
    assert result == uninterrupted
    assert not (output / "vgg16" / "version_1").exists()


@pytest.mark.slow
def test_a_stop_during_validation_says_it_finishes_the_epoch(cli, tiny_data, tmp_path, sigterm_at):
    """The message of a stop during validation names the epoch that was completed, and how to continue."""
    output = tmp_path / "runs"
    sigterm_at(epoch=1, during="validation")
    stopped = cli("train", *RECIPE, "--data-dir", str(tiny_data), "--output-dir", str(output))
    assert stopped.code == 143, stopped.err[-3000:]
    last = ckpt(output / "vgg16" / "version_0" / "checkpoints" / "last.ckpt")
    assert last["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1
    assert "stopped by SIGTERM after epoch 1, after step 2" in stopped.err
    assert f"--resume {output / 'vgg16' / 'version_0'}" in stopped.err


# --- rewinds and finished runs ----------------------------------------------------------------

CPU = ["--accelerator", "cpu"]


def fake_run(output: Path, checkpoints: dict[str, tuple[int, int]], *flags: str) -> Path:
    """A run folder as train.py leaves it, without training: config.yaml and, for each name, a
    checkpoint after (epochs trained, steps) holding the counters a resume reads."""
    from cli.train import parse_run_config

    config = parse_run_config(["--output-dir", str(output), "--data-dir", str(output / "no-data"), *CPU, *flags])
    run = output / config.model / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(__import__("yaml").safe_dump(config.to_dict(), sort_keys=False))
    for name, (epochs, step) in checkpoints.items():
        progress = {"fit_loop": {"epoch_progress": {"current": {"processed": epochs, "completed": epochs}}}}
        torch.save({"pytorch-lightning_version": "2.6.6", "state_dict": {}, "epoch": epochs - 1, "global_step": step,
                    "loops": progress}, run / "checkpoints" / name)
    return run


def files_of(run: Path) -> dict[str, bytes]:
    return {str(path.relative_to(run)): path.read_bytes() for path in sorted(run.rglob("*"))
            if path.is_file() and path.name != ".train.lock"}


def before_torch(script: str, *args: str):
    """``script`` run in a fresh process: its CliResult, and which heavy libraries it had imported."""
    import subprocess
    import sys

    from conftest import ROOT, CliResult

    done = subprocess.run([sys.executable, "tests/import_probe.py", script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    imported = lines.pop() if lines and lines[-1].startswith("IMPORTED: ") else "IMPORTED: ?"
    return CliResult(done.returncode, done.stdout, "\n".join(lines), script, args), imported


def test_a_resume_from_an_earlier_checkpoint_is_refused_without_rewind(cli, tmp_path):
    """--resume RUN/checkpoints/best.ckpt of a run trained further: one line saying what it would
    replace and how to go back anyway (--rewind); nothing of the run touched."""
    run = fake_run(tmp_path / "runs", {"best.ckpt": (1, 2), "epoch001.ckpt": (2, 4), "last.ckpt": (3, 6)}, "--epochs", "3")
    before = files_of(run)
    result = cli("train", "--resume", str(run / "checkpoints" / "best.ckpt"), *CPU)
    record_runs("--resume best.ckpt of a run trained 2 epochs further: refused, the run untouched", 1,
                int(files_of(run) != before))
    assert_one_line_error(result, f"would rewind {run} from 3 epochs (step 6) to 1 epoch (step 2)",
                          "epoch001.ckpt, last.ckpt", "--rewind", f"--resume {run}")
    assert files_of(run) == before


def test_a_rewind_behind_the_best_checkpoint_is_refused(cli, tmp_path):
    """--rewind to a periodic checkpoint older than best.ckpt: the best up to it is gone, so refused in one line."""
    run = fake_run(tmp_path / "runs", {"epoch000.ckpt": (1, 2), "best.ckpt": (2, 4), "last.ckpt": (3, 6)}, "--epochs", "3")
    before = files_of(run)
    result = cli("train", "--resume", str(run / "checkpoints" / "epoch000.ckpt"), "--rewind", *CPU)
    record_runs("--rewind to a checkpoint older than best.ckpt: refused, the run untouched", 1, int(files_of(run) != before))
    assert_one_line_error(result, "best.ckpt is later (2 epochs (step 4))", "--weights")
    assert files_of(run) == before


def test_rewind_without_resume_is_refused_before_torch(tmp_path):
    """--rewind alone: one line, before torch loads."""
    result, imported = before_torch("train", "--rewind", "--output-dir", str(tmp_path), *CPU)
    assert_one_line_error(result, "--rewind goes with --resume")
    assert imported == "IMPORTED: none", imported


@pytest.mark.parametrize("scheduler", ["step", "onecycle"])
def test_a_finished_run_resumed_says_so_and_how_to_extend_it(cli, tmp_path, scheduler):
    """A run trained and tested to its end, resumed without more epochs: one line, exit 0, nothing run or written."""
    from run.history import record_final_test

    run = fake_run(tmp_path / "runs", {"best.ckpt": (2, 4), "last.ckpt": (3, 6)}, "--epochs", "3", "--scheduler", scheduler)
    record_final_test(run, 6, 3, str(run / "checkpoints" / "best.ckpt"), 2, {"acc/test": 0.5})
    before = files_of(run)
    for resume in ([str(run)], ["last", "--output-dir", str(tmp_path / "runs")]):
        result = cli("train", "--resume", *resume, *CPU)
        record_runs(f"a finished run resumed ({' '.join(resume[:1])}): told it is finished, the run untouched", 1,
                    int(files_of(run) != before or result.code != 0))
        assert result.code == 0, result.err
        assert result.out.strip().splitlines() == [result.out.strip()]
        assert f"{run} is finished: it trained its 3 epochs" in result.out and "(50.00 % test accuracy)" in result.out
        assert ("--epochs 13" in result.out) == (scheduler == "step") and "python test.py --ckpt" in result.out
    assert files_of(run) == before


def test_a_finished_runs_resume_with_more_epochs_or_an_untested_one_goes_on(tmp_path):
    """More --epochs continue a finished run; a run whose final test did not end (no record, or an older one) is tested."""
    from cli.train import parse_run_config
    from run.history import record_final_test

    run = fake_run(tmp_path / "runs", {"best.ckpt": (2, 4), "last.ckpt": (3, 6)}, "--epochs", "3")
    assert parse_run_config(["--resume", str(run), *CPU]).epochs == 3  # never tested: the final test again
    record_final_test(run, 4, 2, str(run / "checkpoints" / "best.ckpt"), 2, {"acc/test": 0.5})
    assert parse_run_config(["--resume", str(run), *CPU]).epochs == 3  # tested after 2 epochs, not after 3
    record_final_test(run, 6, 3, str(run / "checkpoints" / "best.ckpt"), 2, {"acc/test": 0.5})
    assert parse_run_config(["--resume", str(run), *CPU, "--epochs", "5"]).epochs == 5


@pytest.mark.slow
def test_a_rewind_keeps_the_later_checkpoints_and_a_finished_run_is_not_tested_twice(cli, tiny_data, tmp_path):
    """A real run: resumed once finished (exit 0, one acc/test point), from best.ckpt (refused), then with
    --rewind (the later last.ckpt and periodic checkpoints moved into RUN/rewound/, whole)."""
    output = tmp_path / "runs"
    # A learning rate too small to change a weight: every epoch validates the same, so best.ckpt stays the first.
    args = [*QUICK_VGG, "--data-dir", str(tiny_data), "--output-dir", str(output), "--epochs", "3", "--lr", "1e-30",
            "--checkpoint-every", "1"]
    assert cli("train", *args).code == 0
    run = output / "vgg16" / "version_0"
    checkpoints = run / "checkpoints"
    assert ckpt(checkpoints / "best.ckpt")["global_step"] == 2 and ckpt(checkpoints / "last.ckpt")["global_step"] == 6
    before = files_of(run)

    finished = cli("train", "--resume", "last", "--output-dir", str(output), *CPU)
    assert finished.code == 0 and f"{run} is finished" in finished.out, finished.err
    assert len(scalars(run, "acc/test")) == 1 and files_of(run) == before

    refused = cli("train", "--resume", str(checkpoints / "best.ckpt"), *CPU)
    assert_one_line_error(refused, "would rewind", "--rewind")
    assert files_of(run) == before

    rewound = cli("train", *args, "--resume", str(checkpoints / "best.ckpt"), "--rewind")
    assert rewound.code == 0, rewound.err[-3000:]
    kept = run / "rewound" / "epoch003-step6"
    intact = all((kept / name).read_bytes() == before[f"checkpoints/{name}"]
                 for name in ("last.ckpt", "epoch001.ckpt", "epoch002.ckpt"))
    record_files("the later last.ckpt and periodic checkpoints after a --rewind", 3, 3 - sum(
        (kept / name).is_file() and (kept / name).read_bytes() == before[f"checkpoints/{name}"]
        for name in ("last.ckpt", "epoch001.ckpt", "epoch002.ckpt")))
    assert intact
    assert f"rewinding {run} to best.ckpt (1 epoch (step 2)): the later epoch001.ckpt, epoch002.ckpt, last.ckpt are " \
           f"kept in {kept}" in rewound.out
    assert ckpt(checkpoints / "last.ckpt")["global_step"] == 6
    assert sorted(path.name for path in checkpoints.glob("*.ckpt")) == [
        "best.ckpt", "epoch000.ckpt", "epoch001.ckpt", "epoch002.ckpt", "last.ckpt"]
