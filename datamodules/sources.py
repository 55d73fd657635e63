"""Read CIFAR-10 from disk, whichever of the supported layouts (``layout``) ``data_dir`` holds.

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
import re
import tarfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets import CIFAR10
from torchvision.datasets import utils as tv_utils

from base.errors import UserError
from base.files import atomic_write, printable
from datamodules.layout import (
    BATCH_FIX,
    CLASS_INDEX,
    CLASSES,
    LAYOUTS,
    PYTHON_BATCHES,
    PYTHON_FOLDER,
    SPLITS,
    Source,
    Split,
    corrupt_archive_error,
    detect,
    is_hidden,
    is_image_name,
    missing_batch_error,
    missing_data_error,
)

log = logging.getLogger(__name__)

_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """The decoded-image cache folder: ``$XDG_CACHE_HOME/cifar10-lightning`` or ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cifar10-lightning"


def ensure_downloaded(data_dir: str | Path) -> None:
    """Fetch the official python archive into ``data_dir`` if that folder is missing or empty."""
    path = Path(data_dir)
    if detect(path) is not None:
        return
    existed = path.exists()
    try:
        # What CIFAR10(root, download=True) does, minus loading the arrays: fetch the official
        # tarball, check its md5 and extract cifar-10-batches-py/ into data_dir.
        tv_utils.download_and_extract_archive(
            CIFAR10.url, str(path), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
        )
    except (OSError, RuntimeError, tarfile.TarError) as exc:
        # The folder held no data before, so any tarball is our partial download; left behind it
        # would be taken for a local copy on the next run.
        (path / CIFAR10.filename).unlink(missing_ok=True)
        if not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # nothing on disk is left changed by a failed attempt
        raise UserError(
            f"no CIFAR-10 at {data_dir}, and downloading it there failed (no network?): pass --data-dir "
            f"pointing at a local copy: {LAYOUTS}"
        ) from exc


def load_split(
    data_dir: str | Path,
    split: Split,
    cache_dir: str | Path | None = None,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as (images uint8 N,3,32,32 contiguous, labels int64 N).

    ``download`` fetches the official archive when ``data_dir`` is missing or empty. Image files
    are decoded once and cached in ``cache_dir`` (default: ``default_cache_dir()``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(data_dir)
    if download:
        ensure_downloaded(path)
    source = detect(path)
    if source is None:
        raise missing_data_error(path)
    if source.kind == "python":
        images, labels = _read_python_split(source.path, split)
    else:
        # --cache-dir arrives as a string (configs are written back as YAML, which takes no Path).
        images, labels = _load_cached(source, split, Path(cache_dir) if cache_dir else default_cache_dir())
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(labels),
    )


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


def _read_python_split(folder: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    # Read with pickle rather than torchvision.datasets.CIFAR10: torchvision checks the md5 of
    # every batch file, so it rejects any copy that is not byte-identical to the official one.
    images, labels = [], []
    for name in PYTHON_BATCHES[split]:
        batch_images, batch_labels = _read_python_batch(folder / name)
        images.append(batch_images)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise missing_batch_error(path)
    try:
        with path.open("rb") as f:
            entry = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(_field(entry, "data"), dtype=np.uint8)
        labels = np.asarray(_field(entry, "labels"), dtype=np.int64)
    # A damaged pickle can fail in many ways (EOFError, UnpicklingError, KeyError, ValueError,
    # ...), all of which mean the same thing here.
    except Exception as exc:
        raise _corrupt_batch_error(path, exc) from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise _corrupt_batch_error(path, "unexpected array shapes")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise _corrupt_batch_error(path, "labels outside 0..9")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue); we keep images as N,H,W,C.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _corrupt_batch_error(path: Path, why: object) -> UserError:
    return UserError(f"corrupted CIFAR-10 batch file {path} ({why}): {BATCH_FIX}")


def _field(entry: dict, key: str) -> object:
    # Files written by Python 2 (the official ones) load with bytes keys, others with str keys.
    return entry[key.encode()] if key.encode() in entry else entry[key]


# --- image files: folder tree and tar archive -----------------------------------------------


def _load_cached(source: Source, split: Split, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    cache_file = cache_dir / f"{source.path.name}-{split}-{_cache_key(source, split)}.npz"
    cached = _read_cache(cache_file)
    if cached is not None:
        return cached
    if source.kind == "folder":
        images, labels = _decode_folder(source.path, split)
    else:
        images, labels = _decode_archive(source.path, split)
    _write_cache(cache_file, images, labels)
    return images, labels


def _cache_key(source: Source, split: Split) -> str:
    # File names are hashed as the bytes they are on disk (os.fsencode): a name that is not
    # valid UTF-8 (a Windows archive unzipped here) is a str that .encode() refuses.
    digest = hashlib.sha256(f"{_CACHE_VERSION}|{source.kind}|{split}|".encode() + os.fsencode(source.path))
    if source.kind == "archive":
        stat = source.path.stat()
        digest.update(f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
    else:
        # A folder's own mtime does not change when files deeper down do, so key on every file.
        for path in sorted((source.path / split).rglob("*")):
            stat = path.stat()
            digest.update(b"|" + os.fsencode(path.relative_to(source.path)) + f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None when there are none or they are unusable (then we rebuild)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["x"], npz["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable cache %s (%s); rebuilding it", path, exc)
        return None
    if (
        images.dtype != np.uint8
        or images.ndim != 4
        or images.shape[1:] != (32, 32, 3)
        or labels.dtype != np.int64
        or labels.shape != (len(images),)
    ):
        log.warning("ignoring malformed cache %s; rebuilding it", path)
        return None
    return images, labels


def _write_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    # Atomic: a run killed mid-write leaves at most a stray temp file, never a truncated cache.
    # Failing to cache only costs time next run, so it warns instead of stopping this one.
    try:
        atomic_write(path, lambda f: np.savez(f, x=images, y=labels))
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
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot decode image {printable(name)} ({_decode_reason(exc)}): replace or remove the file") from exc


# Pillow names the file object it was given ("<_io.BytesIO object at 0x7f...>"), which says nothing
# to the user: the message names the file or archive member instead.
_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _decode_reason(exc: BaseException) -> str:
    """Why an image could not be decoded, without the in-memory file object Pillow was reading."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow recognises: damaged, truncated or not an image"
    return _OBJECT_REPR.sub("", str(exc)).strip() or type(exc).__name__


def _stack(decoded: list[tuple[int, str, np.ndarray]], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Order images by (class, file name) so every layout yields the same order, then stack."""
    decoded.sort(key=lambda item: item[:2])
    labels = np.array([label for label, _, _ in decoded], dtype=np.int64)
    present = set(labels.tolist())
    missing = [name for i, name in enumerate(CLASSES) if i not in present]
    if missing:
        raise UserError(
            f"no images for class(es) {', '.join(missing)} in {where}: every class needs images"
        )
    return np.stack([image for _, _, image in decoded]), labels


def _decode_folder(root: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    split_dir = root / split
    if not split_dir.is_dir():
        raise UserError(
            f"missing folder {split_dir}: an image-folder tree needs train/<class> and "
            "test/<class>"
        )
    unknown = sorted(
        c.name
        for c in split_dir.iterdir()
        if c.is_dir() and not is_hidden(c.name) and c.name not in CLASS_INDEX
    )
    if unknown:
        raise UserError(
            f"unexpected folder(s) {', '.join(unknown)} in {split_dir}: class folders must be "
            f"named {', '.join(CLASSES)}"
        )
    missing = [name for name in CLASSES if not (split_dir / name).is_dir()]
    if missing:
        raise UserError(f"missing class folder(s) {', '.join(missing)} in {split_dir}: add them")
    files = []
    for label, name in enumerate(CLASSES):
        for file in (split_dir / name).iterdir():
            if is_image_name(file.name) and file.is_file():
                try:
                    files.append((label, file.name, str(file), file.read_bytes()))
                except OSError as exc:
                    raise UserError(
                        f"cannot read image {printable(file)} ({exc.strerror or exc}): fix its permissions "
                        "or remove it"
                    ) from exc
    return _stack(_decode_all(files), str(split_dir))


def _decode_archive(archive: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    try:
        files = [(label, PurePosixPath(name).name, f"{archive}:{name}", data)
                 for label, name, data in _archive_images(archive, split)]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise corrupt_archive_error(archive, exc) from exc
    if not files:
        raise corrupt_archive_error(archive, f"no images under {split}/<class>/")
    return _stack(_decode_all(files), f"{archive}:{split}/")


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


def _archive_images(archive: Path, split: Split) -> Iterator[tuple[int, str, bytes]]:
    """Yield (label, member name, bytes) for the split's images, reading the archive once."""
    top: str | None = None
    # Stream mode reads the compressed file front to back without seeking, the fast path for gzip.
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            parts = [p for p in PurePosixPath(member.name).parts if p not in (".", "")]
            if not member.isfile() or any(is_hidden(p) for p in parts):
                continue
            if PYTHON_FOLDER in parts:
                raise UserError(
                    f"{archive} is the official python archive, not an image-folder tree: "
                    f"extract it (tar xzf {archive}) and pass --data-dir pointing at the "
                    "extracted folder"
                )
            if len(parts) == 4:
                if top is None:
                    top = parts[0]
                elif parts[0] != top:
                    raise UserError(
                        f"{archive} holds several top-level folders ({top}, {parts[0]}): "
                        "pack a single image-folder tree"
                    )
                parts = parts[1:]
            if len(parts) != 3 or parts[0] != split or not is_image_name(parts[2]):
                continue
            if parts[1] not in CLASS_INDEX:
                raise UserError(
                    f"unexpected folder {split}/{parts[1]} in {archive}: class folders must be "
                    f"named {', '.join(CLASSES)}"
                )
            extracted = tar.extractfile(member)
            assert extracted is not None  # member.isfile() guarantees a file object
            yield CLASS_INDEX[parts[1]], member.name, extracted.read()
