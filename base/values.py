"""Parsers of option values as typed (a flag's text, or a YAML value as the file spells it).

Each takes the text and returns the typed value, or raises ``argparse.ArgumentTypeError`` with a
message naming what was expected; argparse turns that into ``--flag: message``, and a config file
value goes through the same parser (cli/config_file.py). Importable without torch.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

from base.options import LOGGERS


def _number(text: str, kind: type, accept: Callable[[float], bool], expected: str, must: str) -> int | float:
    """``text`` as ``kind`` (int or float) if ``accept`` holds for it; an argparse error naming the flag otherwise."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):  # NaN fails every comparison, so it is refused too
        raise argparse.ArgumentTypeError(f"{must}, got {text.strip()}")
    return value


# The largest count torch takes (int64): a larger one would overflow in a tensor, a sampler or a
# loop counter after torch has loaded, with a traceback instead of this one line.
INT_MAX = 2**63 - 1
# The seeds numpy takes (and Lightning's seed_everything with it): 0 to 2**32 - 1.
SEED_MAX = 2**32 - 1


def positive_int(text: str) -> int:
    value = _number(text, int, lambda v: v >= 1, "a positive integer", "must be a positive integer")
    return _at_most(value, INT_MAX, text)


def non_negative_int(text: str) -> int:
    value = _number(text, int, lambda v: v >= 0, "an integer >= 0", "must be >= 0")
    return _at_most(value, INT_MAX, text)


def seed(text: str) -> int:
    """A random seed: an integer from 0 to 2**32 - 1, the range numpy (hence Lightning) seeds from."""
    value = _number(text, int, lambda v: v >= 0, "an integer >= 0", "must be >= 0")
    return _at_most(value, SEED_MAX, text, "the seeds numpy and Lightning take")


# Every image this project trains on is 32x32 (datamodules/sources.py refuses others).
IMAGE_SIDE = 32


def shift_pixels(text: str) -> int:
    """A training shift (``--translate``): 0 to 16 pixels, half a 32x32 image's side; more would leave
    images that are mostly border (and a reflection needs the shift below the side)."""
    value = _number(text, int, lambda v: v >= 0, "an integer >= 0", "must be >= 0")
    return _at_most(value, IMAGE_SIDE // 2, text, "half the side of the 32x32 images")


def square_side(text: str) -> int:
    """Cutout's square (``--cutout``): 0 to 32 pixels, the images' side."""
    value = _number(text, int, lambda v: v >= 0, "an integer >= 0", "must be >= 0")
    return _at_most(value, IMAGE_SIDE, text, "the side of the 32x32 images")


def _at_most(value: int, limit: int, text: str, what: str = "the largest count torch takes") -> int:
    if value > limit:
        raise argparse.ArgumentTypeError(f"must be at most {limit:,} ({what}), got {text.strip()}")
    return value


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


def devices(text: str) -> str:
    """``--devices`` as typed (a count, a list such as ``0,1``, ``-1`` or ``auto``); run/hardware.py
    checks and resolves it against the machine."""
    return text.strip()
