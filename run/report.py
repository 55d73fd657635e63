"""The machine-readable outcome of one train.py run (``--results-json``), read by benchmarks/accuracy.py."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import lightning
import torch

from base.files import atomic_write_text


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
