"""The installed commands (``[project.scripts]`` in pyproject.toml): ``cifar10-train``, ``cifar10-test``,
``cifar10-predict`` and ``cifar10-export`` do what ``python train.py`` and the others do in a checkout."""
from __future__ import annotations

import importlib
from typing import NoReturn

from cli.flags import run_main


def _run(name: str) -> NoReturn:
    # Imported on call: each command loads only its own module (and --help stays fast).
    run_main(importlib.import_module(f"cli.{name}").main)


def train() -> NoReturn:
    _run("train")


def test() -> NoReturn:
    _run("test")


def predict() -> NoReturn:
    _run("predict")


def export() -> NoReturn:
    _run("export")
