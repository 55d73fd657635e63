"""The files and folders a command is given, checked before torch loads.

Nothing here imports torch, Lightning or the data: each command runs these checks first, so a
mistyped path is refused in a fraction of a second instead of after seconds of imports.
"""
from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path

from base.errors import UserError
from base.files import TEMP_SUFFIX, temp_prefix
from base.schema import IMAGE_SUFFIXES
from datamodules.layout import detect, list_files


# torch.save writes a zip archive since PyTorch 1.6 and a bare pickle (protocol 2+: 0x80) before.
_TORCH_SAVE_HEADS = (b"PK\x03\x04", b"\x80")


def check_checkpoint_file(path: str | os.PathLike[str], safetensors: bool = False) -> Path:
    """``path`` as a Path if it can be a checkpoint: an existing, non-empty file that torch.save
    wrote (or, with ``safetensors``, a ``.safetensors`` file); a one-line UserError otherwise.

    Only the first bytes are read; whether the contents are usable is for the loader to say.
    """
    path = Path(path)
    check_input_name(path, "checkpoint")
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}; check the path (train.py prints where it saved them)")
    if path.is_dir():
        inside = path / "best.ckpt" if path.name == "checkpoints" else path / "checkpoints" / "best.ckpt"
        example = inside if inside.is_file() else next(iter(sorted(path.rglob("*.ckpt"))), inside)
        raise UserError(f"{path} is a directory; pass a checkpoint file such as {example}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): it was not written completely; use another one")
    with path.open("rb") as file:
        head = file.read(9)
    if safetensors and path.suffix.lower() == ".safetensors":
        # An 8-byte little-endian header length, then the JSON header.
        if len(head) < 9 or head[8:9] != b"{":
            raise UserError(f"{path} is not a readable safetensors file (truncated or corrupted?); re-export it with export.py")
        return path
    if not head.startswith(_TORCH_SAVE_HEADS):
        accepted = "a .ckpt written by train.py or a course state dict saved with torch.save(model.state_dict())"
        raise UserError(
            f"{path} is not a PyTorch checkpoint file (not what torch.save writes); pass "
            + (accepted.replace(" or ", ", ") + ", or an exported .safetensors" if safetensors else accepted)
        )
    return path


def find_images(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders into the image files to classify, in a stable order.

    A file that is named explicitly is always used, whatever its suffix (Pillow recognises the
    format from the content). A folder contributes every file with an image suffix below it, in
    sorted order, sub-folders and symbolic links to folders included (``datamodules.layout.list_files``),
    skipping hidden files and folders (``.DS_Store``, ``._x.jpg``, ``.thumbnails``). A broken link
    with an image suffix is kept, so that predict.py names it as unreadable instead of leaving it
    out without a word. A path named twice is classified once. A missing path, a folder without
    images or one that cannot be listed is an error, since these are almost always a mistake.
    """
    found: list[Path] = []
    for given in map(Path, inputs):
        if given.is_dir():
            images = sorted(
                path
                for path in list_files(given)
                if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
            )
            if not images:
                raise UserError(
                    f"no images in folder {given} (looked for {', '.join(IMAGE_SUFFIXES)} files, subfolders included)"
                )
            found += images
        elif given.exists():
            found.append(given)
        else:
            raise UserError(f"no such file or folder: {given}")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def left_out_files(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The files in the folders of ``inputs`` that :func:`find_images` leaves out because their names
    are not those of images (``notes.txt``, ``photo.heic``), hidden ones aside, so that they can be named."""
    return [
        path
        for given in map(Path, inputs)
        if given.is_dir()
        for path in list_files(given)
        if path.suffix.lower() not in IMAGE_SUFFIXES and not path.name.startswith(".")
    ]


def _exists(path: Path) -> bool:
    """``path.exists()``, False for a path with a name too long to exist (pathlib raises for it)."""
    try:
        return path.exists()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        raise


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent folder."""
    while not _exists(path) and path != path.parent:
        path = path.parent
    return path


# What base.files.atomic_write adds to a file's name for its temporary file: ".NAME.XXXXXXXX.tmp".
ATOMIC_NAME_EXTRA = len(temp_prefix(Path(""))) + 8 + len(TEMP_SUFFIX)
# The longest path train.py writes inside a run folder, beyond the folder's own path (a periodic
# checkpoint's temporary file, "/checkpoints/.epoch123.ckpt.XXXXXXXX.tmp", with room to spare).
RUN_FOLDER_INSIDE = 64


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(folder, name)
    except (OSError, ValueError):
        return default  # no such query here (Windows): the common limits


def too_long(path: Path, last_extra: int = 0, inside: int = 0) -> str | None:
    """Why ``path`` cannot be created on its file system, or None: a name in it longer than the
    file system takes (NAME_MAX bytes, 255 on Linux and macOS), counting ``last_extra`` bytes more
    for its last name (a temporary file's), or the whole path, with ``inside`` bytes of paths
    below it, longer than PATH_MAX. Names are counted in bytes, as the file system counts them."""
    existing = existing_ancestor(path)
    name_max = _limit(existing, "PC_NAME_MAX", 255)
    new = path.parts[len(existing.parts):]
    for number, name in enumerate(new, start=1):
        size = len(os.fsencode(name)) + (last_extra if number == len(new) else 0)
        if size > name_max:
            shown = name if len(name) <= 40 else f"{name[:20]}...{name[-12:]}"
            extra = f" with the {last_extra} bytes its temporary file adds" if number == len(new) and last_extra else ""
            return f"the name {shown!r} is {size} bytes long{extra}, and a name on this file system has at most {name_max}"
    path_max = _limit(existing, "PC_PATH_MAX", 4096)
    size = len(os.fsencode(path)) + inside + last_extra
    if size >= path_max:
        return f"the path is {size} bytes long with what is written inside it, and this file system takes {path_max - 1} at most"
    return None


def check_name_lengths(path: Path, flag: str, last_extra: int = 0, inside: int = 0) -> None:
    """Refuse ``path`` (given as ``flag``) when it cannot be created for its length (:func:`too_long`):
    one line now, rather than an OSError once the work is done."""
    problem = too_long(path, last_extra, inside)
    if problem:
        raise UserError(f"{flag}: {problem}; choose a shorter one")


def check_input_name(path: Path, flag: str) -> None:
    """Refuse an input path with a name longer than the file system takes: no such file can exist
    (and pathlib raises instead of answering that it does not)."""
    problem = too_long(path)
    if problem and "the name" in problem:
        raise UserError(f"{flag} {path}: no such file or folder: {problem}")


def check_runs_data(data_dir: str | os.PathLike[str], config: Path) -> None:
    """Refuse a run's saved ``data_dir`` (from its ``config``) that no longer holds data: moved or
    deleted since. Without this the data would be downloaded there, into folders made anew (or a
    network error blamed, offline); only a ``--data-dir`` typed again says where it is now."""
    path = Path(data_dir)
    try:
        missing = not _exists(path) or (path.is_dir() and detect(path) is None)
    except UserError:
        missing = True  # a folder that holds something else now
    if missing:
        raise UserError(
            f"the run's data is no longer at {path} (where its {config} says it was); pass --data-dir with where it "
            "is now (a folder that does not exist is where CIFAR-10 is downloaded)"
        )


def check_writable(folder: Path, flag: str, inside: int = 0) -> None:
    """Refuse ``folder`` (given as ``flag``) when it cannot be created or written in, or its names
    are too long (``inside``: the bytes of the longest path to be written below it)."""
    check_name_lengths(folder, flag, inside=inside)
    existing = existing_ancestor(folder)
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: no permission to write in {existing}; choose another path")


def check_output_file(path: Path, flag: str) -> None:
    """Refuse an output file path that is a folder, lies where nothing can be written, or whose
    name is too long for its temporary file (it is written atomically, ``base.files``)."""
    check_name_lengths(path, flag, last_extra=ATOMIC_NAME_EXTRA)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a file, e.g. {path / 'results.json'}")
    check_writable(path.parent, flag)
