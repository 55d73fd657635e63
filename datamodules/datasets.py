"""The data sets ``--dataset`` names, and how each one is read: the catalog.

Each entry says what its python archive (torchvision's format) is called and holds, where its
classes and statistics come from (fixed, :mod:`base.datasets`, or measured from an image-folder
tree), and whether it can be downloaded. ``layout`` finds a data set on disk with it and
``sources`` reads it; nothing here imports torch.

A new data set is one entry: in :data:`_BUILT_IN` below, or, from outside the project (a plugin,
a test), ``register(Dataset(...))``; it is then a ``--dataset`` choice, found, read, checked and
named in messages from its entry alone.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from base.datasets import CIFAR10, CIFAR100, DatasetInfo
from base.errors import UserError
from base.registry import Registry


@dataclass(frozen=True)
class PythonArchive:
    """torchvision's python format of a data set: a folder ``folder`` of pickles.

    ``batches`` are each split's files, of dicts holding ``b"data"`` (uint8 N x 3072, channel-major
    rows) and ``label_key``; ``meta`` holds the class names under ``names_key``. ``torchvision``
    names the ``torchvision.datasets`` class that downloads it (its ``url``, ``filename`` and
    ``tgz_md5``), or is None for a data set that cannot be downloaded: a missing copy is then a
    UserError naming the folder. ``checks_meta``: ``meta`` must be there and list the data set's
    classes in their order (CIFAR-10's is not read: its label order is fixed, and copies without
    ``batches.meta`` have always been read).
    """

    folder: str
    batches: dict[str, tuple[str, ...]]
    label_key: str
    meta: str
    names_key: str
    torchvision: str | None = None
    # The file the folder is extracted from (torchvision's download leaves it beside the folder);
    # None where there is no official one.
    tarball: str | None = None
    checks_meta: bool = True

    @property
    def files(self) -> tuple[str, ...]:
        """The batch files of both splits, train's first."""
        return self.batches["train"] + self.batches["test"]

    @property
    def required(self) -> tuple[str, ...]:
        """Every file the folder must hold: the batches, and ``meta`` where it is read."""
        return (*self.files, self.meta) if self.checks_meta else self.files


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

    @property
    def downloadable(self) -> bool:
        """Whether a missing copy is downloaded (with ``--download``): it has a torchvision downloader."""
        return self.python is not None and self.python.torchvision is not None


CIFAR10_PYTHON = PythonArchive(
    folder="cifar-10-batches-py",
    batches={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    label_key="labels",
    meta="batches.meta",
    names_key="label_names",
    torchvision="CIFAR10",
    tarball="cifar-10-python.tar.gz",
    checks_meta=False,
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
_BUILT_IN = (
    Dataset("cifar10", "CIFAR-10", CIFAR10, CIFAR10_PYTHON, reads_folders=True),
    Dataset("cifar100", "CIFAR-100", CIFAR100, CIFAR100_PYTHON, reads_folders=False),
    Dataset("imagefolder", "image-folder", None, None, reads_folders=True),
)
_REGISTRY: Registry[Dataset] = Registry("data set", _BUILT_IN)
_ENTRIES = _REGISTRY.entries

# A read-only live view: a registered data set shows in it at once, also where it was imported
# with ``from datamodules.datasets import CATALOG`` before the registration.
CATALOG: Mapping[str, Dataset] = _ENTRIES


def register(entry: Dataset) -> Dataset:
    """Add ``entry`` to the catalog (after the built-in ones); it is then a ``--dataset`` choice,
    found on disk, read and named in messages like the built-in ones.

    Raises ValueError (a developer's error, found when the entry is registered) where the name is
    taken, where its ``info`` is named otherwise (checkpoints record the data set by it), where a
    python archive comes without fixed ``info`` (its labels index fixed class names) or shares
    another data set's folder name, or where it reads nothing.
    """
    if entry.name in _ENTRIES:
        _REGISTRY.add(entry)  # refuses the taken name, as a ValueError
    if not entry.name or not entry.title:
        raise ValueError(f"data set entry {entry.name!r}: name and title must not be empty")
    if entry.info is not None and entry.info.name != entry.name:
        raise ValueError(f"data set entry {entry.name!r}: its info is named {entry.info.name!r}; name both the same")
    if entry.python is None and not entry.reads_folders:
        raise ValueError(f"data set entry {entry.name!r} reads neither a python archive nor image folders")
    if entry.python is not None:
        if entry.info is None:
            raise ValueError(f"data set entry {entry.name!r}: a python archive needs fixed info (its class names)")
        taken = [dataset_of(other).name for other in python_archives() if other.folder == entry.python.folder]
        if taken:
            raise ValueError(f"data set entry {entry.name!r}: python folder {entry.python.folder!r} is {taken[0]}'s")
        if set(entry.python.batches) != {"train", "test"} or not all(entry.python.batches.values()):
            raise ValueError(f"data set entry {entry.name!r}: python batches must name train and test files")
    return _REGISTRY.add(entry)


def unregister(name: str) -> None:
    """Remove a registered entry (a test's, at its end); the built-in ones stay."""
    _REGISTRY.remove(name)


def dataset(name: str | None) -> Dataset:
    """The catalog entry of ``name`` (None: cifar10, the default); a UserError for an unknown name."""
    if name is None:
        return _ENTRIES["cifar10"]
    if name not in _ENTRIES:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(_ENTRIES)}")
    return _ENTRIES[name]


def python_datasets() -> tuple[Dataset, ...]:
    """The entries read from a python archive, in catalog order (CIFAR-10's first)."""
    return tuple(entry for entry in _ENTRIES.values() if entry.python is not None)


def python_archives() -> tuple[PythonArchive, ...]:
    """Every python archive format of the catalog, registered ones included, CIFAR-10's first."""
    return tuple(entry.python for entry in python_datasets() if entry.python is not None)


def dataset_of(python: PythonArchive) -> Dataset:
    """The data set whose python archive format ``python`` is."""
    return next(entry for entry in _ENTRIES.values() if entry.python is python)
