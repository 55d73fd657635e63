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
