"""Command-line pieces shared by every entry point: the parser, flag types, shared flags, error handling.

Flags have no defaults of their own: a flag not typed is absent from the parsed namespace, and
``--help`` shows the default that ``run.config.RunConfig`` holds, the one place it is defined.
Only this layer sees an argparse namespace; it hands plain dicts of typed values to ``run``.
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from base.errors import Interrupted, UserError
from base.options import ACCELERATORS, DATA_PATHS, DATASETS, LOGGERS, DEVICES_HELP, PRECISION_HELP, PRECISIONS
from run.config import DEFAULTS

# What a shell reports for a process ended by SIGTERM (128 + 15); batch schedulers read it as
# "terminated, may be requeued". Also used for --requeue-signal, so wrappers test one code.
PREEMPTED_EXIT_CODE = 143


class _DefaultsFormatter(argparse.HelpFormatter):
    """Shows a flag's default from ``RunConfig`` unless it is None or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # A flag of one entry point only (predict.py's --top-k) keeps its own default.
        default = DEFAULTS.get(action.dest) if action.default is argparse.SUPPRESS else action.default
        if default in (None, False) or "default" in text or not action.option_strings:
            return text
        shown = f"{default:g}" if isinstance(default, float) else default
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and defaults shown in --help.

    ``error_source`` names where the arguments being parsed came from (a config file), so that
    a bad value in a YAML file is reported against that file.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self.error_source: str | None = None
        # Set with error_source: the line of the file each flag's value came from.
        self.error_lines: dict[str, int] = {}
        self._parsing: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        # Kept for error(): argparse reports a missing required flag before an unknown one, which
        # is usually the same flag mistyped (export.py --frmat onnx).
        self._parsing = [str(arg) for arg in (sys.argv[1:] if args is None else args)]
        return super().parse_known_args(args, namespace)

    def _unknown_flags(self) -> list[str]:
        """The flag-like words of the arguments being parsed that name no flag, nor abbreviate one."""
        unknown = []
        for arg in self._parsing:
            if arg == "--":
                break
            name = arg.split("=", 1)[0]
            if not arg.startswith("-") or name in self._option_string_actions or self._negative_number_matcher.match(arg):
                continue
            if not any(option.startswith(name) for option in self._option_string_actions if name.startswith("--")):
                unknown.append(arg)
        return unknown

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required") and self._unknown_flags():
            message = "unrecognized arguments: " + " ".join(self._unknown_flags())
        where = f"{self.error_source}: " if self.error_source else ""
        flag = _ARGUMENT.match(message)
        if flag and self.error_source:
            line = next((self.error_lines[name] for name in flag.group(1).split("/") if name in self.error_lines), None)
            where += f"line {line}: " if line else ""
        self.exit(2, f"{self.prog}: error: {where}{message}{self._suggestion(message)} (see --help)\n")

    def _suggestion(self, message: str) -> str:
        """" (did you mean --epochs?)" for a mistyped flag or choice, else ""."""
        unknown = _UNRECOGNISED.match(message)
        if unknown:
            options = [name for name in self._option_string_actions if name.startswith("--")]
            hints = [
                (given, hint)
                for given in unknown.group(1).split()
                if given.startswith("-") and (hint := closest(given.split("=", 1)[0], options))
            ]
            if len(hints) == 1:
                return f" (did you mean {hints[0][1]}?)"
            if hints:
                return " (did you mean " + ", ".join(f"{hint} for {given.split('=', 1)[0]}" for given, hint in hints) + "?)"
            return ""
        choice = _INVALID_CHOICE.search(message)
        if choice:
            choices = re.findall(r"'([^']*)'", choice.group(2))
            hint = closest(choice.group(1), choices, dashes=False)
            return f" (did you mean {hint}?)" if hint else ""
        return ""


# The messages of argparse (Python 3.10 to 3.13) that a suggestion is added to.
_ARGUMENT = re.compile(r"argument (\S+?): ")
_UNRECOGNISED = re.compile(r"unrecognized arguments: (.*)$")
_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)")


def closest(word: str, options: Iterable[str], dashes: bool = True) -> str | None:
    """The one of ``options`` that ``word`` most likely mistypes (``--epcohs``: ``--epochs``), or None.

    Compared without leading dashes, case and the difference between ``_`` and ``-`` (with
    ``dashes``), so ``-epochs`` and ``--batch_size`` find their flags too.
    """
    def norm(text: str) -> str:
        return text.lstrip("-").replace("_", "-").lower() if dashes else text.lower()

    by_norm = {norm(option): option for option in options}
    target = norm(word)
    if target in by_norm and by_norm[target] != word:
        return by_norm[target]
    close = difflib.get_close_matches(target, [n for n in by_norm if by_norm[n] != word], n=1, cutoff=0.7)
    return by_norm[close[0]] if close else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """" (did you mean batch_size?)" when ``word`` is close to one of ``options`` (config keys), else ""."""
    hint = closest(word, options)
    return f" (did you mean {hint}?)" if hint else ""


def _number(text: str, kind: type, accept: Callable[[float], bool], expected: str, must: str) -> int | float:
    """``text`` as ``kind`` (int or float) if ``accept`` holds for it; an argparse error naming the flag otherwise."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):  # NaN fails every comparison, so it is refused too
        raise argparse.ArgumentTypeError(f"{must}, got {text.strip()}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer", "must be a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0", "must be >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number", "must be a positive (finite) number")


def non_negative_float(text: str) -> float:
    """A number >= 0 (a weight decay)."""
    return _number(text, float, lambda v: 0 <= v < float("inf"), "a number >= 0", "must be >= 0")


def unit_fraction(text: str) -> float:
    """A number from 0 (included) to 1 (excluded): a momentum, a label smoothing."""
    return _number(text, float, lambda v: 0 <= v < 1, "a number from 0 to below 1", "must be at least 0 and below 1")


def learning_rate(text: str) -> float | str:
    """A positive number, or ``find``: the learning-rate range test's suggestion."""
    return "find" if text.strip().lower() == "find" else positive_float(text)


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1 (an EMA decay, a target accuracy)."""
    return _number(text, float, lambda v: 0 < v < 1, "a number between 0 and 1", "must be between 0 and 1 (exclusive)")


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


def logger_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of loggers (``tensorboard,csv``), each one of base.options.LOGGERS."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in LOGGERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(LOGGERS)}, got {text!r}")
    return names


def add_data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, help="cifar10, cifar100 (python format) or imagefolder (any N classes)")
    group.add_argument(
        "--data-dir",
        help="CIFAR-10 as a folder holding cifar-10-batches-py (downloaded there when missing and online), "
        "an image-folder tree (train/<class>/*, test/<class>/*) or a .tar.gz of one",
    )
    group.add_argument("--eval-batch-size", type=positive_int, help="batch size of validation and test")
    group.add_argument(
        "--data-path",
        choices=DATA_PATHS,
        help="device: whole batches augmented on the training device (datamodules/device_batches.py); "
        "loader: a DataLoader augmenting image by image on the CPU; auto: device on CUDA and CPU",
    )
    group.add_argument("--workers", type=non_negative_int, help="DataLoader worker processes (--data-path loader)")
    group.add_argument("--cache-dir", help="where decoded images are cached (default: ~/.cache)")


def add_hardware_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hardware")
    group.add_argument("--accelerator", choices=ACCELERATORS, help="auto picks a GPU when there is one")
    group.add_argument("--devices", help=DEVICES_HELP)
    group.add_argument("--precision", choices=PRECISIONS, help=PRECISION_HELP)
    group.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="channels_last memory format for the model and its batches (default: on with CUDA)",
    )


def wide_console() -> Console:
    """A rich console for tables; into a file or a pipe it does not wrap at 80 columns (rich's
    default there), which would cut file names over two lines.

    Markup and emoji codes are off: what it prints holds file names, paths and class names, and
    ``[draft] cat.png`` must not lose ``[draft]`` as a style tag, nor ``:cat:`` turn into a picture.
    """
    width = None if sys.stdout.isatty() else 1000
    return Console(width=width, markup=False, emoji=False)


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
    except SystemExit as exc:
        # Lightning's SIGTERMException, matched by name: importing Lightning here would make
        # every command (--help too) wait for it to load.
        if type(exc).__name__ != "SIGTERMException":
            raise
        print(f"{prog}: stopped by a termination signal (exit code {PREEMPTED_EXIT_CODE})", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except Interrupted as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
