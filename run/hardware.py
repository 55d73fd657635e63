"""The hardware a run uses: accelerator, devices and precision resolved once.

:func:`resolve_hardware` turns what the user asked for (``auto`` included) into what Lightning
will really use on this machine, or refuses it in one line before any heavy work, so that a run
records exactly what it ran on. The machine's facts come from PyTorch (:meth:`Machine.probe`);
:func:`check_hardware_request` refuses what cannot run here without loading torch where the
answer is already certain, so that such a flag error takes a fraction of a second.
:func:`use_channels_last` only changes how the backbone computes, never its parameters' names.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from base.errors import UserError
from base.schema import ACCELERATORS, DEVICES_HELP, PRECISIONS

# Device nodes without which no GPU backend of PyTorch can run on Linux: NVIDIA's driver
# (/dev/nvidiactl), WSL2's GPU paravirtualisation (/dev/dxg), AMD ROCm (/dev/kfd), Jetson (nvhost).
_GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/dxg", "/dev/kfd", "/dev/nvhost-ctrl-gpu")


@dataclass(frozen=True)
class Machine:
    """What this machine offers to a run, as PyTorch reports it.

    ``cuda_devices``: visible CUDA (or ROCm) GPUs; ``cuda_bf16``: they run bfloat16 natively
    (Ampere and later); ``cuda_bf16_emulated``: they only emulate it (T4, V100: slower than fp32);
    ``cpu_bf16``: the CPU's native bfloat16 instructions (``AMX``, ``AVX512-BF16``) or None.
    """

    cuda_devices: int = 0
    cuda_bf16: bool = False
    cuda_bf16_emulated: bool = False
    mps: bool = False
    cpu_bf16: str | None = None

    @classmethod
    def probe(cls) -> Machine:
        """Ask PyTorch (which loads it: about 1.5 s)."""
        import torch

        cuda = torch.cuda.is_available()
        native = cuda and cuda_bf16_native()
        return cls(
            cuda_devices=torch.cuda.device_count() if cuda else 0,
            cuda_bf16=native,
            cuda_bf16_emulated=cuda and not native and torch.cuda.is_bf16_supported(),
            mps=torch.backends.mps.is_available(),
            cpu_bf16=cpu_has_native_bf16(),
        )


def cuda_bf16_native() -> bool:
    """Whether the current CUDA GPU runs bfloat16 natively. ``torch.cuda.is_bf16_supported()`` also
    says yes for GPUs that emulate it (T4, V100), where bf16 is slower than fp32; torch before 2.3
    had no ``including_emulation``, and its answer there was native support already."""
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:
        return bool(torch.cuda.is_bf16_supported())


def certainly_without_gpu() -> bool:
    """True when this machine cannot have a GPU that PyTorch could use, known without loading torch.

    Only on Linux, where every GPU backend needs its device nodes; elsewhere (macOS has MPS)
    the answer is left to :meth:`Machine.probe`.
    """
    return sys.platform.startswith("linux") and not any(glob.glob(pattern) for pattern in _GPU_DEVICE_NODES)


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


def resolve_hardware(
    accelerator: str, devices: str | int | list[int] | tuple[int, ...], precision: str, machine: Machine | None = None
) -> Hardware:
    """Check the request against ``machine`` (default: this one, probed) and fill in every ``auto``.

    Raises a one-line UserError for what cannot run there. Lightning would otherwise decide some
    of these late and silently: ``16-mixed`` on the CPU runs bf16, ``--devices 0,1`` on the CPU
    fails with a TypeError deep in its connector.
    """
    if accelerator not in ACCELERATORS:
        raise UserError(f"--accelerator {accelerator!r}: choose one of {', '.join(ACCELERATORS)}")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    devices = parse_devices(devices)
    if machine is None:
        machine = Machine.probe()
    cuda = machine.cuda_devices > 0
    if accelerator in ("gpu", "cuda") and not cuda:
        raise UserError(
            f"--accelerator {accelerator}: no CUDA GPU is available on this machine; use --accelerator cpu (or auto)"
        )
    if accelerator == "mps" and not machine.mps:
        raise UserError("--accelerator mps: Apple's MPS backend is not available here; use --accelerator cpu (or auto)")
    if accelerator == "auto":
        accelerator = "gpu" if cuda else ("mps" if machine.mps else "cpu")
    accelerator = "gpu" if accelerator == "cuda" else accelerator
    resolved, reason = _resolve_precision(accelerator, precision, machine)
    return Hardware(accelerator, _resolve_devices(accelerator, devices, machine), resolved, reason)


def check_hardware_request(accelerator: str, devices: str | int | list[int] | tuple[int, ...], precision: str) -> None:
    """Refuse, without loading torch, what :func:`resolve_hardware` would certainly refuse.

    Certain when the run is on the CPU (asked for, or no GPU can exist here); a GPU's count and
    abilities are left to :func:`resolve_hardware`.
    """
    if accelerator == "cpu" or certainly_without_gpu():
        # The CPU's bf16 instructions only choose what ``auto`` means, never refuse: unknown here.
        resolve_hardware(accelerator, devices, precision, Machine())


def _resolve_devices(accelerator: str, devices: str | int | tuple[int, ...], machine: Machine) -> int | tuple[int, ...]:
    if accelerator != "gpu":
        if isinstance(devices, tuple):
            listed = ",".join(map(str, devices))
            raise UserError(
                f"--devices {listed}: a list names GPU indices, and this run is on the {accelerator.upper()}; "
                "give a number of processes instead (e.g. --devices 1)"
            )
        # One CPU (or MPS) device is the whole machine: auto and -1 ("all") both mean one process.
        return 1 if devices in ("auto", -1) else int(devices)
    visible = machine.cuda_devices
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
    import torch

    ask = lambda name: bool(getattr(torch.cpu, name, lambda: False)())  # noqa: E731 - private API, may vanish
    if ask("_is_amx_tile_supported"):
        return "AMX"
    if ask("_is_avx512_bf16_supported"):
        return "AVX512-BF16"
    return None


def _resolve_precision(accelerator: str, precision: str, machine: Machine) -> tuple[str, str]:
    """(precision, why): what ``auto`` means on ``machine``, and refusals of what cannot run there."""
    bf16_gpu = accelerator == "gpu" and machine.cuda_bf16
    if precision == "auto":
        if bf16_gpu:
            return "bf16-mixed", "auto: the GPU supports bfloat16"
        native = machine.cpu_bf16 if accelerator == "cpu" else None
        if native:
            return "bf16-mixed", f"auto: the CPU has native bfloat16 ({native})"
        if accelerator == "cpu":
            where = "the CPU has no native bfloat16"
        elif accelerator == "gpu" and machine.cuda_bf16_emulated:
            where = "the GPU only emulates bfloat16"
        else:
            where = f"auto on {accelerator}"
        return "32-true", f"auto: {where}"
    if precision == "16-mixed" and accelerator == "cpu":
        raise UserError(
            "--precision 16-mixed: float16 autocast needs a GPU (on the CPU Lightning would silently run bf16); "
            "use --precision bf16-mixed or 32-true"
        )
    if precision.startswith("bf16") and accelerator == "gpu" and not (bf16_gpu or machine.cuda_bf16_emulated):
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


# Where PyTorch's DataLoader workers hand their batches over (shared memory, a tmpfs on Linux).
SHARED_MEMORY = Path("/dev/shm")
# Batches each worker process keeps ready (torch's DataLoader default prefetch_factor).
_PREFETCHED = 2
# Torch's words for a worker that found shared memory full (an allocation failed, or the bus error
# of a page it could not back), as its RuntimeErrors and the worker's own report put them.
_SHM_WORDS = ("shared memory", "(shm)", "/torch_", "bus error")


def _shared_memory() -> tuple[int, int] | None:
    """(size, free bytes) of /dev/shm, or None where there is none (macOS, Windows)."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except (OSError, AttributeError):
        return None
    return stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize


def _shm_advice(workers: int) -> str:
    return (f"run with --workers 0 (or --data-path device), or give the machine more shared memory "
            f"(Docker: docker run --shm-size=2g; now {_describe_shared_memory()})")


def _describe_shared_memory() -> str:
    found = _shared_memory()
    if found is None:
        return "no /dev/shm"
    size, free = found
    return f"/dev/shm {size / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB free"


def check_shared_memory(workers: int, batch_bytes: int) -> None:
    """Refuse, before any work, loader workers that /dev/shm cannot take the batches of.

    ``batch_bytes``: the largest batch the workers hand over (training or evaluation), in bytes.
    Each of the ``workers`` processes keeps ``_PREFETCHED`` batches in shared memory; with less
    free than twice that (what else a step holds there), the first batch would fail in a worker
    with a traceback (Docker gives containers 64 MiB). Raises UserError naming the sizes and the fix.
    """
    found = _shared_memory()
    if workers == 0 or found is None:
        return
    needed = 2 * workers * _PREFETCHED * batch_bytes
    if found[1] < needed:
        raise UserError(
            f"--workers {workers}: the loader's worker processes need about {needed / 2**20:,.0f} MiB of shared "
            f"memory for their batches; {_shm_advice(workers)}"
        )


def shared_memory_error(exc: BaseException, workers: int) -> UserError | None:
    """The one-line error for ``exc`` when it is a DataLoader worker's failure for want of shared
    memory (a ``RuntimeError`` of torch, however deep in the causes), else None."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).lower()
        if isinstance(seen, RuntimeError) and any(word in text for word in _SHM_WORDS):
            return UserError(f"a DataLoader worker ran out of shared memory (--workers {workers}); {_shm_advice(workers)}")
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def worker_failures_explained(workers: int) -> Iterator[None]:
    """Within the block, a DataLoader worker's failure for want of shared memory is one UserError
    (:func:`shared_memory_error`) instead of torch's traceback; anything else passes unchanged."""
    try:
        yield
    except Exception as exc:
        error = shared_memory_error(exc, workers) if workers else None
        if error is None:
            raise
        raise error from None


def check_compiler(accelerator: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse ``--compile`` where the compiler its code generator calls is missing, before any work.

    TorchInductor writes C++ for the CPU, built with ``$CXX`` (default ``g++``, ``clang++`` on
    macOS), and Triton kernels for CUDA GPUs, whose launchers it builds with ``$CC`` (else ``gcc``
    or ``clang``). Without one the first training step fails after the data is read, with a long
    ``InvalidCxxCompiler`` (or Triton "Failed to find C compiler") traceback. Other accelerators
    (MPS) are not checked. Raises UserError naming the compiler looked for and what to do.
    """
    environ = os.environ if environ is None else environ
    if accelerator == "cpu":
        variable, wanted = "CXX", [environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")]
        what = "a C++ compiler"
    elif accelerator == "gpu":
        variable, wanted = "CC", [environ["CC"]] if environ.get("CC") else ["gcc", "clang"]
        what = "a C compiler (for Triton's kernels)"
    else:
        return
    found = [name for name in wanted if name.split() and shutil.which(name.split()[0], path=environ.get("PATH"))]
    if not found:
        raise UserError(
            f"--compile needs {what} and none was found ({' or '.join(wanted)} on PATH, ${variable} to name another); "
            "install one (Debian/Ubuntu: apt install g++), or run without --compile"
        )
