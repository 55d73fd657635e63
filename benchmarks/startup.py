#!/usr/bin/env python
"""Start-up times of train.py: --help, a refused flag, and the command to the first training step.

Each figure is the median (and min-max) over ``--repeats`` runs of a fresh ``python train.py``
process, timed from just before the process starts:

* ``help``: ``train.py --help`` to exit;
* ``flag_error``: ``train.py --model vgg17`` to its one-line error, and ``flag_errors``: each of
  a set of mistakes across the four commands (a missing checkpoint, a resume with a changed
  option, a device list on the CPU, a mistyped data archive, an image path...), with the slowest
  median in ``flag_error_slowest``;
* ``first_step_cold``: to the start of the first training step of a one-epoch run on ``--data``,
  with an empty decode cache (every image decoded);
* ``first_step_warm``: the same with the cache of the previous run.

The first step is marked by a callback added to train.py's own list (run.build.build_callbacks),
which exits the process there, so the figure holds everything before it: imports, flag
checks, reading and decoding the data, building the network, the sanity check.

    python benchmarks/startup.py --data ~/data/cifar10-jpeg.tar.gz --out benchmarks/results/startup.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run.report import device_name

ROOT = Path(__file__).resolve().parents[1]
# Runs train.py's main with a callback that reports the first step's start and exits at once.
_CHILD = """
import os, sys, time
from lightning.pytorch.callbacks import Callback
from run import build

class FirstStep(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        print(f"FIRST_STEP {time.time():.6f}", flush=True)
        os._exit(0)

real = build.build_callbacks
def with_mark(*args, **kwargs):
    callbacks = real(*args, **kwargs)
    callbacks.all.append(FirstStep())
    return callbacks
build.build_callbacks = with_mark
from cli.train import main
sys.argv = ["train.py", *sys.argv[1:]]
sys.exit(main())
"""


def flag_mistakes(scratch: Path) -> dict[str, list[str]]:
    """Commands with one mistake each, their files made in ``scratch``: name -> argv after python."""
    run = scratch / "runs" / "vgg16" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: vgg16\nepochs: 3\noptimizer: adam\nlr: 0.001\n")
    # How torch.save's files start: the checks before torch loads read no further.
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04" + bytes(60))
    (scratch / "notes.txt").write_text("not a checkpoint\n")
    cpu = ["--accelerator", "cpu"]
    return {
        "train --model vgg17": ["train.py", "--model", "vgg17"],
        "train --resume missing.ckpt": ["train.py", "--resume", str(scratch / "missing.ckpt"), *cpu],
        "train --resume RUN --lr 0.5": ["train.py", "--resume", str(run), "--lr", "0.5", *cpu],
        "train --weights notes.txt": ["train.py", "--weights", str(scratch / "notes.txt"), *cpu],
        "train --devices 0,1 (CPU)": ["train.py", "--devices", "0,1", *cpu],
        "train --data-dir typo.tar.gz": ["train.py", "--data-dir", str(scratch / "cifar10-jpg.tar.gz"), *cpu],
        "train --run-name a/b": ["train.py", "--run-name", "a/b", *cpu],
        "test --ckpt missing.ckpt": ["test.py", "--ckpt", str(scratch / "missing.ckpt"), *cpu],
        "predict missing.jpg": ["predict.py", "--ckpt", str(run / "checkpoints" / "last.ckpt"), str(scratch / "missing.jpg")],
        "export --ckpt notes.txt": ["export.py", "--ckpt", str(scratch / "notes.txt"), "--format", "onnx"],
    }


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    ended = time.time()
    marks = [line for line in done.stdout.splitlines() if line.startswith("FIRST_STEP ")]
    if marks:
        return float(marks[-1].split()[1]) - started, done.stdout
    return ended - started, done.stdout + done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="CIFAR-10, as train.py's --data-dir (the 60,000-image archive)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--no-first-step", action="store_true", help="time --help and the mistakes only")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs: dict[str, list[float]] = {"help": [], "flag_error": [], "first_step_cold": [], "first_step_warm": []}
    mistakes: dict[str, list[float]] = {}
    quick = ["--model", "vgg16", "--epochs", "1", "--data-dir", args.data, "--accelerator", "cpu"]
    for _ in range(args.repeats):
        runs["help"].append(timed([sys.executable, "train.py", "--help"], env)[0])
        runs["flag_error"].append(timed([sys.executable, "train.py", "--model", "vgg17"], env)[0])
        with tempfile.TemporaryDirectory() as scratch:
            for name, command in flag_mistakes(Path(scratch)).items():
                seconds, output = timed([sys.executable, *command], env)
                if "error:" not in output:
                    raise SystemExit(f"{name}: no error message:\n{output[-2000:]}")
                mistakes.setdefault(name, []).append(seconds)
        if args.no_first_step:
            continue
        with tempfile.TemporaryDirectory() as scratch:
            cache = Path(scratch) / "cache"
            for name in ("first_step_cold", "first_step_warm"):
                command = [sys.executable, "-c", _CHILD, *quick, "--cache-dir", str(cache),
                           "--output-dir", str(Path(scratch) / "runs")]
                seconds, output = timed(command, env)
                if "FIRST_STEP" not in output:
                    raise SystemExit(f"{name}: no first step reached:\n{output[-2000:]}")
                runs[name].append(seconds)
    summary = lambda values: {"median": round(statistics.median(values), 2), "min": round(min(values), 2),  # noqa: E731
                              "max": round(max(values), 2), "runs": [round(v, 2) for v in values]}
    report = {
        "command": " ".join(["python", "benchmarks/startup.py", *sys.argv[1:]]),
        "machine": device_name("cpu"),
        "python": platform.python_version(),
        "seconds": {name: summary(values) for name, values in runs.items() if values},
        "flag_errors": {name: summary(values) for name, values in mistakes.items()},
        "flag_error_slowest": max(summary(values)["median"] for values in mistakes.values()),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
