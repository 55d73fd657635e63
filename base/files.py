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
    one, never a mix. The file gets the permissions of the file it replaces, or for a new file
    those a plain ``open()`` gives under the user's umask (0644 under umask 022). A failure inside ``write`` (full disk, an exception, Ctrl+C) removes the
    temporary file and leaves ``path`` as it was; a SIGKILL can leave the temporary file behind,
    never a truncated ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    try:
        # mkstemp creates 0600; the file gets what a plain open() would have given it.
        os.fchmod(fd, _plain_mode(path))
        with os.fdopen(fd, "wb") as tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _plain_mode(path: Path) -> int:
    """The permission bits of ``path`` if it exists, else those of a new file under the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)  # the only way to read it; set straight back
        os.umask(umask)
        return 0o666 & ~umask


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


def printable(path: str | os.PathLike[str]) -> str:
    """``path`` as text that can always be printed: bytes that are not UTF-8 shown as ``\\xNN``.

    Python keeps such bytes of a file name (an archive unzipped from Windows) as lone surrogates,
    which make ``print`` and ``str.encode`` raise.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")
