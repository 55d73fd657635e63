"""Run folders of train.py (``OUTPUT_DIR/<model>/<run name>``): creating, finding and resuming them.

A run owns its folder: ``config.yaml`` (its resolved options), ``checkpoints/`` and the
TensorBoard event files. A new run gets a fresh folder (``version_N``, or ``--run-name``),
created atomically so that two jobs starting at once never share one; a resume, in every form,
continues the folder of the checkpoint it names. Shared by train.py and ``test.py --log-to-run``.
Paths only: nothing here loads torch (what a checkpoint holds is checked by ``run.checkpoints``).
"""
from __future__ import annotations

import glob
import os
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from base.errors import UserError
from run.paths import check_checkpoint_file

CONFIG_NAME = "config.yaml"
RESUMED_CONFIG_NAME = "config.resumed.yaml"
LAST_NAME = "last.ckpt"
# Held by the process that trains the run (hidden: nothing looking for runs or checkpoints sees it).
LOCK_NAME = ".train.lock"
# DDP workers re-run the entry point after rank 0 opened the run's folder: they inherit it, and
# rank 0 holds its lock.
RUN_DIR_ENV = "CIFAR10_LIGHTNING_RUN_DIR"


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run folder that train.py wrote ``checkpoint`` into, or None for a checkpoint from elsewhere."""
    folder = checkpoint.resolve().parent
    run = folder.parent
    return run if folder.name == "checkpoints" and (run / CONFIG_NAME).is_file() else None


def create_run_dir(output_dir: Path, model: str, run_name: str | None) -> Path:
    """Make the folder of a new run: ``run_name``, or the next free ``version_N``.

    ``mkdir`` without ``exist_ok`` is atomic, so two jobs that start together never get the same
    folder; a named run that already has checkpoints is refused rather than written over.
    """
    root = output_dir / model
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {root} ({exc.strerror or exc}); choose another --output-dir") from None
    if run_name is not None:
        folder = root / run_name
        try:
            folder.mkdir()
        except FileExistsError:
            check_new_run_name(folder)
            # A start of this same run that ended before its first checkpoint: start it again.
        return folder
    number = max((_version(path) for path in root.iterdir()), default=-1) + 1
    while True:
        folder = root / f"version_{number}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            number += 1


def check_new_run_name(folder: Path) -> None:
    """Refuse to start a named run in ``folder`` when a run there has checkpoints or is training now."""
    check_not_in_use(folder)
    if any((folder / "checkpoints").glob("*.ckpt")):
        raise UserError(f"run {folder} already exists; continue it with --resume last, or choose another --run-name")


def _version(path: Path) -> int:
    prefix, _, number = path.name.partition("_")
    return int(number) if prefix == "version" and number.isdigit() else -1


def newest_run(output_dir: Path, model: str | None) -> Path | None:
    """The run folder under ``output_dir`` (of ``model``, or of any) most recently written to."""
    runs = [config.parent for config in output_dir.glob(f"{model or '*'}/*/{CONFIG_NAME}")]
    return max(runs, key=_last_activity, default=None)


def _last_activity(run: Path) -> float:
    files = [run / CONFIG_NAME, run / RESUMED_CONFIG_NAME, run / "checkpoints" / LAST_NAME]
    return max(path.stat().st_mtime for path in files if path.exists())


def find_resume(resume: str | Path, output_dir: Path, model: str | None, run_name: str | None) -> Path | None:
    """The ``last.ckpt``-like checkpoint that ``--resume`` names, checked to be resumable.

    ``last``: the newest run (or, with ``run_name``, that run, and None when it has no checkpoint
    yet, so that a requeued job's first start and its restarts are one command). A run folder or
    its ``checkpoints/`` folder means its ``last.ckpt``.
    """
    if str(resume) == "last":
        if run_name is not None:
            # A run name is a folder name, which may hold [ ] * ?: taken literally, not as a pattern.
            found = sorted(output_dir.glob(f"{model or '*'}/{glob.escape(run_name)}/checkpoints/{LAST_NAME}"))
            if len(found) > 1:
                runs = ", ".join(str(path.parent.parent) for path in found)
                raise UserError(f"--resume last --run-name {run_name}: runs of several models have this name ({runs}); add --model")
            if found:
                return check_resumable(found[0])
            for run in output_dir.glob(f"{model or '*'}/{glob.escape(run_name)}"):
                check_not_in_use(run)
                others = sorted(path.name for path in (run / "checkpoints").glob("*.ckpt"))
                if others:
                    raise UserError(
                        f"--resume last --run-name {run_name}: {run} has no {LAST_NAME} to continue from, only "
                        f"{', '.join(others)}; resume from one of them with --resume {shlex.quote(str(run / 'checkpoints' / others[-1]))}"
                    )
            return None  # the run's first start
        run = newest_run(output_dir, model)
        if run is None:
            runs = f"{model} runs" if model else "runs"
            raise UserError(f"--resume last: no {runs} under {output_dir}; start without --resume, or pass a checkpoint path")
        last = run / "checkpoints" / LAST_NAME
        if not last.is_file():
            raise UserError(
                f"--resume last: the newest run, {run}, has no {LAST_NAME} (stopped before its first epoch ended); "
                "start it again without --resume, or name an older run's checkpoint with --resume PATH"
            )
        return check_resumable(last)
    path = Path(resume)
    if path.is_dir():
        candidates = [path / "checkpoints" / LAST_NAME, path / LAST_NAME]
        found = next((candidate for candidate in candidates if candidate.is_file()), None)
        if found is None:
            raise UserError(
                f"--resume {path}: a folder to resume must be a run folder of train.py with checkpoints/{LAST_NAME} "
                f"(or its checkpoints/ folder); none found there"
            )
        path = found
    return check_resumable(path)


def check_not_in_use(run_dir: Path) -> None:
    """Refuse at once a run that another process trains now (:func:`hold_run` holds it while training)."""
    # No lock file: no process has ever held the run (a check leaves none behind where there was none).
    if (run_dir / LOCK_NAME).is_file() and RUN_DIR_ENV not in os.environ:
        with hold_run(run_dir):
            pass


def check_resumable(checkpoint: Path) -> Path:
    """``checkpoint``, resolved, if it is a checkpoint file inside a run folder; a one-line UserError otherwise.

    Only the file's first bytes are read: ``run.checkpoints.check_training_checkpoint`` checks
    that it holds a training state.
    """
    check_checkpoint_file(checkpoint)
    run = run_dir_of(checkpoint)
    if run is None:
        raise UserError(
            f"--resume {checkpoint}: not inside a run folder of train.py (RUN/checkpoints/ beside RUN/{CONFIG_NAME}), "
            f"so there is no run to continue; put it back in its run folder, or start a new run from its weights "
            f"(a course state dict, say) with --weights {shlex.quote(str(checkpoint))}"
        )
    check_not_in_use(run)
    return checkpoint.resolve()


@contextmanager
def hold_run(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` while this process trains it; a one-line UserError when another process does.

    Two trainings of one run would interleave its checkpoints and event files (two jobs started
    with the same ``--run-name``, a ``--resume`` of a run still training). The lock is the
    operating system's (``flock``, via filelock), so it ends with its process however that ends,
    SIGKILL included: a preempted run is never left locked.
    """
    lock = FileLock(run_dir / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"run {run_dir} is being trained by another process right now; wait for it to end or stop it "
            "(Ctrl-C, or kill its PID), then continue the run with --resume"
        ) from None
    try:
        yield
    finally:
        lock.release()


def discard_if_unfinished(run_dir: Path) -> bool:
    """Remove a run folder that holds no checkpoint (stopped before its first epoch ended); True if removed."""
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def require_run_dir(checkpoint: str | Path) -> Path:
    """The run folder of ``checkpoint``, for ``--log-to-run``; a one-line UserError when there is none."""
    run = run_dir_of(Path(checkpoint))
    if run is None:
        raise UserError(
            f"--log-to-run: {checkpoint} is not in a run folder of train.py "
            f"(OUTPUT_DIR/<model>/version_N/checkpoints/, beside a {CONFIG_NAME}); "
            "pass a checkpoint from such a folder, or leave out --log-to-run"
        )
    return run
