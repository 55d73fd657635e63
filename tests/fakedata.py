"""Tiny fake CIFAR-10 data sets, written in each real on-disk layout the project reads.

Shared by several test files (import with ``from fakedata import ...``: pytest puts ``tests/`` on
``sys.path``), so keep these signatures stable.

Every image has its class's own colour plus Gaussian noise, so a small model can learn the
classes well above chance in a few steps. The images are a pure function of (count, seed):
``fake_images(n, seed)`` gives exactly the pixels that the writers below store, the train split
with ``seed`` and the test split with ``seed + 1``. Labels cycle through the classes (image i has
label i % 10), the way the official batches interleave them.

Layouts:

* ``make_image_folder``: ``root/train/<class>/NNNN.png`` and ``root/test/<class>/NNNN.png``, where
  NNNN counts within the class in the order of ``fake_images`` (PNG, so lossless);
* ``make_tar_gz``: a ``.tar.gz`` of such a tree, members ``[top/]train/<class>/NNNN.png``;
* ``make_python_archive``: ``root/cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5``,
  ``test_batch`` and ``batches.meta``, pickled like the official files (protocol 2, bytes keys,
  ``b"data"`` uint8 N,3072 rows in channel-major order, ``b"labels"`` a list of ints). The md5
  sums differ from the official ones, so ``torchvision.datasets.CIFAR10`` refuses these files.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules import CLASSES

# One well-separated RGB colour per class, away from 0 and 255 so the noise is rarely clipped.
_PALETTE = np.array(
    [
        (200, 60, 60),
        (60, 200, 60),
        (60, 60, 200),
        (200, 200, 60),
        (200, 60, 200),
        (60, 200, 200),
        (128, 128, 128),
        (220, 140, 40),
        (40, 140, 220),
        (140, 40, 220),
    ],
    dtype=np.float64,
)
_NOISE_STD = 30.0


def fake_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images as uint8 (n, 32, 32, 3) and their labels as int64 (n,), label i % 10."""
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    noise = np.random.default_rng(seed).normal(0.0, _NOISE_STD, size=(n, 32, 32, 3))
    images = np.clip(_PALETTE[labels][:, None, None, :] + noise, 0, 255).round().astype(np.uint8)
    return images, labels


def make_image_folder(
    root: Path, n_train_per_class: int, n_test_per_class: int, seed: int = 0
) -> Path:
    """Write ``root/{train,test}/<class>/NNNN.png``; returns root.

    All 10 class folders are created even when a count is 0.
    """
    root = Path(root)
    for split, per_class, split_seed in (
        ("train", n_train_per_class, seed),
        ("test", n_test_per_class, seed + 1),
    ):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        images, labels = fake_images(per_class * len(CLASSES), split_seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            index_in_class = i // len(CLASSES)
            Image.fromarray(image).save(root / split / CLASSES[label] / f"{index_in_class:04d}.png")
    return root


def make_tar_gz(root: Path, archive: Path | None = None, top_folder: str | None = None) -> Path:
    """Pack the tree at ``root`` (its train/ and test/) into a .tar.gz; returns the archive path.

    ``archive`` defaults to ``<root>.tar.gz`` beside ``root``; ``top_folder`` puts every member
    under that one folder, as archives made with ``tar czf x.tar.gz cifar10/`` do.
    """
    root = Path(root)
    archive = Path(archive) if archive is not None else root.with_name(root.name + ".tar.gz")
    prefix = f"{top_folder}/" if top_folder else ""
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(root / split, arcname=prefix + split)
    return archive


def make_python_archive(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/`` like the official archive; returns root.

    The ``n_train`` training images are spread over the five data batches in order.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = fake_images(n_train, seed)
    batches = zip(np.array_split(train_images, 5), np.array_split(train_labels, 5))
    for i, (images, labels) in enumerate(batches, start=1):
        _write_batch(folder / f"data_batch_{i}", images, labels, f"training batch {i} of 5")
    test_images, test_labels = fake_images(n_test, seed + 1)
    _write_batch(folder / "test_batch", test_images, test_labels, "testing batch 1 of 1")
    meta = {
        b"label_names": [name.encode() for name in CLASSES],
        b"num_cases_per_batch": len(test_images),
        b"num_vis": 3 * 32 * 32,
    }
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return Path(root)


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray, batch_label: str) -> None:
    entry = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(label) for label in labels],
        b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1),
        b"filenames": [f"fake_{i:05d}.png".encode() for i in range(len(images))],
    }
    with path.open("wb") as f:
        pickle.dump(entry, f, protocol=2)
