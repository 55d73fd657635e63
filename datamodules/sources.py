"""Read a data set from disk, whichever of the supported layouts (``layout``) ``data_dir`` holds:
a catalogued data set in torchvision's python format (CIFAR-10, CIFAR-100, any registered one),
or an image-folder tree or archive of any N classes (``--dataset``, see ``datamodules.datasets``).

Archive members are read straight from the archive.

Image files are decoded once per split and cached as ``.npz`` (see ``_load_cached``) because
decoding 60,000 files takes several seconds, far longer than reading the arrays back.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import posixpath
import re
import tarfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import datasets as tv_datasets
from torchvision.datasets import utils as tv_utils

from base.errors import UserError
from base.files import atomic_write, printable
from base.schema import IMAGE_SUFFIXES
from datamodules.datasets import CIFAR10_PYTHON, PythonArchive, dataset_of, python_archives
from datamodules.datasets import dataset as catalog_entry
from datamodules.layout import (
    CLASSES,
    SPLITS,
    Source,
    Split,
    batch_fix,
    corrupt_archive_error,
    detect,
    folder_classes,
    is_hidden,
    is_image_name,
    layouts,
    list_files,
    missing_batch_error,
    missing_data_error,
    resolve_classes,
    shown_names,
)

log = logging.getLogger(__name__)

# Bump when decoding or what a cache is made from changes, so caches of older code are not reused.
# 2: images in sub-folders and behind links; the key covers every image by its change time too.
# 3: the key covers the --dataset and the class names (labels are indices into them), which the
#    cache holds too.
_CACHE_VERSION = 3


@dataclass(frozen=True)
class SplitData:
    """One split as read: ``images`` uint8 (N, 3, 32, 32) contiguous, ``labels`` int64 (N,) indexing
    ``classes``, the class names in label order."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]


def default_cache_dir() -> Path:
    """The decoded-image cache folder: ``$XDG_CACHE_HOME/cifar10-lightning`` or ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifar10-lightning"


def ensure_downloaded(data_dir: str | Path, dataset: str = "cifar10") -> None:
    """Fetch the data set's python archive into ``data_dir`` if that folder holds none yet (is
    missing, empty, or holds only other data sets' archives). A data set without a torchvision
    downloader in its entry (an image-folder one, a registered archive) cannot be downloaded: its
    absence is a UserError naming the folder and the layouts read, and nothing is fetched."""
    path = Path(data_dir)
    if detect(path, dataset) is not None:
        return
    entry = catalog_entry(dataset)
    if not entry.downloadable:
        raise missing_data_error(path, dataset)
    assert entry.python is not None and entry.python.torchvision is not None  # downloadable says so
    # What CIFAR10(root, download=True) (or CIFAR100) does, minus loading the arrays: fetch the
    # official tarball, check its md5 and extract the python folder into data_dir.
    official = getattr(tv_datasets, entry.python.torchvision)
    existed = path.exists()
    try:
        tv_utils.download_and_extract_archive(official.url, str(path), filename=official.filename, md5=official.tgz_md5)
    except (OSError, RuntimeError, tarfile.TarError) as exc:
        # The folder held no such data before, so any tarball is our partial download; left behind it
        # would be taken for a local copy on the next run.
        (path / official.filename).unlink(missing_ok=True)
        if not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # nothing on disk is left changed by a failed attempt
        raise UserError(
            f"no {entry.title} at {data_dir}, and downloading it there failed (no network?): pass --data-dir "
            f"pointing at a local copy: {layouts(dataset)}"
        ) from exc


def load_split(
    data_dir: str | Path,
    split: Split,
    cache_dir: str | Path | None = None,
    download: bool = False,
    dataset: str = "cifar10",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as (images uint8 N,3,32,32 contiguous, labels int64 N): :func:`read_split`
    without the class names."""
    data = read_split(data_dir, split, cache_dir=cache_dir, download=download, dataset=dataset)
    return data.images, data.labels


def read_split(
    data_dir: str | Path,
    split: Split,
    cache_dir: str | Path | None = None,
    download: bool = False,
    dataset: str = "cifar10",
) -> SplitData:
    """One split of the data set ``dataset`` (a ``--dataset`` name) at ``data_dir``, with its class names.

    ``download`` fetches the official archive (a data set with a torchvision downloader: CIFAR-10,
    CIFAR-100) when ``data_dir`` holds none.
    Image files are decoded once and cached in ``cache_dir`` (default: ``default_cache_dir()``).
    Raises UserError for data that is missing, damaged or not of that data set.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(data_dir)
    if download:
        ensure_downloaded(path, dataset)
    source = detect(path, dataset)
    if source is None:
        raise missing_data_error(path, dataset)
    if source.kind == "python":
        assert source.python is not None
        images, labels, classes = _read_python_split(source.path, split, source.python)
    else:
        # --cache-dir arrives as a string (configs are written back as YAML, which takes no Path).
        images, labels, classes = _load_cached(
            source, split, Path(cache_dir) if cache_dir else default_cache_dir(), dataset
        )
    return SplitData(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels), classes)


def measure_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) of uint8 images (N, 3, H, W), over every pixel, scaled to [0, 1].

    Counted from each channel's 256-bin histogram: exact, in int64, and no float copy of the
    images (50,000 CIFAR images take well under a second). Raises ValueError for no images.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.numel() == 0:
        raise ValueError("no images to measure")
    levels = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in range(3):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        total = counts.sum()
        mean = float((counts * levels).sum() / total)
        variance = float((counts * (levels - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(variance**0.5)
    return (means[0], means[1], means[2]), (stds[0], stds[1], stds[2])


# --- official python archive -----------------------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the official batch files contain: dicts, lists, bytes, numpy arrays.

    The batches are pickles and a pickle can run arbitrary code on load. We only open files the
    user pointed us at, as torchvision does, but refusing every other global on top costs nothing.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            # Python 3 pickles bytes this way under protocol 2.
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_python_split(
    folder: Path, split: Split, python: PythonArchive = CIFAR10_PYTHON
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images uint8 N,32,32,3, labels int64 N, class names) of one split of a python archive folder.

    The class names are the data set's (its catalog entry's ``info``); where the format reads its
    meta file (``checks_meta``: CIFAR-100, not CIFAR-10) it must list the same ones, since the
    labels index them. Read with pickle rather than torchvision.datasets: torchvision
    checks the md5 of every batch file, so it rejects any copy that is not byte-identical to the
    official one.
    """
    info = dataset_of(python).info
    assert info is not None  # every python archive is of a data set with fixed classes
    if python.checks_meta:
        # CIFAR-10's batches.meta is not needed (its label order is fixed); the others' are read to
        # check that the labels mean what the class names say.
        _check_meta_names(folder / python.meta, python, info.classes)
    images, labels = [], []
    for name in python.batches[split]:
        batch_images, batch_labels = _read_python_batch(folder / name, python, len(info.classes))
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels), info.classes


def _check_meta_names(path: Path, python: PythonArchive, classes: tuple[str, ...]) -> None:
    if not path.is_file():
        raise missing_batch_error(path, python)
    try:
        with path.open("rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
        names = tuple(name.decode() if isinstance(name, bytes) else str(name) for name in _field(entry, python.names_key))
    except Exception as exc:  # as for the batches: every failure means a damaged file
        raise _corrupt_batch_error(path, exc, python) from exc
    if names != classes:
        raise _corrupt_batch_error(
            path, f"its {python.names_key} are not {dataset_of(python).title}'s {len(classes)} classes in their order", python
        )


def _read_python_batch(
    path: Path, python: PythonArchive = CIFAR10_PYTHON, num_classes: int = len(CLASSES)
) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise missing_batch_error(path, python)
    try:
        with path.open("rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(_field(entry, "data"), dtype=np.uint8)
        labels = np.asarray(_field(entry, python.label_key), dtype=np.int64)
    # A damaged pickle can fail in many ways (EOFError, UnpicklingError, KeyError, ValueError,
    # ...), all of which mean the same thing here.
    except Exception as exc:
        raise _corrupt_batch_error(path, exc, python) from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise _corrupt_batch_error(path, "unexpected array shapes", python)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise _corrupt_batch_error(path, f"labels outside 0..{num_classes - 1}", python)
    # Rows are channel-major (1024 red, 1024 green, 1024 blue); we keep images as N,H,W,C.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _corrupt_batch_error(path: Path, why: object, python: PythonArchive = CIFAR10_PYTHON) -> UserError:
    return UserError(f"corrupted {dataset_of(python).title} batch file {path} ({why}): {batch_fix(python)}")


def _field(entry: dict, key: str) -> object:
    # Files written by Python 2 (the official ones) load with bytes keys, others with str keys.
    return entry[key.encode()] if key.encode() in entry else entry[key]


# --- image files: folder tree and tar archive -----------------------------------------------


def _load_cached(
    source: Source, split: Split, cache_dir: Path, dataset: str = "cifar10"
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The split's images, labels and class names: from the cache when it was made from exactly
    these files for this ``dataset``, else decoded and cached, removing this source's caches of
    files that have changed since.

    Files that are not used (not images by their names, or outside the class folders) are named
    in one warning line, from the cache too.
    """
    # A tree's classes are its folder names, known before decoding, so they are part of the key;
    # an archive's are known only once it is read, from the archive the key covers.
    classes = folder_classes(source.path, dataset) if source.kind == "folder" else None
    listing = _list_folder(source.path, split, classes, dataset) if classes is not None else None
    stem = _cache_stem(source, split, dataset)
    cache_file = cache_dir / f"{stem}-{_cache_key(source, split, listing, dataset, classes)}.npz"
    cached = _read_cache(cache_file, classes)
    if cached is None:
        if listing is not None:
            assert classes is not None
            cached = (*_decode_folder(source.path, split, listing, classes), classes)
        else:
            cached = _decode_archive(source.path, split, dataset)
        _write_cache(cache_file, *cached)
        _remove_stale_caches(cache_dir, stem, cache_file)
    images, labels, left_out, classes = cached
    _warn_left_out(left_out, f"{source.path}/{split}" if source.kind == "folder" else f"{source.path}:{split}/")
    return images, labels, classes


def _cache_stem(source: Source, split: Split, dataset: str = "cifar10") -> str:
    """The start of the names of ``source``'s caches of ``split`` read as ``dataset``: its name, and
    a hash of its path and the data set, so that a new cache can replace the old ones of the same
    data and no other's."""
    where = hashlib.sha256(f"{source.kind}|{dataset}|".encode() + os.fsencode(source.path)).hexdigest()[:8]
    return f"{source.path.name}-{split}-{where}"


_KEY_CHARS = 20


def _cache_key(
    source: Source,
    split: Split,
    listing: _Listing | None,
    dataset: str = "cifar10",
    classes: tuple[str, ...] | None = None,
) -> str:
    """A hash of everything the cache is made from: the ``dataset`` it is read as and its
    ``classes`` (in label order, when known beforehand: a tree's), and each image file of a folder
    (``listing``) or the archive file, by name, size, modification and change time and inode. So
    the caches of one tree read as cifar10 and as imagefolder never mix, nor those of a tree
    whose class folders changed.

    A folder's own times do not change when files deeper down do, so the key covers every image;
    the change time (ctime) changes on every write, even when a copy keeps the modification time
    (``cp -p``, ``rsync -t``) or a file was replaced by one of the same size, so an image fixed in
    place is read again. File names are hashed as the bytes they are on disk (os.fsencode): a
    name that is not valid UTF-8 (a Windows archive unzipped here) is a str that .encode() refuses.
    """
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{source.kind}|{split}|{dataset}|".encode() + os.fsencode(source.path))
    if classes is not None:
        # Each name with its length, so that no two lists of names hash alike.
        digest.update(b"|classes|" + b"".join(f"{len(name)}:".encode() + os.fsencode(name) for name in classes))
    paths = [source.path] if listing is None else [path for _, _, path in listing.images]
    for path in paths:
        try:
            stat = path.stat()  # through links: the file they point to
        except OSError:
            stat = path.lstat()  # a broken link, which decoding refuses
        digest.update(
            b"|" + os.fsencode(path) + f"|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}".encode()
        )
    return digest.hexdigest()[:_KEY_CHARS]


def _remove_stale_caches(cache_dir: Path, stem: str, keep: Path) -> None:
    """Delete the caches of the same source and split other than ``keep``: they were made from files
    that have changed since, and would only fill the disk."""
    length = len(stem) + 1 + _KEY_CHARS + len(".npz")
    try:
        stale = [
            path
            for path in cache_dir.iterdir()
            if path.name.startswith(stem + "-") and path.name.endswith(".npz") and len(path.name) == length and path != keep
        ]
        for path in stale:
            path.unlink(missing_ok=True)
    except OSError as exc:  # only costs disk space
        log.warning("cannot remove old caches in %s (%s)", printable(cache_dir), exc)


def _warn_left_out(left_out: list[str], where: str) -> None:
    if not left_out:
        return
    shown = ", ".join(left_out[:_SHOWN_LEFT_OUT]) + (", ..." if len(left_out) > _SHOWN_LEFT_OUT else "")
    log.warning(
        "warning: %d file(s) of %s not used: %s (images are files named %s inside train/<class>/ or "
        "test/<class>/, sub-folders included)",
        len(left_out), where, shown, "/".join(IMAGE_SUFFIXES),
    )


_SHOWN_LEFT_OUT = 5


def _read_cache(
    path: Path, expected_classes: tuple[str, ...] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], tuple[str, ...]] | None:
    """The cached arrays, left-out names and class names, or None when there are none or they are
    unusable (then we rebuild): ``expected_classes``, when given, must be the cache's."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["x"], npz["y"]
            left_out = [str(name) for name in npz["left_out"]] if "left_out" in npz.files else []
            classes = tuple(str(name) for name in npz["classes"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, exc)
        return None
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1:] != (32, 32, 3)
        or labels.dtype != np.int64
        or labels.shape != (len(images),)
        or len(classes) < 2
        or (len(labels) and int(labels.max()) >= len(classes))
        or (expected_classes is not None and classes != expected_classes)
    ):
        log.warning("ignoring malformed cache %s; rebuilding it", path)
        return None
    return images, labels, left_out, classes


def _write_cache(
    path: Path, images: np.ndarray, labels: np.ndarray, left_out: list[str], classes: tuple[str, ...]
) -> None:
    # Atomic: a run killed mid-write leaves at most a stray temp file, never a truncated cache.
    # Failing to cache only costs time next run, so it warns instead of stopping this one.
    names = np.array(left_out, dtype=str)
    # str_ arrays hold any name (np.savez's .npy needs no pickle for them); an empty list would be float.
    class_names = np.array(list(classes), dtype=str)
    try:
        atomic_write(path, lambda f: np.savez(f, x=images, y=labels, left_out=names, classes=class_names))
    except OSError as exc:
        log.warning("cannot write cache %s (%s); decoding again next run", printable(path), exc)


# Modes Pillow converts to RGB correctly as they are: 8 bits per channel, no transparency.
_PLAIN_MODES = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr"}
# Transparent pixels show this colour: white, the usual backdrop of cut-out photos and icons.
_BACKGROUND = (255, 255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, whatever its mode; a UserError for modes with no RGB meaning.

    Transparency is composited onto white. 16- and 32-bit integer and float images (``I;16``,
    ``I``, ``F``: 16-bit PNGs, scientific TIFFs) are scaled by their real range, where Pillow's
    own ``convert("RGB")`` would clip every value above 255 to white: 16-bit images (and 32-bit
    ones whose values fit in 16 bits) are divided by 257, floats in [0, 1] multiplied by 255,
    values in 0-255 kept, anything else stretched from its minimum to its maximum.
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(_to_uint8(values, mode)).convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND), rgba).convert("RGB")
    if mode in _PLAIN_MODES:
        return image.convert("RGB")
    raise UserError(f"image mode {mode} has no RGB meaning here; convert the image to RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16") or (low >= 0 and 255 < high <= 65535):
        scaled = values / 257
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    elif low >= 0 and high <= 255:
        scaled = values
    else:
        scaled = (values - low) * (255 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


def _decode_image(data: BinaryIO, name: str) -> np.ndarray:
    """Decode one image file to a 32,32,3 uint8 array; ``name`` is how errors refer to it."""
    try:
        with Image.open(data) as image:
            if image.size != (32, 32):
                raise UserError(
                    f"image {printable(name)} is {image.size[0]}x{image.size[1]}, CIFAR-10 images are 32x32: "
                    "resize or remove it"
                )
            return np.asarray(to_rgb(image))
    except Image.DecompressionBombError:
        # Pillow's guard against huge pictures fires before the size check above could.
        raise UserError(
            f"image {printable(name)} is larger than {2 * Image.MAX_IMAGE_PIXELS:,} pixels, CIFAR-10 images are "
            "32x32: resize or remove it"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"cannot decode image {printable(name)} ({_decode_reason(exc)}): replace or remove the file") from exc


# Pillow names the file object it was given ("<_io.BytesIO object at 0x7f...>"), which says nothing
# to the user: the message names the file or archive member instead.
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _decode_reason(exc: BaseException) -> str:
    """Why an image could not be decoded, without the in-memory file object Pillow was reading."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow recognises: damaged, truncated or not an image"
    return _OBJECT_REPR.sub("", str(exc)).strip() or type(exc).__name__


def _stack(
    decoded: list[tuple[int, str, np.ndarray]], where: str, classes: tuple[str, ...] = CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Order images by (class, path within the class folder) so every layout yields the same
    order, then stack. Every one of ``classes`` needs images."""
    decoded.sort(key=lambda item: item[:2])
    labels = np.array([label for label, _, _ in decoded], dtype=np.int64)
    present = set(labels.tolist())
    missing = [name for i, name in enumerate(classes) if i not in present]
    if missing:
        raise UserError(
            f"no images for class(es) {shown_names(missing)} in {where}: every class needs images"
        )
    return np.stack([image for _, _, image in decoded]), labels


@dataclass
class _Listing:
    """The files of one split of a folder tree: ``images`` as (label, path within its class folder,
    file), and ``left_out``, the printable names of the files that are not used."""

    images: list[tuple[int, str, Path]]
    left_out: list[str]


def _list_folder(
    root: Path, split: Split, classes: tuple[str, ...] = CLASSES, dataset: str = "cifar10"
) -> _Listing:
    """Every image of ``root/split``, labelled by the index of its class folder in ``classes``: all
    files named like images below each class folder, in sub-folders and behind symbolic links too
    (``layout.list_files``). Other files, and files beside the class folders, are left out (and
    named by the caller). CIFAR-10's split folders must hold exactly its ten class folders; any
    other data set's were checked against ``classes`` already (``layout.folder_classes``)."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(
            f"missing folder {split_dir}: an image-folder tree needs train/<class> and "
            "test/<class>"
        )
    children = [c for c in split_dir.iterdir() if not is_hidden(c.name)]
    if catalog_entry(dataset).info is not None:
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted(c.name for c in children if c.is_dir() and c.name not in index)
        if unknown:
            raise UserError(
                f"unexpected folder(s) {', '.join(unknown)} in {split_dir}: class folders must be "
                f"named {', '.join(classes)} (--dataset imagefolder reads a tree of any classes)"
            )
        broken = [name for name in classes if (split_dir / name).is_symlink() and not (split_dir / name).exists()]
        if broken:
            raise UserError(f"class folder(s) {', '.join(broken)} in {split_dir} are broken symbolic links: fix or replace them")
        missing = [name for name in classes if not (split_dir / name).is_dir()]
        if missing:
            raise UserError(f"missing class folder(s) {', '.join(missing)} in {split_dir}: add them")
    listing = _Listing([], sorted(printable(c.relative_to(root)) for c in children if not c.is_dir()))
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        inside = len(str(class_dir)) + 1  # the path within the class folder, cut from the string: fast
        for file in list_files(class_dir):
            if is_image_name(file.name):
                listing.images.append((label, str(file)[inside:].replace(os.sep, "/"), file))
            else:
                listing.left_out.append(printable(file.relative_to(root)))
    return listing


def _decode_folder(
    root: Path, split: Split, listing: _Listing, classes: tuple[str, ...] = CLASSES
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    files = []
    for label, name, file in listing.images:
        try:
            files.append((label, name, str(file), file.read_bytes()))
        except OSError as exc:
            why = exc.strerror or str(exc)
            if file.is_symlink() and not file.exists():
                why = f"a broken symbolic link to {printable(os.readlink(file))}"
            raise UserError(
                f"cannot read image {printable(file)} ({why}): fix it (or its permissions) or remove it"
            ) from exc
    return (*_stack(_decode_all(files), str(root / split), classes), listing.left_out)


def _decode_archive(
    archive: Path, split: Split, dataset: str = "cifar10"
) -> tuple[np.ndarray, np.ndarray, list[str], tuple[str, ...]]:
    info = catalog_entry(dataset).info
    try:
        named, left_out, found = _archive_images(archive, split, info.classes if info is not None else None)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise corrupt_archive_error(archive, exc) from exc
    if not named:
        raise corrupt_archive_error(archive, f"no images under {split}/<class>/")
    classes = info.classes if info is not None else resolve_classes(found["train"], found["test"], str(archive))
    index = {name: i for i, name in enumerate(classes)}
    files = [(index[folder], name, shown, data) for folder, name, shown, data in named]
    return (*_stack(_decode_all(files), f"{archive}:{split}/", classes), left_out, classes)


def _decode_all(files: list[tuple[int, str, str, bytes]]) -> list[tuple[int, str, np.ndarray]]:
    """(label, file name, 32,32,3 image) of every (label, file name, name for errors, bytes) given.

    Decoded on all CPU cores at once: Pillow lets go of the GIL while it decodes, so threads
    suffice (benchmarks/startup.py measures the cold start this shortens).
    """
    def decode(item: tuple[int, str, str, bytes]) -> tuple[int, str, np.ndarray]:
        label, name, shown, data = item
        return label, name, _decode_image(io.BytesIO(data), shown)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=cores) as pool:
        return list(pool.map(decode, files))


def _member_parts(name: str) -> list[str]:
    return [part for part in PurePosixPath(name).parts if part not in (".", "", "/")]


def _in_split(parts: list[str]) -> tuple[str | None, list[str]] | None:
    """(top-level folder or None, the parts from the split folder on) of a member's path, or None
    for a member outside train/ and test/ (a README beside them)."""
    if parts and parts[0] in SPLITS and not (len(parts) > 1 and parts[1] in SPLITS):
        return None, parts
    if len(parts) > 1 and parts[1] in SPLITS:
        return parts[0], parts[1:]
    return None


@dataclass
class _Link:
    """An archive member that is a hard or symbolic link, whose data another member holds."""

    label: str  # its class folder's name
    name: str  # its path within its class folder
    shown: str  # the member's name, for messages
    target: str  # the member it points to, as normalised parts joined by "/"
    symbolic: bool  # a symbolic link may point to a folder: every image below it is used then


def _archive_images(
    archive: Path, split: Split, fixed_classes: tuple[str, ...] | None = CLASSES
) -> tuple[list[tuple[str, str, str, bytes]], list[str], dict[str, set[str]]]:
    """(class folder, path within the class folder, name for errors, bytes) of the split's images,
    the members left out (not images by name, or beside the class folders), and the class folders
    of both splits (``{"train": {...}, "test": {...}}``: every folder below a split folder that is
    a member or holds one), which the caller orders into labels.

    ``fixed_classes``: the data set's fixed class names (CIFAR-10's by default), and an image in any
    other folder is refused; None: every folder below the split folder is a class.

    Read front to back (stream mode, the fast path for gzip). Hard links (``tar`` stores every
    further name of a hard-linked file so) and symbolic links are images like the files they
    point to, as in the unpacked tree; one whose target comes later in the archive, or lies in
    the other split, is read in a second pass. A link out of the archive, or to nothing, is refused.
    """
    top: list[str | None] = []
    files: list[tuple[str, str, str, bytes]] = []
    left_out: list[str] = []
    kept: dict[str, bytes] = {}
    links: list[_Link] = []
    found: dict[str, set[str]] = {name: set() for name in SPLITS}
    python_folders = {python.folder for python in python_archives()}
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = _member_parts(member.name)
            if any(is_hidden(p) for p in parts):
                continue
            if member.isdir():
                placed = _in_split(parts)
                if placed is not None and len(placed[1]) >= 2:  # split/<class>[/...]: an (empty?) class folder
                    found[placed[1][0]].add(placed[1][1])
                continue
            if not (member.isfile() or member.islnk() or member.issym()):
                continue
            if python_folders.intersection(parts):
                raise UserError(
                    f"{archive} is the official python archive, not an image-folder tree: "
                    f"extract it (tar xzf {archive}) and pass --data-dir pointing at the "
                    "extracted folder"
                )
            placed = _in_split(parts)
            if placed is None:
                continue
            if not top:
                top.append(placed[0])
            elif placed[0] != top[0]:
                raise UserError(
                    f"{archive} holds several top-level folders ({top[0] or '.'}, {placed[0] or '.'}): "
                    "pack a single image-folder tree"
                )
            rest = placed[1]
            if len(rest) > 2:
                found[rest[0]].add(rest[1])
            if rest[0] != split:
                continue
            shown = printable(member.name)
            if len(rest) == 2:  # beside the class folders
                left_out.append(shown)
                continue
            if fixed_classes is not None and rest[1] not in fixed_classes:
                if is_image_name(rest[-1]):
                    raise UserError(
                        f"unexpected folder {split}/{printable(rest[1])} in {archive}: class folders must be "
                        f"named {', '.join(fixed_classes)}"
                    )
                left_out.append(shown)
                continue
            label, name = rest[1], "/".join(rest[2:])
            if not is_image_name(rest[-1]) and not member.issym():
                left_out.append(shown)
                continue
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None  # member.isfile() guarantees a file object
                data = extracted.read()
                kept["/".join(parts)] = data
                files.append((label, name, f"{archive}:{member.name}", data))
                continue
            target = _link_target(archive, member, parts)
            if target in kept and is_image_name(rest[-1]):
                files.append((label, name, f"{archive}:{member.name}", kept[target]))
            else:
                links.append(_Link(label, name, member.name, target, member.issym()))
    if links:
        _read_link_targets(archive, links, files, left_out)
    return files, left_out, found


def _link_target(archive: Path, member: tarfile.TarInfo, parts: list[str]) -> str:
    """The normalised name of the member that link ``member`` points to; a UserError if outside."""
    if member.islnk():  # hard links name the target from the archive's root
        return "/".join(_member_parts(member.linkname))
    if not member.linkname.startswith("/"):
        joined = posixpath.normpath(posixpath.join(*parts[:-1], member.linkname)) if len(parts) > 1 else posixpath.normpath(member.linkname)
        if joined != ".." and not joined.startswith("../"):
            return "/".join(_member_parts(joined))
    raise UserError(
        f"{archive}: member {printable(member.name)} is a symbolic link to {printable(member.linkname)}, "
        "outside the archive: pack the file itself (tar --dereference, or -h)"
    )


def _read_link_targets(
    archive: Path, links: list[_Link], files: list[tuple[str, str, str, bytes]], left_out: list[str]
) -> None:
    """Read, in a second pass over ``archive``, the data of the ``links`` the first pass could not:
    the file each points to, or, for a symbolic link to a folder, every image below that folder."""
    by_target: dict[str, list[_Link]] = {}
    for link in links:
        by_target.setdefault(link.target, []).append(link)
    found: set[int] = set()
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = _member_parts(member.name)
            if any(is_hidden(p) for p in parts) or not (member.isfile() or member.islnk() or member.issym()):
                continue
            for depth in range(len(parts), 0, -1):  # the member itself, then each folder above it
                for link in by_target.get("/".join(parts[:depth]), ()):
                    below = parts[depth:]
                    if below and not link.symbolic:
                        continue
                    name = "/".join([link.name, *below]) if below else link.name
                    shown = "/".join([link.shown, *below])
                    found.add(id(link))
                    if not is_image_name(name):
                        left_out.append(printable(shown))
                        continue
                    if not member.isfile():  # a link reached through a link: not followed further
                        left_out.append(printable(shown))
                        continue
                    extracted = tar.extractfile(member)
                    assert extracted is not None
                    files.append((link.label, name, f"{archive}:{shown}", extracted.read()))
    for link in links:
        if id(link) not in found:
            raise UserError(
                f"{archive}: member {printable(link.shown)} is a link to {printable(link.target)}, which the archive "
                "does not hold: pack the file itself (tar --dereference, or -h)"
            )
