"""How a training run starts: new, from weights, or resumed; each plan resolved once.

- **new**: the network built from its options, trained from its initialisation;
- **from weights** (``--weights``): a new run whose network starts from a checkpoint's or a course
  state dict's weights, with a fresh optimiser; the file is read once, here, and its weights are
  what the module is built with;
- **resume** (``--resume``): the run's own checkpoint continued where it stopped; the file is read
  once, here, checked, and handed to Lightning as read (:class:`callbacks.checkpoints.AtomicCheckpointIO`
  ``preloaded``), so that its counters, its data fingerprint and its weights are those of one read.

``run.life.resolve`` makes the plan while resolving the options (it needs the network and the epochs
trained); ``run.life.open_run`` and ``run.training.train`` carry it out.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from base.errors import UserError
from run.life.history import Point, progress_of

if TYPE_CHECKING:  # importing run.checkpoints loads torch; the flags are checked before that
    from run.checkpoints import CheckpointContents


@dataclass(frozen=True)
class NewRun:
    """A run trained from its network's initialisation."""

    kind = "new"


@dataclass(frozen=True)
class FromWeights:
    """A new run whose network starts from ``weights`` (read once: its network, options and tensors)."""

    weights: CheckpointContents
    kind = "weights"


@dataclass(frozen=True)
class Resume:
    """A run continued from ``path``: ``checkpoint`` is the file as ``torch.load`` read it, the one
    read; ``point`` the epochs and optimiser steps it holds."""

    path: Path
    checkpoint: dict[str, Any]
    point: Point
    kind = "resume"

    def saved_callback_state(self, name: str) -> Any:
        """The state the callback class ``name`` saved in the checkpoint, or None."""
        return self.checkpoint.get("callbacks", {}).get(name)


Start = NewRun | FromWeights | Resume


def read_weights(path: Path, expected_model: str | None) -> FromWeights:
    """The plan of a run started from the weights in ``path`` (``--weights``); one-line UserErrors
    for a file that holds none, or holds another network than ``expected_model``."""
    from run.checkpoints import load_any_checkpoint

    return FromWeights(load_any_checkpoint(path, expected_model=expected_model))


def read_resume(path: Path) -> Resume:
    """The plan of a resume of ``path`` (a checkpoint in a run's ``checkpoints/``), read once and
    checked: a one-line UserError for a file that holds no training state to continue."""
    from run.checkpoints import is_state_dict, read_checkpoint_file

    checkpoint = read_checkpoint_file(path)
    if not (isinstance(checkpoint, dict) and "pytorch-lightning_version" in checkpoint and "state_dict" in checkpoint):
        what = "a plain state dict (torch.save(model.state_dict()))" if is_state_dict(checkpoint) else "not a training checkpoint of train.py"
        raise UserError(
            f"--resume {path}: this is {what}, which holds no training state to continue; "
            f"start a new run from its weights with --weights {shlex.quote(str(path))}"
        )
    return Resume(path, checkpoint, progress_of(path, checkpoint))


def plan_start(config: Any) -> Start:
    """The plan of a resolved ``run.config.RunConfig``, read from its ``resume`` or ``weights``
    (for callers of ``run.life.open_run`` that resolved only the options)."""
    if config.resume is not None:
        return read_resume(config.resume)
    if config.weights is not None:
        return read_weights(config.weights, expected_model=config.model)
    return NewRun()
