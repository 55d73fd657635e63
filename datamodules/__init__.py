"""The data: which data sets there are (``datasets``, the catalog), where one is (``layout``),
reading it from disk (``sources``) and serving it to a Trainer (``cifar10``: ``ImageDataModule``).

The readers load torch; they are imported on first use, so that ``layout`` (and the class names)
can check ``--data-dir`` with the other flags before torch loads.
"""
from __future__ import annotations

import importlib
from typing import Any

from datamodules.layout import CLASSES, check_data_dir, describe_source

# Imported on first access (PEP 562): name -> module.
_LAZY = {"CIFAR10DataModule": "datamodules.cifar10", "ImageDataModule": "datamodules.cifar10",
         "MEAN": "datamodules.cifar10", "STD": "datamodules.cifar10",
         "load_split": "datamodules.sources", "read_split": "datamodules.sources"}

__all__ = [
    "CIFAR10DataModule",
    "ImageDataModule",
    "CLASSES",
    "MEAN",
    "STD",
    "check_data_dir",
    "describe_source",
    "load_split",
    "read_split",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
