"""The course's CIFAR-10 networks, selectable by name, and their state-dict helpers.

Which networks there are, and everything about each, is :mod:`models.catalog`. The networks and the
state-dict helpers load torch; they are imported on first use (PEP 562), so that the catalog's names
(``MODEL_NAMES``) can check ``--model`` with the other flags before torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from models.catalog import CATALOG, COURSE_EPOCHS, MODEL_NAMES, ModelEntry, build_model, entry, recognise, register

if TYPE_CHECKING:
    from torch import nn

# Imported on first access: name -> module.
_LAZY = {
    "CFG_VGG16": "models.vgg",
    "VGG": "models.vgg",
    "vgg16": "models.vgg",
    "vgg16_bn": "models.vgg",
    "Bottleneck": "models.resnet",
    "ResNet50Layer4": "models.resnet",
    "resnet50": "models.resnet",
    "infer_architecture": "models.weights",
    "load_weights": "models.weights",
    "normalize_keys": "models.weights",
}

__all__ = [
    "CATALOG",
    "CFG_VGG16",
    "COURSE_EPOCHS",
    "MODEL_NAMES",
    "VGG",
    "Bottleneck",
    "ModelEntry",
    "ResNet50Layer4",
    "build_model",
    "entry",
    "infer_architecture",
    "load_weights",
    "normalize_keys",
    "prepare_backbone",
    "recognise",
    "register",
    "resnet50",
    "vgg16",
    "vgg16_bn",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def prepare_backbone(backbone: nn.Module, *, channels_last: bool, compile: bool) -> nn.Module:
    """``backbone`` in channels_last memory format and/or compiled, in place; returns it.

    ``nn.Module.compile`` compiles the module's forward where it is: unlike ``torch.compile(module)``
    it wraps nothing, so no ``_orig_mod.`` enters the state-dict keys and a checkpoint of a compiled
    run loads into an uncompiled model.
    """
    import torch  # the caller has a model, so torch is loaded already

    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if compile:
        backbone.compile()
    return backbone
