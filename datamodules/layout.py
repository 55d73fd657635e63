"""Where a data set is in ``data_dir``: which of the supported layouts it holds, found from names
and file headers only.

Supported layouts:

* torchvision's python archive of a catalogued data set (``datamodules.datasets``: CIFAR-10,
  CIFAR-100, any registered one): a folder holding its folder (``cifar-10-batches-py/``,
  ``cifar-100-python/``: what torchvision's download leaves behind), or that folder itself;
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

from base.datasets import CIFAR10
from base.errors import UserError
from base.files import printable
from base.schema import IMAGE_SUFFIXES
from datamodules.datasets import CIFAR10_PYTHON, Dataset, PythonArchive, dataset_of, python_archives
from datamodules.datasets import dataset as catalog_entry

# CIFAR-10's classes in label order (base.datasets.CIFAR10), kept here for the modules that import them.
CLASSES: tuple[str, ...] = CIFAR10.classes

Split = Literal["train", "test"]
SourceKind = Literal["python", "folder", "archive"]

# CIFAR-10's python archive (datamodules.datasets.CIFAR10_PYTHON), by the names used before the catalog.
PYTHON_FOLDER = CIFAR10_PYTHON.folder
PYTHON_BATCHES: dict[str, tuple[str, ...]] = CIFAR10_PYTHON.batches
ALL_BATCHES = CIFAR10_PYTHON.files
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SPLITS = ("train", "test")
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}

LAYOUTS = (
    "an image-folder tree (train/<class>/*, test/<class>/*), a .tar.gz of one, "
    "or a folder holding cifar-10-batches-py"
)
_TREE = "an image-folder tree (train/<class>/*, test/<class>/*)"
# How many class names a message lists before "...".
_SHOWN_NAMES = 8


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    # python: the cifar-10-batches-py (or cifar-100-python) folder; folder: the folder holding
    # train/ and test/; archive: the archive file.
    path: Path
    # python: which python archive format the folder holds.
    python: PythonArchive | None = None


def _entry(dataset: str | None) -> Dataset | None:
    return None if dataset is None else catalog_entry(dataset)


def _title(dataset: str | None) -> str:
    # Without a dataset named (any layout is looked for) the messages keep CIFAR-10's name, the default's.
    return "CIFAR-10" if dataset is None else catalog_entry(dataset).title


def layouts(dataset: str | None) -> str:
    """The layouts ``--dataset dataset`` (None: any) reads, as a message names them, from its catalog
    entry: its python folder and the files in it, and whether a tree (or .tar.gz of one) is read."""
    if dataset is None:
        return LAYOUTS
    entry = catalog_entry(dataset)
    if entry.python is None:
        if entry.info is None:
            return "an image-folder tree (train/<class>/*, test/<class>/*, at least 2 classes) or a .tar.gz of one"
        return f"{_TREE} or a .tar.gz of one"
    held = f"a folder holding {entry.python.folder}"
    if entry.reads_folders:
        return f"{_TREE}, a .tar.gz of one, or {held}"
    *first, last = entry.python.required
    files = f"{', '.join(first)} and {last}" if first else last
    return f"{held} (torchvision's python format: {files})"


def describe_source(data_dir: str | Path, dataset: str | None = None) -> str:
    """A short human description of what ``data_dir`` holds, for logs."""
    source = detect(Path(data_dir), dataset)
    if source is None:
        return f"no data yet at {data_dir}"
    if source.kind == "python":
        assert source.python is not None
        return f"{dataset_of(source.python).title} python archive {source.path}"
    label = {"folder": "image-folder tree", "archive": "image-folder archive"}[source.kind]
    return f"{label} {source.path}"


def check_data_dir(data_dir: str | Path, download: bool, dataset: str | None = None) -> None:
    """Fail fast with a UserError when ``data_dir`` cannot provide the data set ``dataset`` (a
    ``--dataset`` name; None: any of them).

    Only looks at folder names and file headers, so it is cheap enough to run before building
    models. A missing or empty folder is fine when ``download`` is set and the data set can be
    downloaded (its entry names a torchvision downloader: CIFAR-10, CIFAR-100): it will be fetched;
    otherwise it is a UserError naming the folder and the layouts read. An image-folder tree's class folders
    are checked too (both splits the same classes, see :func:`folder_classes`); an archive's are
    checked when it is read.
    """
    path = Path(data_dir)
    source = detect(path, dataset)
    entry = _entry(dataset)
    if source is None:
        if not download or (entry is not None and not entry.downloadable):
            raise missing_data_error(path, dataset)
        return
    if source.kind == "archive" and not looks_like_tar(source.path):
        raise corrupt_archive_error(source.path, "not a tar archive")
    if source.kind == "python":
        assert source.python is not None
        for name in source.python.required:
            if not (source.path / name).is_file():
                raise missing_batch_error(source.path / name, source.python)
    if source.kind == "folder" and entry is not None and entry.info is None:
        folder_classes(source.path, dataset)


# --- detection -------------------------------------------------------------------------------


def detect(path: Path, dataset: str | None = None) -> Source | None:
    """The source ``path`` holds for ``--dataset dataset`` (None: any data set), or None when it is
    missing or an empty folder (downloadable).

    A folder holding only the python archive of another data set (``data/`` with CIFAR-10 in it,
    for ``--dataset cifar100``) is where this one is downloaded too, as torchvision would. A source
    of the wrong kind for ``dataset`` (a tree for cifar100, a python archive for imagefolder, the
    other CIFAR's archive itself) is refused in one line saying which ``--dataset`` reads it.
    """
    entry = _entry(dataset)
    title = _title(dataset)
    if not path.exists():
        if is_archive_name(path) or path.suffix:
            # A missing file name (cifar10.tar.gzz, cifar10.zip) is a typo or a moved file, never a
            # folder to download into; a missing folder (data/) is where the download goes.
            what = "archive" if is_archive_name(path) else "file"
            raise UserError(
                f"{what} not found: {path}; check the path given to --data-dir (a folder that does not exist yet "
                f"is where {title} is downloaded, a file name must exist)"
            )
        return None
    if path.is_file():
        if is_archive_name(path):
            return _checked(Source("archive", path.resolve()), entry)
        raise UserError(f"{path} is not a {title} source: pass --data-dir pointing at {layouts(dataset)}")

    children = [c for c in path.iterdir() if not is_hidden(c.name)]
    if not children:
        return None
    own = _python_format(path, entry.python if entry is not None else None)
    if own is not None:
        return _checked(Source("python", path.resolve(), own), entry)
    wanted = (entry.python,) if entry is not None and entry.python is not None else python_archives()
    for python in wanted:
        if (path / python.folder).is_dir():
            return _checked(Source("python", (path / python.folder).resolve(), python), entry)
    if entry is not None and entry.python is not None and all(_other_python(c, entry.python) for c in children):
        return None  # only other data sets' archives here: this one is downloaded beside them
    if is_tree(path):
        return _checked(Source("folder", path.resolve()), entry)
    # Class folder names that say --data-dir points too deep: the data set's own, or CIFAR-10's.
    named = set(CLASSES if entry is None or entry.info is None else entry.info.classes)
    if any(c.name in named for c in children):
        raise UserError(
            f"{path} holds class folders directly, one level too deep: pass --data-dir pointing "
            f"at its parent {path.resolve().parent}, which must hold train/ and test/"
        )
    trees = [c for c in children if c.is_dir() and is_tree(c)]
    if len(trees) == 1:
        return _checked(Source("folder", trees[0].resolve()), entry)
    if len(trees) > 1:
        names = ", ".join(sorted(t.name for t in trees))
        raise UserError(
            f"{path} holds several image-folder trees ({names}): pass --data-dir pointing at one"
        )
    archives = [c for c in children if c.is_file() and is_archive_name(c)]
    if len(archives) == 1:
        return _checked(Source("archive", archives[0].resolve()), entry)
    if len(archives) > 1:
        names = ", ".join(sorted(a.name for a in archives))
        raise UserError(f"{path} holds several archives ({names}): pass --data-dir pointing at one")
    if path.resolve().name in named and path.resolve().parent.name in SPLITS:
        raise UserError(
            f"{path} is a class folder, two levels too deep: pass --data-dir pointing at "
            f"{path.resolve().parent.parent}, which must hold train/ and test/"
        )
    nested = find_nested_source(path)
    if nested is not None:
        raise UserError(
            f"no {title} data directly in {path}, but {nested} holds some: pass --data-dir {nested}"
        )
    raise UserError(f"no {title} data found in {path}: pass --data-dir pointing at {layouts(dataset)}")


def _python_format(path: Path, prefer: PythonArchive | None = None) -> PythonArchive | None:
    """The python archive format ``path`` itself is, by its name or by the batch files in it
    (``prefer``, the wanted data set's, is tried first: formats may share file names)."""
    formats = python_archives()
    if prefer is not None:
        formats = (prefer, *(python for python in formats if python is not prefer))
    for python in formats:
        if path.name == python.folder:
            return python
    for python in formats:
        # A renamed folder. Where meta is read, it must be there too: CIFAR-100's batches are called
        # train and test, files, where a tree has train/ and test/ folders.
        if any((path / name).is_file() for name in python.files) and (not python.checks_meta or (path / python.meta).is_file()):
            return python
    return None


def _other_python(child: Path, wanted: PythonArchive) -> bool:
    """Whether ``child`` is another data set's python archive folder, or the tarball it came from."""
    return any(child.name in (python.folder, python.tarball) for python in python_archives() if python is not wanted)


def _checked(source: Source, entry: Dataset | None) -> Source:
    """``source``, when ``entry`` (a ``--dataset``; None: any) reads its kind; else one line saying which does."""
    if entry is None:
        return source
    if source.kind == "python":
        assert source.python is not None
        if source.python is entry.python:
            return source
        holder = dataset_of(source.python)
        raise UserError(
            f"{source.path} is {holder.title}'s python archive, which --dataset {entry.name} does not read: "
            f"pass --dataset {holder.name}, or --data-dir pointing at {layouts(entry.name)}"
        )
    if not entry.reads_folders:
        what = "an image-folder tree" if source.kind == "folder" else "an image-folder archive"
        raise UserError(
            f"{source.path} is {what}; --dataset {entry.name} reads {layouts(entry.name)}: pass --dataset imagefolder "
            "to read the tree (classes from its folders)"
        )
    return source


def find_nested_source(path: Path, max_depth: int = 3, max_folders: int = 200) -> Path | None:
    """A folder up to ``max_depth`` levels below ``path`` that holds a source, for a hint.

    One level down is detected and used as is; deeper ones only in this error message, since
    picking one of several nested copies silently could train on the wrong data. Breadth-first
    and capped, so that a big unrelated folder costs a few hundred directory listings at most.
    """
    queue = [(path, 0)]
    visited = 0
    python_folders = {python.folder for python in python_archives()}
    while queue and visited < max_folders:
        folder, depth = queue.pop(0)
        visited += 1
        try:
            children = sorted(c for c in folder.iterdir() if not is_hidden(c.name))
        except OSError:
            continue
        for child in children:
            if child.is_dir() and (is_tree(child) or child.name in python_folders):
                return child if child.name not in python_folders else folder
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


def missing_data_error(path: Path, dataset: str | None = None) -> UserError:
    """No data of ``dataset`` at ``path``: where to point --data-dir, and downloading where it can be."""
    entry = _entry(dataset)
    if entry is not None and not entry.downloadable:  # no torchvision downloader: it must be copied there
        return UserError(f"no {entry.title} data at {path}: pass --data-dir pointing at {layouts(dataset)}")
    return UserError(
        f"no {_title(dataset)} data at {path}: pass --data-dir pointing at {layouts(dataset)}, or enable downloading"
    )


def corrupt_archive_error(path: Path, why: object) -> UserError:
    return UserError(
        f"cannot read archive {path} ({why}): it is corrupted or truncated; copy it again"
    )


BATCH_FIX = "re-extract cifar-10-python.tar.gz there, or delete the folder to download it again"


def batch_fix(python: PythonArchive = CIFAR10_PYTHON) -> str:
    """How to repair a damaged python archive folder of format ``python``."""
    if python.tarball is None:
        return f"copy a complete {python.folder} folder there"
    if python.torchvision is None:
        return f"re-extract {python.tarball} there"
    return f"re-extract {python.tarball} there, or delete the folder to download it again"


def missing_batch_error(path: Path, python: PythonArchive = CIFAR10_PYTHON) -> UserError:
    title = dataset_of(python).title
    return UserError(f"missing {title} batch file {path}: {batch_fix(python)}")


# --- the classes of an image-folder tree -----------------------------------------------------


def shown_names(names: list[str] | tuple[str, ...]) -> str:
    """``names`` joined for a message: the first few, then how many in all."""
    shown = ", ".join(printable(name) for name in names[:_SHOWN_NAMES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN_NAMES else "")


def class_folders(split_dir: Path) -> list[str]:
    """The names of the class folders of one split folder, sorted: its sub-folders (links to folders
    included), hidden ones aside. A UserError for a missing split folder or a broken link, which
    could be a class folder."""
    if not split_dir.is_dir():
        raise UserError(
            f"missing folder {split_dir}: an image-folder tree needs train/<class> and test/<class>"
        )
    children = [c for c in split_dir.iterdir() if not is_hidden(c.name)]
    broken = sorted(c.name for c in children if c.is_symlink() and not c.exists())
    if broken:
        raise UserError(f"{shown_names(broken)} in {split_dir}: broken symbolic link(s); fix or replace them")
    return sorted(c.name for c in children if c.is_dir())


def resolve_classes(train: set[str] | list[str], test: set[str] | list[str], where: str) -> tuple[str, ...]:
    """The class names, in label order, of an image-folder tree whose splits (at ``where``, a folder
    or archive) hold the class folders ``train`` and ``test``.

    Sorted, as torchvision's ``ImageFolder`` orders them, except that exactly CIFAR-10's ten names
    keep CIFAR-10's order, so such a tree has CIFAR-10's labels. A UserError, in one line, for fewer
    than 2 classes or splits whose classes differ (naming the missing and the extra ones).
    """
    train_set, test_set = set(train), set(test)
    if len(train_set) < 2:
        found = f"only {shown_names(sorted(train_set))}" if train_set else "none"
        raise UserError(
            f"{where}: an image-folder tree needs at least 2 class folders in train/, found {found}: "
            "add one folder of images per class"
        )
    if train_set != test_set:
        problems = []
        if missing := sorted(train_set - test_set):
            problems.append(f"test/ lacks {shown_names(missing)}")
        if extra := sorted(test_set - train_set):
            problems.append(f"test/ has {shown_names(extra)}, which train/ lacks")
        raise UserError(
            f"{where}: the splits have different classes ({'; '.join(problems)}): give train/ and test/ the same class folders"
        )
    if train_set == set(CLASSES):
        return CLASSES
    return tuple(sorted(train_set))


def folder_classes(root: Path, dataset: str | None) -> tuple[str, ...]:
    """The class names, in label order, of the tree ``root`` (``root/train``, ``root/test``) read as
    ``--dataset dataset``: a data set with fixed classes (CIFAR-10) has its own, which its loading
    checks split by split; any other has its folders' (:func:`resolve_classes`)."""
    entry = _entry(dataset)
    fixed = CIFAR10 if entry is None else entry.info
    if fixed is not None:
        return fixed.classes
    return resolve_classes(class_folders(root / "train"), class_folders(root / "test"), str(root))
