#!/usr/bin/env python
"""Seconds per epoch that a train.py run spends outside its training and validation steps.

Between two epochs the device waits for the host: checkpoints written, dashboards drawn, metrics
computed and logged, the next epoch's batches drawn. This runs train.py's own ``train(config)``
in this process, with the flags given after ``--``, and adds two measurements:

* a clock callback: each epoch's wall time minus the time inside its training steps
  (``on_train_batch_start`` to ``on_train_batch_end``) and its validation steps;
* Lightning's ``SimpleProfiler``: the seconds spent in each callback hook, from which the
  checkpoint callbacks' hooks (``NamedCheckpoint``: saving) and the dashboards' validation hook
  (the confusion matrix) are reported per epoch.

Each of ``--repeats`` runs starts a new run folder under a temporary directory (removed after).
The first epoch is left out of the per-epoch figures (it also pays one-off costs); the report
gives the median over epochs and runs, with the minimum and maximum.

    python -m benchmarks.epoch_overhead --repeats 3 --out benchmarks/results/epoch-overhead.json -- \\
        --config configs/vgg16_fast.yaml --data-dir ~/data/cifar10-jpeg.tar.gz --epochs 5 \\
        --train-limit 1000 --val-size 1000 --accelerator cpu

To compare two versions of the project, run the same command with ``PYTHONPATH`` pointing at a
checkout of the other one (its modules are then imported instead).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import SimpleProfiler


class EpochClock(Callback):
    """Per epoch: wall seconds, and the seconds inside training and validation steps."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self._epoch_start: float | None = None
        self._inside = 0.0
        self._step_start = 0.0

    def _begin(self) -> None:
        self._step_start = time.perf_counter()

    def _end(self) -> None:
        self._inside += time.perf_counter() - self._step_start

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        self._close(now)
        self._epoch_start, self._inside = now, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._begin()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._begin()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._end()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close(time.perf_counter())

    def _close(self, now: float) -> None:
        if self._epoch_start is not None:
            wall = now - self._epoch_start
            self.epochs.append({"wall_s": wall, "steps_s": self._inside, "outside_s": wall - self._inside})
            self._epoch_start = None


def _hook_seconds(profiler: SimpleProfiler) -> dict[str, list[float]]:
    return {action: list(durations) for action, durations in profiler.recorded_durations.items()}


def one_run(argv: Sequence[str], output: Path) -> dict[str, Any]:
    from cli.train import parse_run_config
    from run import build as run_build
    from run.training import train

    clock, profiler = EpochClock(), SimpleProfiler()
    real_build, real_trainer = run_build.build_callbacks, run_build.build_trainer

    def build_callbacks(*args: Any, **kwargs: Any) -> Any:
        callbacks = real_build(*args, **kwargs)
        callbacks.all.append(clock)
        return callbacks

    def build_trainer(*args: Any, **kwargs: Any) -> L.Trainer:
        trainer = real_trainer(*args, **kwargs)
        trainer.profiler = profiler  # the Trainer sets it up at fit, as if passed to its constructor
        return trainer

    run_build.build_callbacks, run_build.build_trainer = build_callbacks, build_trainer
    try:
        config = parse_run_config([*argv, "--output-dir", str(output)])
        train(config, argv=list(argv))
    finally:
        run_build.build_callbacks, run_build.build_trainer = real_build, real_trainer
    hooks = _hook_seconds(profiler)
    epochs = len(clock.epochs)

    def per_epoch(match: str) -> float:
        return sum(sum(durations) for action, durations in hooks.items() if match in action) / max(epochs, 1)

    return {
        "epochs": clock.epochs,
        "checkpoint_hooks_s_per_epoch": per_epoch("NamedCheckpoint"),
        "dashboard_validation_s_per_epoch": per_epoch("Dashboards.on_validation_epoch_end"),
        "checkpoints_written": sorted(p.name for p in output.rglob("*.ckpt")),
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py's flags")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    import cli

    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            runs.append(one_run(train_args, Path(folder)))
    later = [epoch for run in runs for epoch in run["epochs"][1:]]
    report = {
        "command": " ".join(["python -m benchmarks.epoch_overhead", *(argv if argv is not None else sys.argv[1:])]),
        "project": str(Path(cli.__file__).resolve().parents[1]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": torch.get_num_threads(), "torch": torch.__version__, "lightning": L.__version__},
        "outside_steps_s_per_epoch": summary([epoch["outside_s"] for epoch in later]),
        "wall_s_per_epoch": summary([epoch["wall_s"] for epoch in later]),
        "checkpoint_hooks_s_per_epoch": summary([run["checkpoint_hooks_s_per_epoch"] for run in runs]),
        "dashboard_validation_s_per_epoch": summary([run["dashboard_validation_s_per_epoch"] for run in runs]),
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
