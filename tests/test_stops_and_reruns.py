"""Stops anywhere, rewinds, reruns and late failures: a run ends as if nothing had happened, or says why not.

Each test names the fault it replays: a stop during validation, the final test or a save; a
resume from an earlier checkpoint or of a finished run; a rerun from a run's saved config; a run
name or output too long for the file system, a full disk under ``test.py --log-to-run``, a run
whose data was moved.
"""
from __future__ import annotations

import shutil
import sys
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
    from conftest import load_script

    output = tmp_path_factory.mktemp("straight")
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(load_script("train").main([*RECIPE, "--data-dir", str(tiny_data), "--output-dir", str(output)]))
    assert exit_info.value.code == 0
    result = outcome(output / "vgg16" / "version_0")
    shutil.rmtree(output, ignore_errors=True)  # checkpoints are large; pytest would keep them
    return result


# --- a stop anywhere --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "where",
    [
        {"during": "validation", "epoch": 2},
        {"during": "validation", "epoch": 3},
        {"step": 4},  # the last training batch of epoch 2: the stop is due when its validation starts
        {"during": "sanity"},
        {"during": "save", "epoch": 2},
        {"during": "test"},
    ],
    ids=["validation-2", "validation-3", "last-batch-2", "sanity", "save-2", "final-test"],
)
def test_a_stop_anywhere_resumes_to_the_uninterrupted_result(cli, tiny_data, tmp_path, sigterm_at, uninterrupted, where):
    """SIGTERM during validation, an epoch's last batch, the sanity check, a checkpoint save or the final
    test, then --resume: the same best checkpoint and score, every epoch's acc/val and the acc/test
    logged exactly once."""
    output = tmp_path / "runs"
    args = [*RECIPE, "--data-dir", str(tiny_data), "--output-dir", str(output)]
    sigterm_at(**where)
    during, epoch = where.get("during", "the last batch"), where.get("epoch") or (where.get("step", 0) // 2 or None)
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
    from run.life.history import record_final_test

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
    from run.life.history import record_final_test

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


# --- a rerun never writes over the first run's files ---------------------------------------------


def test_a_rerun_from_a_runs_saved_config_keeps_the_first_runs_outputs(cli, tmp_path):
    """--config RUN/config.yaml of a run started with --config and --results-json: a new run with the
    recipe, which neither writes the first run's results file nor trips over the saved config path."""
    from cli.train import parse_run_config

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("epochs: 4\nlr: 0.01\n")
    results = tmp_path / "first.json"
    run = fake_run(tmp_path / "runs", {"last.ckpt": (4, 8)}, "--config", str(recipe), "--results-json", str(results))
    results.write_text('{"best_checkpoint": "%s"}\n' % (run / "checkpoints" / "best.ckpt"))
    before = results.read_bytes()
    saved = __import__("yaml").safe_load((run / "config.yaml").read_text())
    assert saved["results_json"] == str(results) and saved["config"] == str(recipe)
    again = parse_run_config(["--config", str(run / "config.yaml")])
    record_files("the first run's --results-json after a rerun from its saved config", 1,
                 int(again.results_json is not None or results.read_bytes() != before))
    assert again.results_json is None and again.resume is None and again.run_name is None
    assert again.config == run / "config.yaml" and again.epochs == 4 and again.lr == 0.01
    # Given again explicitly, that file is refused: it holds the first run's results.
    result = cli("train", "--config", str(run / "config.yaml"), "--results-json", str(results), *CPU)
    assert_one_line_error(result, f"--results-json {results} already exists (the results of the run {run})",
                          "name another file")
    assert results.read_bytes() == before and sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


def test_a_results_file_that_is_not_a_runs_is_refused_and_a_resume_rewrites_its_own(cli, tmp_path):
    """--results-json naming any existing file is refused for a new run; a resume may rewrite its own run's."""
    from cli.train import parse_run_config

    notes = tmp_path / "notes.json"
    notes.write_text("my notes\n")
    result = cli("train", "--results-json", str(notes), "--output-dir", str(tmp_path / "runs"), *CPU)
    assert_one_line_error(result, f"--results-json {notes} already exists (not this run's results)")
    assert notes.read_text() == "my notes\n" and not (tmp_path / "runs").exists()
    run = fake_run(tmp_path / "runs", {"last.ckpt": (1, 2)}, "--epochs", "3")
    own = tmp_path / "own.json"
    own.write_text('{"best_checkpoint": "%s"}\n' % (run / "checkpoints" / "best.ckpt"))
    assert parse_run_config(["--resume", str(run), "--results-json", str(own), *CPU]).results_json == own
    other = fake_run(tmp_path / "other", {"last.ckpt": (1, 2)}, "--epochs", "3")
    with pytest.raises(Exception, match="already exists"):
        parse_run_config(["--resume", str(other), "--results-json", str(own), *CPU])


# --- late or ugly failures: one line, exit 2, before the work, nothing left behind ----------------

LONG = "r" * 281  # a name of 281 bytes; file systems take 255


@pytest.mark.parametrize(
    ("script", "args", "fragment"),
    [
        ("train", ["--run-name", LONG], "--run-name: the name 'rrrrrrrrrrrrrrrrrrrr...rrrrrrrrrrrr' is 281 bytes long"),
        ("train", ["--run-name", "é" * 140], "is 280 bytes long"),  # 140 characters, 2 bytes each
        ("train", ["--output-dir", "{p}/" + LONG], "--output-dir: the name"),
        ("train", ["--output-dir", "{p}/" + "/".join(["d" * 250] * 17)], "--output-dir: the path is"),
        ("train", ["--results-json", "{p}/" + "j" * 245 + ".json"], "with the 14 bytes its temporary file adds"),
        ("train", ["--data-dir", "{p}/" + LONG], "--data-dir: the name"),
        ("train", ["--cache-dir", "{p}/" + LONG], "--cache-dir: the name"),
        ("train", ["--resume", "{p}/" + LONG + "/checkpoints/last.ckpt"], "no such file or folder: the name"),
        ("train", ["--config", "{p}/" + LONG + ".yaml"], "--config {p}/r"),
        ("train", ["--weights", "{p}/" + LONG + ".ckpt"], "no such file or folder: the name"),
        ("test", ["--ckpt", "{p}/" + LONG + ".ckpt"], "no such file or folder: the name"),
        ("test", ["--ckpt", "{p}/loose.ckpt", "--json", "{p}/" + "j" * 245 + ".json"], "--json: the name"),
        ("export", ["--ckpt", "{p}/loose.ckpt", "--format", "onnx", "--output", "{p}/" + "o" * 250 + ".onnx"],
         "--output: the name"),
        ("predict", ["--ckpt", "{p}/loose.ckpt", "--explain", "{p}/" + LONG, "{p}"], "--explain: the name"),
    ],
    ids=lambda value: value if isinstance(value, str) and len(value) < 12 else None,
)
def test_names_too_long_for_the_file_system_are_refused_with_the_flags(tmp_path, script, args, fragment):
    """A 281-byte --run-name (and every other path a command creates or opens): one line before torch
    loads, nothing created, instead of an OSError traceback once the data is decoded or the run is over."""
    place = tmp_path / "place"
    place.mkdir()
    torch.save({}, place / "loose.ckpt")
    (place / "photo.png").write_bytes(b"not read")
    before = sorted(tmp_path.rglob("*"))
    args = [arg.replace("{p}", str(place)) for arg in args]
    hardware = ["--accelerator", "cpu"] if script != "export" else []
    output = ["--output-dir", str(place)] if script == "train" and "--output-dir" not in args else []
    result, imported = before_torch(script, *args, *hardware, *output)
    assert_one_line_error(result, fragment.replace("{p}", str(place)))
    assert imported == "IMPORTED: none", imported
    assert sorted(tmp_path.rglob("*")) == before


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, tiny_data) -> Path:
    """A finished one-epoch run on the tiny data; returns its folder. Tests copy it to change it."""
    from conftest import load_script

    output = tmp_path_factory.mktemp("runs")
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(load_script("train").main([*QUICK_VGG, "--epochs", "1", "--data-dir", str(tiny_data),
                                            "--output-dir", str(output)]))
    assert exit_info.value.code == 0
    yield output / "vgg16" / "version_0"
    shutil.rmtree(output, ignore_errors=True)  # checkpoints are large; pytest would keep them


def _disk_full_on_write(monkeypatch) -> None:
    """TensorBoard's file writes on a full disk: the file is created, then no byte fits."""
    import errno

    from tensorboard.compat.tensorflow_stub.io import gfile

    def full(self, filename, file_content, mode):
        open(filename, mode).close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gfile.LocalFileSystem, "_write", full)


@pytest.mark.slow
def test_a_full_disk_during_log_to_run_is_one_line_and_leaves_the_run_as_it_was(cli, one_epoch_run, tmp_path,
                                                                                 monkeypatch):
    """test.py --log-to-run on a disk that fills up: one line, exit 2, no 0-byte events file or other
    leftover in the run; on a disk already too full: refused before the test; with room: one whole file."""
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    best = run / "checkpoints" / "best.ckpt"
    before = files_of(run)
    args = ["--ckpt", str(best), "--log-to-run", "--accelerator", "cpu", "--workers", "0"]
    with monkeypatch.context() as patch:
        _disk_full_on_write(patch)
        result = cli("test", *args)
    record_files("the run folder after test.py --log-to-run on a full disk", len(before),
                 int(files_of(run) != before) + sum(1 for content in files_of(run).values() if not content))
    assert_one_line_error(result, f"--log-to-run: cannot write to the dashboards of {run} (No space left on device)",
                          "nothing was added")
    assert files_of(run) == before and sorted(p.name for p in run.iterdir() if p.name.startswith(".test-log")) == []

    import shutil as real_shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as patch:
        patch.setattr(real_shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
        result = cli("test", *args)
    assert_one_line_error(result, "--log-to-run: 1.0 MiB free on the disk of", "leave out --log-to-run")
    assert files_of(run) == before

    events_before = set(run.glob("events.out.tfevents.*"))
    assert cli("test", *args).code == 0
    added = set(run.glob("events.out.tfevents.*")) - events_before
    assert len(added) == 1 and scalars(run, "acc/test")[-1][0] == ckpt(best)["global_step"]
    assert [p.name for p in run.iterdir() if p.name.startswith(".test-log")] == []


@pytest.mark.slow
def test_a_run_whose_data_moved_is_refused_by_test_and_resume_without_creating_anything(cli, one_epoch_run, tiny_data,
                                                                                          tmp_path):
    """The run's data moved away: test.py and --resume say it is no longer there and to pass --data-dir,
    in one line, creating nothing at the old place; with --data-dir both work."""
    import yaml

    data, moved = tmp_path / "data" / "cifar10", tmp_path / "elsewhere"
    shutil.copytree(tiny_data, data)
    run = tmp_path / "runs" / "vgg16" / "version_0"
    shutil.copytree(one_epoch_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data_dir"] = str(data)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.move(data, moved)
    before = files_of(run)
    best = run / "checkpoints" / "best.ckpt"
    tested = cli("test", "--ckpt", str(best), "--accelerator", "cpu", "--workers", "0")
    assert_one_line_error(tested, f"the run's data is no longer at {data} (where its {run / 'config.yaml'} says",
                          "pass --data-dir")
    resumed = cli("train", "--resume", str(run), "--epochs", "2", "--accelerator", "cpu", "--workers", "0")
    assert_one_line_error(resumed, f"the run's data is no longer at {data}", "pass --data-dir")
    record_runs("a run whose data moved, resumed without --data-dir: refused, the run untouched", 1,
                int(files_of(run) != before))
    assert not data.exists() and files_of(run) == before
    assert cli("test", "--ckpt", str(best), "--data-dir", str(moved), "--accelerator", "cpu", "--workers", "0").code == 0
    again = cli("train", "--resume", str(run), "--epochs", "2", "--data-dir", str(moved), "--accelerator", "cpu",
                "--workers", "0")
    assert again.code == 0, again.err[-2000:]


# --- the first hour ------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _clocked_run(monkeypatch, capsys, batches: int, seconds_per_batch: float, epochs: int = 250,
                 first_batch: int = 0, epoch: int = 0) -> tuple[str, float | None]:
    """RunClock through one epoch (from ``first_batch``, as a resume into it) of ``batches`` batches
    of ``seconds_per_batch`` each on a CPU; what it printed and its ETA after the last batch."""
    from types import SimpleNamespace

    from callbacks import progress

    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    trainer = SimpleNamespace(num_training_batches=batches, max_epochs=epochs, current_epoch=epoch, is_global_zero=True,
                              strategy=SimpleNamespace(root_device=SimpleNamespace(type="cpu")), precision="32-true")
    run_clock = progress.RunClock()
    run_clock.on_train_start(trainer, None)
    capsys.readouterr()
    for batch_idx in range(first_batch, batches):
        clock.now += seconds_per_batch
        run_clock.on_train_batch_end(trainer, None, None, None, batch_idx)
    return capsys.readouterr().out, run_clock.eta_seconds(trainer)


def test_the_long_run_heads_up_comes_also_when_an_epoch_has_few_batches(monkeypatch, capsys):
    """10 batches of a minute an epoch, 250 epochs (about 42 h): the heads-up comes after the epoch's
    10 batches, not never (it waited for 20); a short run still gets none."""
    printed, eta = _clocked_run(monkeypatch, capsys, batches=10, seconds_per_batch=60)
    assert printed.count("heads-up:") == 1 and "the run's 250 epochs take about 42 h" in printed
    assert eta == pytest.approx(249 * 600)
    assert _clocked_run(monkeypatch, capsys, batches=10, seconds_per_batch=1)[0] == ""


def test_the_eta_of_a_run_resumed_in_the_middle_of_an_epoch_counts_the_batches_it_has_left(monkeypatch, capsys):
    """Resumed at batch 95 of 100 (epoch 3 of 250): the pace of its 5 batches, the rest of the epoch
    is none of them, and the heads-up speaks of the epochs left."""
    printed, eta = _clocked_run(monkeypatch, capsys, batches=100, seconds_per_batch=6, first_batch=95, epoch=2)
    assert eta == pytest.approx(247 * 600)
    assert "the 248 epochs left of the run's 250 take about 41 h" in printed


def test_the_real_archive_is_found_from_the_flag_or_the_environment_too(tmp_path):
    """The real-archive tests look where scripts/real_data_check.sh looks: --cifar10-data, $CIFAR10_DATA, then beside the checkout."""
    from conftest import REAL_ARCHIVE_BESIDE, find_real_archive

    archive = tmp_path / "cifar10-jpeg.tar.gz"
    assert find_real_archive(None, {"CIFAR10_DATA": str(archive)}) == (archive, True)
    assert find_real_archive(str(archive), {"CIFAR10_DATA": "/elsewhere.tar.gz"}) == (archive, True)
    assert find_real_archive(None, {}) == (REAL_ARCHIVE_BESIDE, False)
