"""What a train.py run reports: its line of options, its outcome, the summary train.py prints, the
final ``hp/`` metrics for the dashboards, and the machine-readable results (``--results-json``,
read by benchmarks/accuracy.py)."""
from __future__ import annotations

import json
import os
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning
import torch

from base.files import atomic_write_text
from datamodules import describe_source
from run.checkpoints import load_checkpoint
from run.config import RunConfig
from run.loggers import dashboards_hint, log_final_hparams
from run.life import CONFIG_NAME

if TYPE_CHECKING:
    from run.build import Assembly


@dataclass
class RunOutcome:
    """What a finished run reports: its folder, checkpoints, and test metrics (``acc/test``...)."""

    config: RunConfig
    run_dir: Path
    is_global_zero: bool
    best: str | None = None
    best_score: float | None = None
    best_epoch: int | None = None
    last: str | None = None
    test_metrics: dict[str, float] = field(default_factory=dict)
    data: str = ""
    test_error: str | None = None  # the final test failed; the run's checkpoints are kept
    epochs_trained: int = 0  # when the fit ended, before the test
    last_step: int = 0


class Stopwatch:
    """The seconds of a run's phases for ``--results-json``: setup (from its creation), fit, test."""

    def __init__(self) -> None:
        self.started = {"setup": time.perf_counter()}

    def start(self, phase: str) -> None:
        self.started[phase] = time.perf_counter()

    def seconds(self) -> dict[str, float]:
        """Up to now: the test runs to the report."""
        now = time.perf_counter()
        return {
            "setup": self.started["fit"] - self.started["setup"],
            "fit": self.started["test"] - self.started["fit"],
            "test": now - self.started["test"],
            "total": now - self.started["setup"],
        }


def describe(config: RunConfig) -> str:
    """The options that make the run, in one line."""
    schedule = f"{config.scheduler} schedule" if config.scheduler != "none" else "constant lr"
    parts = [
        config.described_model,
        _length(config),
        f"batch {config.batch_size}",
        f"{config.optimizer} lr {config.lr:g}",
        schedule,
        *_recipe_extras(config),
        f"seed {config.seed}",
        f"{config.accelerator} x{config.hardware.device_count} {config.precision}"
        + (f" ({config.precision_reason})" if config.precision_reason and config.precision_reason != "asked for" else ""),
    ]
    return ", ".join(parts)


def _length(config: RunConfig) -> str:
    """How long the run trains: its epochs, or the batches of a fast dev run (which replaces them)."""
    if config.fast_dev_run:
        return f"{config.fast_dev_run} batch{'es' if config.fast_dev_run != 1 else ''} of each stage"
    return f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}"


def _recipe_extras(config: RunConfig) -> list[str]:
    """What a recipe adds to the course's (label smoothing, augmentation, clipping, EMA, TTA), so
    that the first line shows a config was applied; nothing for the course's own recipe."""
    extras = [f"label smoothing {config.label_smoothing:g}"] if config.label_smoothing else []
    if (config.translate, config.translate_padding) != (4, "zeros"):
        extras.append(f"shifts of {config.translate} ({config.translate_padding})")
    extras += [f"cutout {config.cutout}"] if config.cutout else []
    extras += [f"gradient norm clipped to {config.gradient_clip_val:g}"] if config.gradient_clip_val else []
    extras += [f"EMA {config.ema_decay:g}"] if config.ema_decay else []
    extras += [f"TTA {config.tta}"] if config.tta != "none" else []
    return extras


def fitted(config: RunConfig, run_dir: Path, assembly: Assembly) -> RunOutcome:
    """The outcome of a run whose fit has ended, before its test: its checkpoints and where it stopped.
    Read before testing: ``trainer.test`` restores the callbacks' state from the tested checkpoint."""
    trainer, callbacks = assembly.trainer, assembly.callbacks
    return RunOutcome(
        config,
        run_dir,
        trainer.is_global_zero,
        best=callbacks.best.best_model_path or None,
        best_score=float(callbacks.best.best_model_score) if callbacks.best.best_model_score is not None else None,
        last=callbacks.latest.best_model_path or None,
        data=describe_source(config.data_dir, config.dataset),
        epochs_trained=trainer.current_epoch,
        last_step=trainer.global_step,
    )


def report(outcome: RunOutcome, assembly: Assembly, clock: Stopwatch, argv: list[str] | None) -> None:
    """On rank 0, once the run is tested: its best epoch, its final ``hp/`` metrics in every logger
    with its options, and its results file (``--results-json``)."""
    config, trainer = outcome.config, assembly.trainer
    if outcome.best:
        # Lightning counts epochs from 0 (epoch000.ckpt holds the first); people count from 1.
        outcome.best_epoch = load_checkpoint(outcome.best, peek=True).epoch + 1
        final = {
            "hp/best_val_acc": outcome.best_score,
            "hp/best_epoch": outcome.best_epoch,
            "hp/test_acc": outcome.test_metrics.get("acc/test"),
            "hp/test_loss": outcome.test_metrics.get("loss/test"),
            "hp/test_images": outcome.test_metrics.get("images/test"),
        }
        log_final_hparams(trainer.loggers, config.to_dict(), final, step=trainer.global_step)
    if config.results_json:
        timer = assembly.callbacks.clock
        results = run_results(
            config=config.to_dict(),
            hardware={"accelerator": config.accelerator, "precision": config.precision, "devices": trainer.world_size},
            outcome={"best": outcome.best, "best_score": outcome.best_score, "best_epoch": outcome.best_epoch},
            test_metrics=outcome.test_metrics,
            epochs_trained=outcome.epochs_trained,
            seconds=clock.seconds(),
            time_to_accuracy=timer.report() if timer else None,
            data=outcome.data,
            argv=list(argv or []),
        )
        write_results_json(config.results_json, results)


def tested_on(metrics: dict[str, float], data: str) -> str:
    """``85.10 % on 1,000 test images of DATA``: an accuracy never goes without its sample size."""
    if "acc/test" not in metrics:
        return "n/a"
    images = f"{int(metrics['images/test']):,} test images of " if "images/test" in metrics else ""
    return f"{100 * metrics['acc/test']:.2f} % on {images}{data}"


def summary_lines(outcome: RunOutcome) -> list[tuple[str, str]]:
    """(label, value) rows that train.py prints at the end of a run."""
    config, metrics = outcome.config, outcome.test_metrics
    lines = [("test accuracy", tested_on(metrics, outcome.data))]
    if outcome.test_error:
        lines = [("final test", f"failed: {outcome.test_error}; the checkpoints below are kept, test one with test.py")]
    if not outcome.best:
        return lines + [("checkpoints", "none written (--fast-dev-run)")]
    score = f", acc/val {100 * outcome.best_score:.2f} %" if outcome.best_score is not None else ""
    lines += [
        ("best epoch", f"{outcome.best_epoch} of {config.epochs} (counting from 1){score}"),
        ("best checkpoint", f"{outcome.best}{score}"),
        ("last checkpoint", str(outcome.last)),
        ("config", str(outcome.run_dir / CONFIG_NAME)),
        ("dashboards", dashboards_hint(outcome.run_dir, config.logger)),
        ("test again", f"python test.py --ckpt {shlex.quote(outcome.best)}"),
    ]
    if config.results_json:
        lines.append(("results", str(config.results_json)))
    return lines


def device_name(accelerator: str) -> str:
    """What ran the run, as a results table names it: the GPU's model, or the CPU's and its core count."""
    if accelerator == "gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass  # not Linux: platform's answer stands
    return f"CPU ({model}), {cores} cores"


def run_results(
    *,
    config: dict[str, Any],
    hardware: dict[str, Any],
    outcome: dict[str, Any],
    test_metrics: dict[str, float],
    epochs_trained: int,
    seconds: dict[str, float],
    time_to_accuracy: dict[str, Any] | None,
    data: str,
    argv: list[str],
) -> dict[str, Any]:
    """One run's figures as plain JSON values; ``config`` is the run's resolved options, ``argv`` its flags."""
    return {
        "model": config["model"],
        "config": config.get("config"),
        "seed": config["seed"],
        "epochs": config["epochs"],
        "epochs_trained": epochs_trained,
        "test_accuracy": test_metrics.get("acc/test"),
        "test_top5_accuracy": test_metrics.get("acc_top5/test"),
        "test_loss": test_metrics.get("loss/test"),
        "tta": config.get("tta"),
        "ema_decay": config.get("ema_decay"),
        "gradient_clip_val": config.get("gradient_clip_val"),
        "best_checkpoint": outcome.get("best"),
        "best_val_accuracy": outcome.get("best_score"),
        "best_epoch": outcome.get("best_epoch"),
        "data": data,
        "hardware": {
            **hardware,
            "device_name": device_name(hardware["accelerator"]),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "python": platform.python_version(),
        },
        "seconds": seconds,
        "time_to_accuracy": time_to_accuracy,
        "argv": argv,
        "options": config,
    }


def write_results_json(path: str | Path, results: dict[str, Any]) -> None:
    # Options may hold Paths; everything else is already a plain value.
    atomic_write_text(Path(path), json.dumps(results, indent=2, default=str) + "\n")
