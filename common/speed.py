"""A fast training step: memory format and compilation of the backbone.

Both only change how the backbone computes, never its parameters' names, so checkpoints written
with them load into a plain model (and into the course code) as before.
"""
from __future__ import annotations

import torch
from torch import nn

from common.cli import Hardware


def use_channels_last(requested: bool | None, hardware: Hardware) -> bool:
    """What ``--channels-last`` means on ``hardware`` (as resolved by ``resolve_hardware``).

    Unset, it is on for CUDA GPUs, whose tensor-core convolutions (bf16 and fp16 in cuDNN) run in
    NHWC: with NCHW tensors every convolution pays for layout transposes. On the CPU it is on
    only with a bf16 precision, where oneDNN's bf16 convolutions are faster in NHWC (resnet50,
    batch 100, 2 cores: 284 -> 341 images/s); in fp32 it gains nothing there.
    """
    if requested is not None:
        return requested
    return hardware.accelerator == "gpu" or (hardware.accelerator == "cpu" and hardware.precision.startswith("bf16"))


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
