"""Real inputs, round four: stops, pipes, crashes and limits that users of similar tools reported.

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
