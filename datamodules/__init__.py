"""CIFAR-10 data: reading it from disk (``sources``) and serving it to a Trainer (``cifar10``)."""

from datamodules.cifar10 import MEAN, STD, CIFAR10DataModule
from datamodules.sources import CLASSES, check_data_dir, describe_source, load_split

__all__ = [
    "CIFAR10DataModule",
    "CLASSES",
    "MEAN",
    "STD",
    "check_data_dir",
    "describe_source",
    "load_split",
]
