"""The hardware a run uses: accelerator, devices and precision resolved once, and a fast backbone.

:func:`resolve_hardware` turns what the user asked for (``auto`` included) into what Lightning
will really use on this machine, or refuses it in one line before any heavy work, so that a run
records exactly what it ran on. :func:`use_channels_last` and :func:`prepare_backbone` only change
how the backbone computes, never its parameters' names, so checkpoints written with them load
into a plain model (and into the course code) as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from base.errors import UserError
from base.options import ACCELERATORS, DEVICES_HELP, PRECISIONS



@dataclass(frozen=True)
class Hardware:
    """What a run executes on: ``accelerator`` is ``cpu``, ``gpu`` or ``mps`` (never ``auto``),
    ``devices`` a count or a tuple of GPU indices, ``precision`` one of Lightning's names."""

    accelerator: str
    devices: int | tuple[int, ...]
    precision: str
    precision_reason: str = "asked for"

    @property
    def device_count(self) -> int:
        return self.devices if isinstance(self.devices, int) else len(self.devices)


def parse_devices(devices: str | int | list[int] | tuple[int, ...]) -> str | int | tuple[int, ...]:
    """``--devices`` as typed (or as a config holds it): ``auto``, a count, -1, or GPU indices."""
    if isinstance(devices, bool):
        raise UserError(f"--devices {devices!r}: {DEVICES_HELP}")
    if isinstance(devices, int) or isinstance(devices, (list, tuple)):
        value: object = tuple(devices) if isinstance(devices, (list, tuple)) else devices
    else:
        text = str(devices).strip().strip("[]")
        if text == "auto":
            return text
        try:
            value = tuple(int(part) for part in text.split(",") if part.strip()) if "," in text else int(text)
        except ValueError:
            raise UserError(f"--devices {devices!r}: expected {DEVICES_HELP}") from None
    if isinstance(value, int) and value < 1 and value != -1:
        raise UserError(f"--devices {value}: must be at least 1 (or -1 for all)")
    if isinstance(value, tuple):
        if not value or any(index < 0 for index in value) or len(set(value)) != len(value):
            raise UserError(f"--devices {devices!r}: a list names distinct GPU indices from 0, e.g. 0,1")
    return value  # type: ignore[return-value]


def resolve_hardware(accelerator: str, devices: str | int | list[int] | tuple[int, ...], precision: str) -> Hardware:
    """Check the request against this machine and fill in every ``auto``; a UserError otherwise.

    Lightning would otherwise decide some of these late and silently: ``16-mixed`` on the CPU
    runs bf16, ``--devices 0,1`` on the CPU fails with a TypeError deep in its connector.
    """
    if accelerator not in ACCELERATORS:
        raise UserError(f"--accelerator {accelerator!r}: choose one of {', '.join(ACCELERATORS)}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    cuda = torch.cuda.is_available()
    if accelerator in ("gpu", "cuda") and not cuda:
        raise UserError(
            f"--accelerator {accelerator}: no CUDA GPU is available on this machine; use --accelerator cpu (or auto)"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise UserError("--accelerator mps: Apple's MPS backend is not available here; use --accelerator cpu (or auto)")
    if accelerator == "auto":
        accelerator = "gpu" if cuda else ("mps" if torch.backends.mps.is_available() else "cpu")
    accelerator = "gpu" if accelerator == "cuda" else accelerator
    resolved, reason = _resolve_precision(accelerator, precision)
    return Hardware(accelerator, _resolve_devices(accelerator, parse_devices(devices)), resolved, reason)


def _resolve_devices(accelerator: str, devices: str | int | tuple[int, ...]) -> int | tuple[int, ...]:
    if accelerator != "gpu":
        if isinstance(devices, tuple):
            listed = ",".join(map(str, devices))
            raise UserError(
                f"--devices {listed}: a list names GPU indices, and this run is on the {accelerator.upper()}; "
                "give a number of processes instead (e.g. --devices 1)"
            )
        # One CPU (or MPS) device is the whole machine: auto and -1 ("all") both mean one process.
        return 1 if devices in ("auto", -1) else int(devices)
    visible = torch.cuda.device_count()
    if devices in ("auto", -1):
        return visible
    if isinstance(devices, tuple):
        missing = [index for index in devices if index >= visible]
        if missing:
            raise UserError(
                f"--devices {','.join(map(str, devices))}: GPU index {missing[0]} does not exist "
                f"({visible} GPU(s) visible: 0 to {visible - 1})"
            )
        return devices
    if devices > visible:
        raise UserError(f"--devices {devices}: only {visible} GPU(s) visible; lower --devices")
    return int(devices)


def cpu_has_native_bf16() -> str | None:
    """The CPU's bfloat16 instructions as PyTorch reports them (``AMX``, ``AVX512-BF16``), or None.

    Without them PyTorch emulates bf16 matrix products, slower than fp32.
    """
    ask = lambda name: bool(getattr(torch.cpu, name, lambda: False)())  # noqa: E731 - private API, may vanish
    if ask("_is_amx_tile_supported"):
        return "AMX"
    if ask("_is_avx512_bf16_supported"):
        return "AVX512-BF16"
    return None


def _resolve_precision(accelerator: str, precision: str) -> tuple[str, str]:
    """(precision, why): what ``auto`` means here, and refusals of what cannot run here."""
    bf16_gpu = accelerator == "gpu" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        if bf16_gpu:
            return "bf16-mixed", "auto: the GPU supports bfloat16"
        native = cpu_has_native_bf16() if accelerator == "cpu" else None
        if native:
            return "bf16-mixed", f"auto: the CPU has native bfloat16 ({native})"
        where = "the CPU has no native bfloat16" if accelerator == "cpu" else f"auto on {accelerator}"
        return "32-true", f"auto: {where}"
    if precision == "16-mixed" and accelerator == "cpu":
        raise UserError(
            "--precision 16-mixed: float16 autocast needs a GPU (on the CPU Lightning would silently run bf16); "
            "use --precision bf16-mixed or 32-true"
        )
    if precision.startswith("bf16") and accelerator == "gpu" and not bf16_gpu:
        raise UserError(f"--precision {precision}: this GPU has no bfloat16 support; use --precision 16-mixed or 32-true")
    return precision, "asked for"


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
