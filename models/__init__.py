"""The course's CIFAR-10 networks, selectable by name, and their state-dict helpers."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from base.errors import UserError
from base.options import MODEL_NAMES
from models.resnet import Bottleneck, ResNet50Layer4, resnet50
from models.vgg import CFG_VGG16, VGG, vgg16, vgg16_bn
from models.weights import infer_architecture, load_weights, normalize_keys


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "vgg16": vgg16,
    "vgg16_bn": vgg16_bn,
    "resnet50": resnet50,
}


def build_model(name: str, num_classes: int = 10, **options: Any) -> nn.Module:
    """Build a model by name; ``options`` are further factory keywords (``identity_shortcut``).

    Names, class counts and options usually come from a config file or command line, so bad
    values raise UserError instead of a TypeError deep inside a constructor.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise UserError(f"unknown model '{name}': choose one of {', '.join(MODEL_NAMES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
    accepted = set(inspect.signature(factory).parameters) - {"num_classes"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        offered = ", ".join(sorted(accepted)) or "none"
        raise UserError(
            f"model '{name}' has no option {', '.join(unknown)} (its options: {offered})"
        )
    return factory(num_classes=num_classes, **options)


__all__ = [
    "CFG_VGG16",
    "MODEL_NAMES",
    "VGG",
    "Bottleneck",
    "ResNet50Layer4",
    "build_model",
    "infer_architecture",
    "load_weights",
    "normalize_keys",
    "resnet50",
    "vgg16",
    "vgg16_bn",
]


def prepare_backbone(backbone: nn.Module, *, channels_last: bool, compile: bool) -> nn.Module:
    """``backbone`` in channels_last memory format and/or compiled, in place; returns it.

    ``nn.Module.compile`` compiles the module's forward where it is: unlike ``torch.compile(module)``
    it wraps nothing, so no ``_orig_mod.`` enters the state-dict keys and a checkpoint of a compiled
    run loads into an uncompiled model.
    """
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if compile:
        backbone.compile()
    return backbone
