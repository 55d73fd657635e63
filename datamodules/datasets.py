"""The data sets ``--dataset`` names, and how each one is read: the catalog.

Each entry says what its python archive (torchvision's format) is called and holds, where its
classes and statistics come from (fixed, :mod:`base.datasets`, or measured from an image-folder
tree), and whether it can be downloaded. ``layout`` finds a data set on disk with it and
``sources`` reads it; nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from base.datasets import CIFAR10, CIFAR100, DatasetInfo
from base.errors import UserError


@dataclass(frozen=True)
class PythonArchive:
    """torchvision's python format of a data set: a folder ``folder`` of pickles.

    ``batches`` are each split's files, of dicts holding ``b"data"`` (uint8 N x 3072, channel-major
    rows) and ``label_key``; ``meta`` holds the class names under ``names_key``. ``torchvision``
    names the ``torchvision.datasets`` class that downloads it.
    """

    folder: str
    batches: dict[str, tuple[str, ...]]
    label_key: str
    meta: str
    names_key: str
    torchvision: str
    # The file torchvision downloads and extracts the folder from (it leaves it beside the folder).
    tarball: str

    @property
    def files(self) -> tuple[str, ...]:
        return self.batches["train"] + self.batches["test"]


@dataclass(frozen=True)
class Dataset:
    """One ``--dataset`` choice: its ``title`` for messages, its fixed ``info`` (None: classes from the
    tree's folders, statistics measured on its training split) and its ``python`` archive format,
    if it has one (then it is read from it, and downloaded when missing)."""

    name: str
    title: str
    info: DatasetInfo | None
    python: PythonArchive | None
    # Whether an image-folder tree (or .tar.gz of one) is read for it.
    reads_folders: bool


CIFAR10_PYTHON = PythonArchive(
    folder="cifar-10-batches-py",
    batches={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    label_key="labels",
    meta="batches.meta",
    names_key="label_names",
    torchvision="CIFAR10",
    tarball="cifar-10-python.tar.gz",
)
CIFAR100_PYTHON = PythonArchive(
    folder="cifar-100-python",
    batches={"train": ("train",), "test": ("test",)},
    label_key="fine_labels",
    meta="meta",
    names_key="fine_label_names",
    torchvision="CIFAR100",
    tarball="cifar-100-python.tar.gz",
)
PYTHON_ARCHIVES = (CIFAR10_PYTHON, CIFAR100_PYTHON)

CATALOG: dict[str, Dataset] = {
    "cifar10": Dataset("cifar10", "CIFAR-10", CIFAR10, CIFAR10_PYTHON, reads_folders=True),
    "cifar100": Dataset("cifar100", "CIFAR-100", CIFAR100, CIFAR100_PYTHON, reads_folders=False),
    "imagefolder": Dataset("imagefolder", "image-folder", None, None, reads_folders=True),
}


def dataset(name: str | None) -> Dataset:
    """The catalog entry of ``name`` (None: cifar10, the default); a UserError for an unknown name."""
    if name is None:
        return CATALOG["cifar10"]
    if name not in CATALOG:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(CATALOG)}")
    return CATALOG[name]


def dataset_of(python: PythonArchive) -> Dataset:
    """The data set whose python archive format ``python`` is."""
    return next(entry for entry in CATALOG.values() if entry.python is python)
