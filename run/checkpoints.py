"""Reading checkpoints safely: ours (Lightning) or a course state dict, never arbitrary pickles."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from base.datasets import CIFAR10, DatasetInfo
from base.errors import UserError
from base.schema import NETWORK_OPTIONS, hparams_of
from models.catalog import build_model, chosen_options, recognise
from models.weights import load_weights, normalize_keys
from run.paths import check_checkpoint_file

# Attribute name of the backbone inside ImageClassifier, hence the key prefix in its state dict.
BACKBONE_PREFIX = "backbone."
# Where the PyTorch tutorials' training loops put the model's state dict in the dict they torch.save
# (beside "epoch", "optimizer_state_dict", "loss"...), in the order they are looked for.
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
# Keys that only a Lightning checkpoint has: its "state_dict" holds the LightningModule, not a course model.
_LIGHTNING_KEYS = ("hyper_parameters", "pytorch-lightning_version")
# How many of a dict's keys an error message shows, and how long a quoted reason may get.
_SHOWN_KEYS = 5
_REASON_CHARS = 120


@dataclass
class CheckpointContents:
    """What a checkpoint file holds, enough to rebuild and load the backbone."""

    path: Path
    kind: str  # "lightning" (written by train.py) or "state_dict" (course torch.save of a model)
    model_name: str
    num_classes: int
    model_options: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    hparams: dict[str, Any] = field(default_factory=dict)
    # Training progress when it was saved (ours only): Lightning's 0-based epoch and optimiser steps.
    epoch: int | None = None
    global_step: int | None = None

    def describe(self) -> str:
        origin = "checkpoint of this project" if self.kind == "lightning" else "course state dict"
        return f"{self.model_name} ({self.num_classes} classes), {origin}"


def _short_reason(exc: BaseException) -> str:
    """``exc``'s message for a one-line error: its first line, and of a long one the first sentence,
    or the words that fit in ``_REASON_CHARS`` (torch adds paragraphs of advice after the reason)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if len(text) <= _REASON_CHARS:
        return text
    first_sentence_end = text.find(". ")
    if 0 < first_sentence_end < _REASON_CHARS:
        return text[: first_sentence_end + 1]
    head = text[: _REASON_CHARS + 1]
    return head[: head.rfind(" ")].rstrip(" ,;:") + "..." if " " in head else head[:_REASON_CHARS] + "..."


def _unreadable(path: Path, exc: BaseException) -> UserError:
    return UserError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupted?): {_short_reason(exc)}")


def read_checkpoint_file(path: str | Path, peek: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``, turning every failure into one clear line.

    ``peek``: memory-map the tensors instead of reading them (files in torch.save's zip format),
    for callers that only look at the keys and counters; the data is read when first touched."""
    path = check_checkpoint_file(path)
    with path.open("rb") as file:
        zipped = file.read(4) == b"PK\x03\x04"  # mmap needs the zip format (PyTorch >= 1.6)
    try:
        with warnings.catch_warnings():
            # torch warns before refusing a TorchScript archive; the error below says it in one line.
            warnings.filterwarnings("ignore", message=r".*looks like a TorchScript archive")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=peek and zipped)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "GLOBAL" not in str(exc):
            raise _unreadable(path, exc) from None
        offending = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"the pickled global {offending.group(1)}" if offending else "pickled Python objects"
        raise UserError(
            f"refusing to load {path}: it contains {what}, which could run code; "
            "only plain weights are accepted (re-save it with torch.save(model.state_dict()) if you trust it)"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, KeyError, EOFError... for damaged files
        if "TorchScript" in str(exc):  # torch recognises the archive and refuses it under weights_only
            raise UserError(
                f"{path} is a TorchScript file (as export.py writes), not a checkpoint; "
                "pass the .ckpt it was exported from"
            ) from None
        raise _unreadable(path, exc) from None


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state_dict.items()}


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in obj.items()
    )


def _course_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The model state dict that ``obj`` is, or that a tutorial-style training dict holds
    (``{"epoch": 3, "model_state_dict": ..., "optimizer_state_dict": ...}``); None otherwise,
    a Lightning checkpoint included (its "state_dict" is the LightningModule's, read above)."""
    if is_state_dict(obj):
        return obj
    if not isinstance(obj, dict) or any(key in obj for key in _LIGHTNING_KEYS):
        return None
    return next((obj[key] for key in WRAPPER_KEYS if is_state_dict(obj.get(key))), None)


def _not_a_checkpoint(path: Path, obj: Any) -> UserError:
    """The one-line refusal of a file that holds no layout we read, naming what it does hold."""
    if isinstance(obj, dict) and any(key in obj for key in _LIGHTNING_KEYS):
        return UserError(
            f"{path} is a Lightning checkpoint of another program (its hyper_parameters name no model_name), "
            "not of train.py; pass a .ckpt written by train.py, or that network's torch.save(model.state_dict())"
        )
    if isinstance(obj, dict) and obj:
        keys = [repr(key) if not isinstance(key, str) else key for key in list(obj)[: _SHOWN_KEYS]]
        found = f"a dict with keys {', '.join(keys)}" + (", ..." if len(obj) > _SHOWN_KEYS else "")
    else:
        found = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    return UserError(
        f"{path} holds {found}, not a model's weights; pass a .ckpt written by train.py, a state dict "
        "(torch.save(model.state_dict())), or a dict holding one under " + ", ".join(f'"{key}"' for key in WRAPPER_KEYS)
    )


def check_expected_model(contents: CheckpointContents, expected_model: str | None) -> None:
    """Refuse ``contents`` when ``expected_model`` (a ``--model`` flag) names another network."""
    if expected_model is not None and expected_model != contents.model_name:
        raise UserError(
            f"{contents.path} holds a {contents.model_name} network, not {expected_model}; "
            f"use --model {contents.model_name} or another checkpoint"
        )


def _require_data(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    # Tensors saved from the meta device (a model built with device="meta", never materialised)
    # load as shapes without values: they would pass every key and shape check.
    hollow = [key for key, value in state_dict.items() if value.device.type == "meta"]
    if hollow:
        raise UserError(
            f"{path} holds {len(hollow)} tensor(s) without values (saved from the meta device, e.g. {hollow[0]}); "
            "save the weights of a materialised model"
        )


def load_checkpoint(path: str | Path, expected_model: str | None = None, peek: bool = False) -> CheckpointContents:
    """Read one of our checkpoints or a course state dict and say which network it holds.

    ``expected_model``, when given, must match the checkpoint's architecture; ``peek`` as for
    :func:`read_checkpoint_file`.
    """
    path = Path(path)
    obj = read_checkpoint_file(path, peek=peek)
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if isinstance(hparams, dict) and ("network" in hparams or "model_name" in hparams) and is_state_dict(obj.get("state_dict")):
        # A module wrapped by DDP ("module.") or torch.compile ("_orig_mod.") before Lightning saw
        # it puts those prefixes in front of "backbone."; ones inside it load_weights removes.
        state_dict = normalize_keys(obj["state_dict"])
        backbone_keys = {k: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}
        contents = CheckpointContents(
            path=path,
            kind="lightning",
            state_dict=_strip_prefix(backbone_keys, BACKBONE_PREFIX),
            **_described_by(hparams),
            epoch=int(obj["epoch"]) if "epoch" in obj else None,
            global_step=int(obj["global_step"]) if "global_step" in obj else None,
        )
    elif (course := _course_state_dict(obj)) is not None:
        # Of a training loop's dict only the weights are used: a run started from them gets a fresh optimiser.
        model_name, options = recognise(course, source=str(path))
        num_classes = options.pop("num_classes")
        contents = CheckpointContents(path, "state_dict", model_name, num_classes, options, course)
    else:
        raise _not_a_checkpoint(path, obj)
    _require_data(contents.state_dict, path)
    check_expected_model(contents, expected_model)
    return contents


def _described_by(saved: dict[str, Any]) -> dict[str, Any]:
    """The network and hyper-parameters of an ``ImageClassifier`` checkpoint's ``hyper_parameters``,
    grouped (``base.schema``) or flat as written before the groups: ``hparams`` is the options
    flat (``tta``, ``lr``, ...) with ``class_names`` and, where saved, ``dataset``."""
    groups = hparams_of(saved)
    network = {key: value for key, value in groups["network"].items() if key not in NETWORK_OPTIONS}
    model_name = network.pop("model")
    options = chosen_options(groups["network"])
    dataset, class_names = groups["dataset"], groups["class_names"]
    num_classes = len(class_names) if class_names else int(saved.get("num_classes", 10))
    flat = {**network, **groups["optim"], "class_names": class_names, "dataset": dataset}
    return {"model_name": model_name, "num_classes": num_classes, "model_options": options,
            "hparams": {key: value for key, value in flat.items() if value is not None}}


def build_backbone(contents: CheckpointContents, num_classes: int | None = None) -> nn.Module:
    """The backbone of ``contents`` with its weights loaded (strictly, legacy ``layer5`` aside)."""
    model = build_model(contents.model_name, contents.num_classes, **contents.model_options)
    load_backbone_weights(model, contents, num_classes)
    return model


def load_backbone_weights(model: nn.Module, contents: CheckpointContents, num_classes: int | None = None) -> None:
    """The weights of ``contents`` into ``model``: the file's network, or one built with a run's own
    options (those that show in the weights are the file's: ``run.config.settle``)."""
    if num_classes is not None and num_classes != contents.num_classes:
        raise UserError(
            f"{contents.path} has a {contents.num_classes}-class output layer, the data has {num_classes} classes"
        )
    load_weights(model, contents.state_dict, source=str(contents.path))


def read_safetensors(path: str | Path) -> CheckpointContents:
    """A safetensors state dict: ours (with metadata) or any other of the course architectures.

    Without our metadata the network is recognised from the key names, as for a course state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}" if not path.exists() else f"{path} is not a file")
    if importlib.util.find_spec("safetensors") is None:
        raise UserError(f"{path}: reading .safetensors needs the package safetensors: pip install safetensors")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is not a readable safetensors file (truncated or corrupted?): {exc}") from None
    if "model_name" not in metadata:
        model_name, options = recognise(state_dict, source=str(path))
        return CheckpointContents(path, "safetensors", model_name, options.pop("num_classes"), options, state_dict)
    try:
        hparams = {"class_names": json.loads(metadata["class_names"])} if "class_names" in metadata else {}
        if "tta" in metadata:  # what the exported checkpoint's run validated and tested with
            hparams["tta"] = metadata["tta"]
        if "dataset" in metadata:  # the data set it was trained on (export.py writes DatasetInfo.to_dict)
            hparams["dataset"] = json.loads(metadata["dataset"])
        return CheckpointContents(
            path=path,
            kind="safetensors",
            model_name=metadata["model_name"],
            num_classes=int(metadata.get("num_classes", 10)),
            model_options=dict(json.loads(metadata.get("model_options", "{}"))),
            state_dict=state_dict,
            hparams=hparams,
        )
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} has damaged metadata ({exc}); re-export it with export.py") from None


def records_dataset(contents: CheckpointContents) -> bool:
    """Whether ``contents`` records the data set it was trained on (checkpoints and exports of runs
    since the data sets seam); older runs and course state dicts record at most class names."""
    return isinstance(contents.hparams.get("dataset"), Mapping)


def checkpoint_dataset(contents: CheckpointContents) -> DatasetInfo:
    """The data set ``contents`` was trained on: its class names in label order and the statistics
    its inputs are normalised with.

    What the checkpoint records (``hparams["dataset"]``, ``DatasetInfo.to_dict``); for one that
    records none (an older run, a course state dict, a foreign safetensors file) CIFAR-10's
    statistics, with the class names it saved (``class_names``), else CIFAR-10's for 10 classes,
    else ``class 0``, ``class 1``, ... A UserError, in one line, for a damaged record or one whose
    class count is not the network's.
    """
    saved = contents.hparams.get("dataset")
    if saved is not None:
        try:
            info = DatasetInfo.from_dict(saved)
        except ValueError as exc:
            raise UserError(f"{contents.path} records a damaged data set ({exc}); it cannot be used as saved") from None
        if info.num_classes != contents.num_classes:
            raise UserError(
                f"{contents.path} records a data set of {info.num_classes} classes for a {contents.num_classes}-class "
                "network; it is damaged"
            )
        return info
    names = contents.hparams.get("class_names")
    if isinstance(names, (list, tuple)) and len(names) == contents.num_classes and len(set(map(str, names))) == len(names):
        classes = tuple(str(name) for name in names)
    elif contents.num_classes == CIFAR10.num_classes:
        classes = CIFAR10.classes
    else:
        classes = tuple(f"class {i}" for i in range(contents.num_classes))
    return dataclasses.replace(CIFAR10, classes=classes)


def load_any_checkpoint(path: str | Path, expected_model: str | None = None, peek: bool = False) -> CheckpointContents:
    """``load_checkpoint``, plus ``.safetensors`` files such as export.py writes.

    ``expected_model``, when given, must match the file's architecture, whatever its format;
    ``peek`` as for ``load_checkpoint`` (safetensors files are read lazily anyway)."""
    if Path(path).suffix.lower() == ".safetensors":
        contents = read_safetensors(path)
        check_expected_model(contents, expected_model)
        return contents
    return load_checkpoint(path, expected_model=expected_model, peek=peek)
