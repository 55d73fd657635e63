"""Several processes, one run: every rank takes the same decisions and runs the same collectives.

The multi-rank cases run train.py under Lightning's own launcher with two CPU processes (gloo),
as ``--devices 2`` on a GPU machine does, through tests/ddp_cases.py (which records each rank's
collectives, resume, run folder, console and saves).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from run import life
from run.life.folder import CONSOLE_ENV, RESUME_ENV, handed_down, inherited_resume

DDP = ["--model", "vgg16", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--workers", "0",
       "--batch-size", "10", "--val-size", "20", "--eval-batch-size", "50", "--log-every-n-steps", "1"]
TIMEOUT_S = 420  # a hang (ranks in different collectives) fails here rather than at gloo's 30 minutes


def run_ranks(tmp_path: Path, case: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """tests/ddp_cases.py with ``case`` and train.py's ``args``: the command's outcome and each rank's record."""
    records = tmp_path / f"records-{case.replace(',', '-')}"
    records.mkdir()
    environ = {**os.environ, "DDP_CASE": case, "DDP_CASE_DIR": str(records), "PYTHONPATH": str(ROOT), **env}
    for name in (CONSOLE_ENV, RESUME_ENV):
        environ.pop(name, None)
    try:
        done = subprocess.run([sys.executable, "tests/ddp_cases.py", *DDP, *args], cwd=ROOT, env=environ,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the ranks hung ({case}): {(exc.stderr or b'')[-2000:]!r}")
    ranks = [json.loads(path.read_text()) for path in sorted(records.glob("rank*.json"))]
    return done, ranks


def test_console_is_handed_down_and_never_chosen_per_srun_task(monkeypatch):
    """A worker takes rank 0's console; SLURM's tasks (only task 0 has a terminal under srun --pty)
    all print lines; otherwise the terminal decides."""
    monkeypatch.delenv(CONSOLE_ENV, raising=False)
    for name in ("SLURM_NTASKS", "SLURM_PROCID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert life.console_kind() == "bar"
    monkeypatch.setenv(CONSOLE_ENV, "lines")
    assert life.console_kind() == "lines"
    monkeypatch.delenv(CONSOLE_ENV)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert life.console_kind() == "lines"


def test_handed_down_values_are_kept_by_a_worker_and_removed_by_who_set_them(monkeypatch, tmp_path):
    monkeypatch.delenv(RESUME_ENV, raising=False)
    with handed_down(**{RESUME_ENV: str(tmp_path / "last.ckpt")}):
        assert inherited_resume() == (True, tmp_path / "last.ckpt")
        with handed_down(**{RESUME_ENV: "elsewhere"}):  # a worker: rank 0's value stays
            assert os.environ[RESUME_ENV] == str(tmp_path / "last.ckpt")
        assert RESUME_ENV in os.environ
    assert RESUME_ENV not in os.environ and inherited_resume() == (False, None)
    with handed_down(**{RESUME_ENV: ""}):
        assert inherited_resume() == (True, None)  # rank 0 started a new run


@pytest.mark.slow
def test_ranks_with_and_without_a_terminal_and_skewed_clocks_run_the_same_collectives(tmp_path, tiny_data):
    """Rank 0 in a terminal, rank 1 in a log; rank 1's clock puts its last save an hour back at every
    epoch, rank 0's a second: one console, the same last.ckpt saves, the same collectives, no hang.
    Then a resume of that run while another job's run becomes the newest (--resume last), stopped by
    SIGTERM to rank 0 alone while rank 0's write of last.ckpt takes 8 s: every rank resumes the same
    checkpoint, and no rank exits (which makes Lightning's launcher SIGKILL the rest) before that
    write is whole."""
    output = tmp_path / "runs"
    common = ["--data-dir", str(tiny_data), "--output-dir", str(output)]
    done, ranks = run_ranks(tmp_path, "tty_rank0,skewed_clock", *common, "--epochs", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(ranks) == 2
    assert ranks[0]["console"] == ranks[1]["console"] == ["ThrottledProgressBar"]
    last_saves = [[epoch for name, epoch in rank["saves"] if name == "last.ckpt"] for rank in ranks]
    assert last_saves[0] == last_saves[1] == [1, 3]  # epoch 2 came within a minute of epoch 1 on rank 0
    assert ranks[0]["collectives"] == ranks[1]["collectives"]

    # 5 steps an epoch (100 images, 10 per rank): the resume starts at step 15; the signal comes after
    # step 17, the ranks agree on it at the next step (log every step), and stop after step 18.
    done, ranks = run_ranks(tmp_path, "resume_race,slow_last", *common, "--epochs", "5", "--resume", "last",
                            DDP_CASE_STEP="17", DDP_CASE_DELAY="8")
    run = output / "vgg16" / "version_0"
    assert len(ranks) == 2 and ranks[0]["resume"] == ranks[1]["resume"] == str(run / "checkpoints" / "last.ckpt")
    assert (output / "vgg16" / "version_99").is_dir()  # the newer run did appear in between
    # Rank 0 finished its write and said so. (It may still be SIGKILLed by the launcher's observer on
    # its way out, after everything, when rank 1 exited first: -9 rather than 143.)
    assert done.returncode in (143, -9), done.stderr[-3000:]
    assert "stopped by SIGTERM in epoch 4, after step 18: saved" in done.stderr, done.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 18
    assert ranks[0]["collectives"] == ranks[1]["collectives"]


@pytest.mark.slow
@pytest.mark.parametrize("flag, folder", [(["--lr", "find", "--epochs", "1"], "version_0"),
                                          (["--find-lr"], "lr_find/version_0")])
def test_range_test_with_two_processes_makes_one_run_folder(tmp_path, tiny_data, flag, folder):
    """The range test's Trainer starts the other process: it inherits the folder opened before."""
    output = tmp_path / "runs"
    done, ranks = run_ranks(tmp_path, "short_lr_find", "--data-dir", str(tiny_data), "--output-dir", str(output),
                            "--batch-size", "4", *flag)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(str(p.relative_to(output / "vgg16")) for p in (output / "vgg16").rglob("version_*"))
    assert runs == [folder]
    assert (output / "vgg16" / folder / "lr_find.json").is_file()
    assert done.stdout.count("suggested lr") == 1
    assert len(ranks) == 2 and ranks[0]["collectives"] == ranks[1]["collectives"]
