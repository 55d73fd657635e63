"""The files and folders a command is given, checked before torch loads.

Nothing here imports torch, Lightning or the data: each command runs these checks first, so a
mistyped path is refused in a fraction of a second instead of after seconds of imports.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from base.errors import UserError
from base.options import IMAGE_SUFFIXES
from datamodules.layout import list_files


# torch.save writes a zip archive since PyTorch 1.6 and a bare pickle (protocol 2+: 0x80) before.
_TORCH_SAVE_HEADS = (b"PK\x03\x04", b"\x80")


def check_checkpoint_file(path: str | os.PathLike[str], safetensors: bool = False) -> Path:
    """``path`` as a Path if it can be a checkpoint: an existing, non-empty file that torch.save
    wrote (or, with ``safetensors``, a ``.safetensors`` file); a one-line UserError otherwise.

    Only the first bytes are read; whether the contents are usable is for the loader to say.
    """
    path = Path(path)
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


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent folder."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: Path, flag: str) -> None:
    """Refuse ``folder`` (given as ``flag``) when it cannot be created or written in."""
    existing = existing_ancestor(folder)
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: no permission to write in {existing}; choose another path")


def check_output_file(path: Path, flag: str) -> None:
    """Refuse an output file path that is a folder or lies where nothing can be written."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a file, e.g. {path / 'results.json'}")
    check_writable(path.parent, flag)
