"""Where CIFAR-10 is in ``data_dir``: which of the supported layouts it holds, found from names
and file headers only.

Supported layouts:

* the official python archive: a folder holding ``cifar-10-batches-py/`` (what torchvision's
  download leaves behind), or that folder itself;
* an image-folder tree ``train/<class>/*`` and ``test/<class>/*``, at ``data_dir`` or in the one
  sub-folder of ``data_dir`` that holds such a tree;
* a ``.tar.gz`` / ``.tgz`` / ``.tar`` of such a tree (optionally under one top-level folder), or a
  folder holding exactly one such archive.

Nothing here imports torch or decodes an image, so that the commands check ``--data-dir`` with
their other flags, before the heavy imports; ``sources`` reads what is found.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from base.errors import UserError
from base.files import printable
from base.options import IMAGE_SUFFIXES

CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

Split = Literal["train", "test"]
SourceKind = Literal["python", "folder", "archive"]

PYTHON_FOLDER = "cifar-10-batches-py"
PYTHON_BATCHES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
ALL_BATCHES = PYTHON_BATCHES["train"] + PYTHON_BATCHES["test"]
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SPLITS = ("train", "test")
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}

LAYOUTS = (
    "an image-folder tree (train/<class>/*, test/<class>/*), a .tar.gz of one, "
    "or a folder holding cifar-10-batches-py"
)


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    # python: the cifar-10-batches-py folder; folder: the folder holding train/ and test/;
    # archive: the archive file.
    path: Path


def describe_source(data_dir: str | Path) -> str:
    """A short human description of what ``data_dir`` holds, for logs."""
    source = detect(Path(data_dir))
    if source is None:
        return f"no data yet at {data_dir}"
    label = {
        "python": "CIFAR-10 python archive",
        "folder": "image-folder tree",
        "archive": "image-folder archive",
    }[source.kind]
    return f"{label} {source.path}"


def check_data_dir(data_dir: str | Path, download: bool) -> None:
    """Fail fast with a UserError when ``data_dir`` cannot provide CIFAR-10.

    Only looks at folder names and file headers, so it is cheap enough to run before building
    models. A missing or empty folder is fine when ``download`` is set: it will be fetched.
    """
    path = Path(data_dir)
    source = detect(path)
    if source is None:
        if not download:
            raise missing_data_error(path)
        return
    if source.kind == "archive" and not looks_like_tar(source.path):
        raise corrupt_archive_error(source.path, "not a tar archive")
    if source.kind == "python":
        for name in ALL_BATCHES:
            if not (source.path / name).is_file():
                raise missing_batch_error(source.path / name)


# --- detection -------------------------------------------------------------------------------


def detect(path: Path) -> Source | None:
    """The source ``path`` holds, or None when it is missing or an empty folder (downloadable)."""
    if not path.exists():
        if is_archive_name(path) or path.suffix:
            # A missing file name (cifar10.tar.gzz, cifar10.zip) is a typo or a moved file, never a
            # folder to download into; a missing folder (data/) is where the download goes.
            what = "archive" if is_archive_name(path) else "file"
            raise UserError(
                f"{what} not found: {path}; check the path given to --data-dir (a folder that does not exist yet "
                "is where CIFAR-10 is downloaded, a file name must exist)"
            )
        return None
    if path.is_file():
        if is_archive_name(path):
            return Source("archive", path.resolve())
        raise UserError(f"{path} is not a CIFAR-10 source: pass --data-dir pointing at {LAYOUTS}")

    children = [c for c in path.iterdir() if not is_hidden(c.name)]
    if not children:
        return None
    if path.name == PYTHON_FOLDER or any((path / name).is_file() for name in ALL_BATCHES):
        return Source("python", path.resolve())
    if (path / PYTHON_FOLDER).is_dir():
        return Source("python", (path / PYTHON_FOLDER).resolve())
    if is_tree(path):
        return Source("folder", path.resolve())
    if any(c.name in CLASS_INDEX for c in children):
        raise UserError(
            f"{path} holds class folders directly, one level too deep: pass --data-dir pointing "
            f"at its parent {path.resolve().parent}, which must hold train/ and test/"
        )
    trees = [c for c in children if c.is_dir() and is_tree(c)]
    if len(trees) == 1:
        return Source("folder", trees[0].resolve())
    if len(trees) > 1:
        names = ", ".join(sorted(t.name for t in trees))
        raise UserError(
            f"{path} holds several image-folder trees ({names}): pass --data-dir pointing at one"
        )
    archives = [c for c in children if c.is_file() and is_archive_name(c)]
    if len(archives) == 1:
        return Source("archive", archives[0].resolve())
    if len(archives) > 1:
        names = ", ".join(sorted(a.name for a in archives))
        raise UserError(f"{path} holds several archives ({names}): pass --data-dir pointing at one")
    if path.resolve().name in CLASS_INDEX and path.resolve().parent.name in SPLITS:
        raise UserError(
            f"{path} is a class folder, two levels too deep: pass --data-dir pointing at "
            f"{path.resolve().parent.parent}, which must hold train/ and test/"
        )
    nested = find_nested_source(path)
    if nested is not None:
        raise UserError(
            f"no CIFAR-10 data directly in {path}, but {nested} holds some: pass --data-dir {nested}"
        )
    raise UserError(f"no CIFAR-10 data found in {path}: pass --data-dir pointing at {LAYOUTS}")


def find_nested_source(path: Path, max_depth: int = 3, max_folders: int = 200) -> Path | None:
    """A folder up to ``max_depth`` levels below ``path`` that holds a source, for a hint.

    One level down is detected and used as is; deeper ones only in this error message, since
    picking one of several nested copies silently could train on the wrong data. Breadth-first
    and capped, so that a big unrelated folder costs a few hundred directory listings at most.
    """
    queue = [(path, 0)]
    visited = 0
    while queue and visited < max_folders:
        folder, depth = queue.pop(0)
        visited += 1
        try:
            children = sorted(c for c in folder.iterdir() if not is_hidden(c.name))
        except OSError:
            continue
        for child in children:
            if child.is_dir() and (is_tree(child) or child.name == PYTHON_FOLDER):
                return child if child.name != PYTHON_FOLDER else folder
            if child.is_file() and is_archive_name(child):
                return child
            if child.is_dir() and depth + 1 < max_depth:
                queue.append((child, depth + 1))
    return None


def list_files(folder: Path, skip_hidden: bool = True) -> list[Path]:
    """Every file below ``folder``, sub-folders and symbolic links to folders included, sorted.

    Links are followed the way ``find -L`` and ``cp -rL`` follow them, so a class folder or a
    sub-folder that is a link is read like the folder it points to; a folder that links back to
    one of its own parents (a loop) is entered once. A broken link is listed as a file, so that
    whoever reads it says why it cannot be read instead of leaving it out without a word. Hidden
    names (``.DS_Store``, ``._x.jpg``, ``__MACOSX``) are skipped with ``skip_hidden``.

    Raises UserError, naming it, for a folder that cannot be listed.
    """
    found: list[Path] = []

    def walk(current: Path, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            info = current.stat()
            entries = sorted(os.scandir(current), key=lambda entry: entry.name)
        except OSError as exc:
            raise UserError(
                f"cannot list folder {printable(current)} ({exc.strerror or exc}): fix its permissions or remove it"
            ) from None
        here = ancestors | {(info.st_dev, info.st_ino)}
        for entry in entries:
            if skip_hidden and is_hidden(entry.name):
                continue
            path = Path(entry.path)
            try:
                is_folder = entry.is_dir()  # follows links; False for a broken one
            except OSError:
                is_folder = False
            if not is_folder:
                found.append(path)
                continue
            try:
                target = path.stat()
            except OSError:
                found.append(path)
                continue
            if (target.st_dev, target.st_ino) not in here:  # a loop back to a parent: already listed
                walk(path, here)

    walk(folder, frozenset())
    return found


def is_tree(path: Path) -> bool:
    return any((path / split).is_dir() for split in SPLITS)


def is_archive_name(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def is_hidden(name: str) -> bool:
    # Skips .DS_Store, macOS "._x.jpg" resource forks and __MACOSX folders that archivers add.
    return name.startswith(".") or name == "__MACOSX"


def is_image_name(name: str) -> bool:
    # os.path.splitext, not PurePosixPath(name).suffix (the same answer): it runs for every file
    # of a tree at every start, where building 60,000 paths costs a measurable part of a second.
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and not is_hidden(name)


def looks_like_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tar:
            return tar.next() is not None
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return False


def missing_data_error(path: Path) -> UserError:
    return UserError(
        f"no CIFAR-10 data at {path}: pass --data-dir pointing at {LAYOUTS}, or enable downloading"
    )


def corrupt_archive_error(path: Path, why: object) -> UserError:
    return UserError(
        f"cannot read archive {path} ({why}): it is corrupted or truncated; copy it again"
    )


BATCH_FIX = "re-extract cifar-10-python.tar.gz there, or delete the folder to download it again"


def missing_batch_error(path: Path) -> UserError:
    return UserError(f"missing CIFAR-10 batch file {path}: {BATCH_FIX}")
