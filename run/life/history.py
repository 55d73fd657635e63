"""Where a run folder stands: whether its training was tested to the end, and what a resume from
an earlier checkpoint would rewind.

A resume continues the checkpoint it is given. From ``last.ckpt`` (or the run folder, or
``last``) that is the run's latest state; from an earlier checkpoint (``best.ckpt``, a periodic
``epochNNN.ckpt``) it goes back in time, and the later checkpoints would be written over by the
rewound training. :func:`check_resume` finds those, so that the resume is refused unless
``--rewind`` asks for it, and :func:`set_aside` then moves them into ``RUN/rewound/`` first.

A finished run (all its epochs trained, the final test done and recorded in ``final_test.json``
by :func:`record_final_test`) resumed without more epochs would only test it again and add a
second test point to its dashboards: :func:`check_resume` says so instead.

Paths, JSON and checkpoints' counters only: the checkpoints are peeked at (memory-mapped), not read.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from base.errors import UserError
from base.files import atomic_write_text
from run.life.folder import CONFIG_NAME, LAST_NAME, RESUMED_CONFIG_NAME
from run.paths import check_runs_data

FINAL_TEST_NAME = "final_test.json"
REWOUND_NAME = "rewound"


class RunFinished(Exception):
    """A resume of a run that has nothing left to do; its message says so and how to extend it.
    Not an error: train.py prints it and exits 0, so a job that repeats its command ends cleanly."""


@dataclass(frozen=True)
class Point:
    """A checkpoint file and the training it holds: the epochs trained through, optimiser steps."""

    path: Path
    epochs_done: int
    step: int


@dataclass
class ResumePlan:
    """What a resume from ``start`` does to the run: the checkpoints after it (a rewind)."""

    start: Point
    later: list[Point] = field(default_factory=list)

    @property
    def rewinds(self) -> bool:
        return bool(self.later)


def peek(path: Path) -> Point:
    """The epochs and steps ``path`` was saved after (torch loads it memory-mapped)."""
    from run.checkpoints import read_checkpoint_file

    return progress_of(path, read_checkpoint_file(path, peek=True))


def progress_of(path: Path, checkpoint: dict[str, Any]) -> Point:
    """The epochs and steps of ``checkpoint``, a Lightning checkpoint as read from ``path``."""
    # Lightning counts an epoch "processed" once its batches are trained, before the end-of-epoch
    # checkpoints are saved (and "completed" only after them); a mid-epoch save has not processed
    # its own. Its "epoch" is the one in progress at the save.
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    epochs = progress.get("processed", int(checkpoint.get("epoch", -1)) + 1)
    return Point(path, int(epochs), int(checkpoint.get("global_step", 0)))


def record_final_test(run_dir: Path, last_step: int, epochs: int, best: str, best_epoch: int | None,
                      metrics: dict[str, float]) -> None:
    """Record that the run's training up to ``last_step`` (``epochs`` epochs) was tested: ``best``
    (of epoch ``best_epoch``, counted from 1) gave ``metrics``. Written last, after the dashboards."""
    record = {"last_step": last_step, "epochs": epochs, "best_checkpoint": best, "best_epoch": best_epoch,
              "metrics": {name: float(value) for name, value in metrics.items()}}
    atomic_write_text(run_dir / FINAL_TEST_NAME, json.dumps(record, indent=2) + "\n")


def final_test(run_dir: Path) -> dict[str, Any] | None:
    """The run's final-test record, or None when it has none (not tested yet, or unreadable)."""
    try:
        record = json.loads((run_dir / FINAL_TEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def plan_resume(resume: Path, start: Point | None = None) -> ResumePlan:
    """What a resume from ``resume`` (a checkpoint in a run's ``checkpoints/``) does to the run;
    ``start``: what ``resume`` holds, where its caller has read it already."""
    start = start or peek(resume)
    # last.ckpt is where the run continues from after any stop, a crash too: never a rewind, even
    # where a later best.ckpt was written after it (last.ckpt is saved at most once a minute).
    later = [] if resume.name == LAST_NAME else sorted(
        (point for path in resume.parent.glob("*.ckpt") if path != resume and (point := peek(path)).step > start.step),
        key=lambda point: (point.step, point.path.name),
    )
    return ResumePlan(start, later)


def check_resume(resume: Path, epochs: int, scheduler: str, rewind: bool, start: Point | None = None) -> ResumePlan:
    """The resume of ``resume`` to ``epochs`` epochs (``scheduler``: the run's, which decides whether
    it can be extended), checked: refused in one line when it would rewind the run without
    ``rewind``, or rewind it where its best checkpoint cannot stay right; :class:`RunFinished`
    when there is nothing left to do."""
    run_dir = resume.parent.parent
    plan = plan_resume(resume, start)
    if plan.rewinds:
        _check_rewind(plan, run_dir, rewind)
        return plan
    start, record = plan.start, final_test(run_dir)
    if epochs <= start.epochs_done and record is not None and record.get("last_step") == start.step:
        raise RunFinished(_finished_message(run_dir, start, record, scheduler))
    return plan


def _check_rewind(plan: ResumePlan, run_dir: Path, rewind: bool) -> None:
    start, latest = plan.start, plan.later[-1]
    names = ", ".join(point.path.name for point in plan.later)
    if not rewind:
        raise UserError(
            f"--resume {start.path.name} would rewind {run_dir} from {_after(latest)} to {_after(start)}, and its "
            f"training would replace the later {names}; "
            f"continue the run from where it is with --resume {shlex.quote(str(run_dir))}, or add --rewind to go back "
            f"(the later checkpoints are kept in {run_dir / REWOUND_NAME}/)"
        )
    best = next((point for point in plan.later if point.path.name == "best.ckpt"), None)
    if best is not None:
        # The run's best up to the rewind point was overwritten by this later best.ckpt: the rewound
        # run would compare its epochs with a score whose checkpoint is gone.
        raise UserError(
            f"--rewind to {start.path.name} ({_after(start)}): the run's best.ckpt is later ({_after(best)}), and the "
            f"best checkpoint up to epoch {start.epochs_done} is no longer on disk, so the "
            f"rewound run could not keep its best checkpoint right; rewind to best.ckpt or a checkpoint after it, or "
            f"start a new run from these weights with --weights {shlex.quote(str(start.path))}"
        )


def set_aside(plan: ResumePlan) -> Path:
    """Move the checkpoints after the rewind point into ``RUN/rewound/epochNNN-stepS/`` (named after
    the latest of them) and return that folder. The moves are renames within the run folder."""
    run_dir = plan.start.path.parent.parent
    latest = plan.later[-1]
    base = run_dir / REWOUND_NAME / f"epoch{latest.epochs_done:03d}-step{latest.step}"
    folder, number = base, 1
    while folder.exists():
        number += 1
        folder = base.with_name(f"{base.name}-{number}")
    folder.mkdir(parents=True)
    for point in plan.later:
        point.path.rename(folder / point.path.name)
    return folder


def _after(point: Point) -> str:
    return f"{point.epochs_done} epoch{'s' if point.epochs_done != 1 else ''} (step {point.step})"


def _finished_message(run_dir: Path, start: Point, record: dict[str, Any], scheduler: str) -> str:
    metrics = record.get("metrics") or {}
    tested = f" ({100 * metrics['acc/test']:.2f} % test accuracy)" if "acc/test" in metrics else ""
    best = record.get("best_checkpoint") or str(run_dir / "checkpoints" / "best.ckpt")
    if scheduler in ("onecycle", "cosine"):
        extend = (f"its {scheduler} schedule ends there, so train longer in a new run from its weights "
                  f"(--weights {shlex.quote(best)})")
    else:
        extend = f"to train it further, give more epochs: --resume {shlex.quote(str(run_dir))} --epochs {start.epochs_done + 10}"
    return (
        f"{run_dir} is finished: it trained its {start.epochs_done} epochs and its best checkpoint was tested{tested}; "
        f"nothing to resume. {extend[0].upper() + extend[1:]}; test it again with: python test.py --ckpt {shlex.quote(best)}"
    )


def rewind(run_dir: Path, resume: Path, start: Point | None = None) -> None:
    """Before a ``--rewind`` resume trains: move the checkpoints after ``resume`` (which holds
    ``start``, where known) aside, and say so."""
    plan = plan_resume(resume, start)
    if not plan.rewinds:
        return
    kept = set_aside(plan)
    print(f"rewinding {run_dir} to {resume.name} ({_after(plan.start)}): the later "
          f"{', '.join(point.path.name for point in plan.later)} are kept in {kept}", flush=True)


def check_resumed_data(run_dir: Path, data_dir: Path) -> None:
    """Refuse to resume ``run_dir`` on ``data_dir`` when that is where the run's config says its data
    was and it is no longer there (moved, deleted): before anything is downloaded or created there."""
    from run.config import absolute_path, read_config

    latest = run_dir / RESUMED_CONFIG_NAME if (run_dir / RESUMED_CONFIG_NAME).is_file() else run_dir / CONFIG_NAME
    saved = read_config(latest).get("data_dir")
    if saved and absolute_path(saved) == data_dir:
        check_runs_data(data_dir, latest)
