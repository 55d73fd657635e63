"""Writing files so that a crash or a kill never leaves a half-written one behind."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# Temporary files are hidden and end in .tmp, so that nothing looking for *.ckpt, *.json or
# *.yaml (``--resume last``, tensorboard, a user's glob) ever takes one for a finished file.
TEMP_SUFFIX = ".tmp"


def temp_prefix(path: Path) -> str:
    """The name prefix of the temporary files that :func:`atomic_write` creates for ``path``."""
    return f".{path.name}."


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Let ``write`` fill a temporary file beside ``path``, fsync it, then rename it over ``path``.

    ``os.replace`` within one folder is atomic, so readers see either the old file or the new
    one, never a mix. A failure inside ``write`` (full disk, an exception, Ctrl+C) removes the
    temporary file and leaves ``path`` as it was; a SIGKILL can leave the temporary file behind,
    never a truncated ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    # The rename lives in the folder's entry table: without this a power cut right after the
    # rename may bring back the old file. Windows cannot open folders, and needs no such step.
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
