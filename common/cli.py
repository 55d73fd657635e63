"""Command-line pieces shared by train.py and test.py: parser, flags, hardware, error handling."""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from common.errors import UserError
from datamodules.device_batches import DATA_PATHS

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed", "bf16-true")
# What a shell reports for a process ended by SIGTERM (128 + 15); batch schedulers read it as
# "terminated, may be requeued". Also used for --requeue-signal, so wrappers test one code.
PREEMPTED_EXIT_CODE = 143


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or its help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and defaults shown in --help.

    ``error_source`` names where the arguments being parsed came from (a config file), so that
    a bad value in a YAML file is reported against that file.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self.error_source: str | None = None

    def error(self, message: str) -> NoReturn:
        where = f"{self.error_source}: " if self.error_source else ""
        self.exit(2, f"{self.prog}: error: {where}{message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (an EMA decay, a target accuracy)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def batch_limit(text: str) -> int | float:
    """Lightning's limit_*_batches: an int counts batches, a float in (0, 1] is a fraction."""
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a batch count or a fraction, got {text!r}") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {text}")
        return value
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 batch, got {value}")
    return value


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data-dir",
        default="data",
        help="CIFAR-10 as a folder holding cifar-10-batches-py (downloaded there when missing and online), "
        "an image-folder tree (train/<class>/*, test/<class>/*) or a .tar.gz of one",
    )
    group.add_argument("--eval-batch-size", type=positive_int, default=500, help="batch size of validation and test")
    group.add_argument(
        "--data-path",
        choices=DATA_PATHS,
        default="auto",
        help="device: whole batches augmented on the training device (datamodules/device_batches.py); "
        "loader: a DataLoader augmenting image by image on the CPU; auto: device on CUDA and CPU",
    )
    group.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes (--data-path loader)")
    group.add_argument("--cache-dir", default=None, help="where decoded images are cached (default: ~/.cache)")


def add_hardware_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hardware")
    group.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="auto picks a GPU when there is one")
    group.add_argument("--devices", default="auto", help="number of devices, a list such as 0,1, or auto")
    group.add_argument(
        "--precision", default="auto", choices=PRECISIONS, help="auto: bf16-mixed on GPUs that support it, else 32-true"
    )
    group.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format for the model and its batches (default: on with CUDA)",
    )


@dataclass(frozen=True)
class Hardware:
    accelerator: str
    devices: int | list[int] | str
    precision: str


def parse_devices(text: str) -> int | list[int] | str:
    if text == "auto":
        return text
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        value = int(text)
    except ValueError:
        raise UserError(f"--devices {text!r}: expected a count, a list such as 0,1, or auto") from None
    if value < 1 and value != -1:
        raise UserError(f"--devices {text}: must be at least 1 (or -1 for all)")
    return value


def resolve_hardware(accelerator: str, devices: str, precision: str) -> Hardware:
    """Check the request against this machine before any heavy work, and fill in 'auto'."""
    wants_cuda = accelerator in ("gpu", "cuda")
    if wants_cuda and not torch.cuda.is_available():
        raise UserError(
            f"--accelerator {accelerator}: no CUDA GPU is available on this machine; use --accelerator cpu (or auto)"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise UserError("--accelerator mps: Apple's MPS backend is not available here; use --accelerator cpu (or auto)")
    on_cuda = wants_cuda or (accelerator == "auto" and torch.cuda.is_available())
    parsed_devices = parse_devices(devices)
    if on_cuda:
        wanted = parsed_devices if isinstance(parsed_devices, int) else None
        if wanted is not None and wanted > torch.cuda.device_count():
            raise UserError(
                f"--devices {wanted}: only {torch.cuda.device_count()} GPU(s) visible; lower --devices"
            )
    if precision == "auto":
        precision = "bf16-mixed" if on_cuda and torch.cuda.is_bf16_supported() else "32-true"
    return Hardware("gpu" if on_cuda else accelerator, parsed_devices, precision)


def quiet_lightning() -> None:
    """Keep the console to what the user asked for: Lightning's hints are noise in a finished tool."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*GPU available but not used.*",
        ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> NoReturn:
    """Run an entry point; a UserError becomes one line on stderr and exit code 2.

    Lightning turns SIGTERM into ``SIGTERMException``, a SystemExit with code 0; it is mapped to
    :data:`PREEMPTED_EXIT_CODE` instead, so that a scheduler never takes a stopped run for a
    finished one.
    """
    prog = Path(sys.argv[0]).name if argv is None else "cli"
    try:
        code = main(argv)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:
        print(f"{prog}: stopped by a termination signal (exit code {PREEMPTED_EXIT_CODE})", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
