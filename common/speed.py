"""A fast training step: memory format and compilation of the backbone.

Both only change how the backbone computes, never its parameters' names, so checkpoints written
with them load into a plain model (and into the course code) as before.
"""
from __future__ import annotations

import torch
from torch import nn


def use_channels_last(requested: bool | None, accelerator: str) -> bool:
    """What ``--channels-last`` means on ``accelerator`` (as resolved by ``resolve_hardware``).

    Unset, it is on for CUDA GPUs, whose tensor-core convolutions (bf16 and fp16 in cuDNN) run in
    NHWC: with NCHW tensors every convolution pays for layout transposes. The CPU keeps NCHW.
    """
    return accelerator == "gpu" if requested is None else requested


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
