"""Run folders of train.py (``OUTPUT_DIR/<model>/<run name>``): creating, finding and resuming them.

A run owns its folder: ``config.yaml`` (its resolved options), ``checkpoints/`` and the
TensorBoard event files. A new run gets a fresh folder (``version_N``, or ``--run-name``),
created atomically so that two jobs starting at once never share one; a resume, in every form,
continues the folder of the checkpoint it names. Shared by train.py and ``test.py --log-to-run``.
Under SLURM the job's task of global rank 0 opens the folder and tells the job's other tasks
which one it is (:func:`announce_run_dir`, :func:`join_run_dir`).
Paths only: nothing here loads torch (what a checkpoint holds is checked by ``run.checkpoints``).
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


from base.errors import UserError
from base.files import atomic_write_text
from base.slurm import SlurmTask, process_rank, slurm_task
from run.paths import check_checkpoint_file

CONFIG_NAME = "config.yaml"
RESUMED_CONFIG_NAME = "config.resumed.yaml"
LAST_NAME = "last.ckpt"
# Held by the process that trains the run (hidden: nothing looking for runs or checkpoints sees it).
LOCK_NAME = ".train.lock"
# DDP workers re-run the entry point after rank 0 opened the run's folder: they inherit it, and
# rank 0 holds its lock.
RUN_DIR_ENV = "CIFAR10_LIGHTNING_RUN_DIR"
# What else rank 0 decides once and DDP workers inherit, rather than each deciding again: the
# checkpoint ``--resume`` resolved to ("" for a new run; ``last`` could name another run by the time
# a worker starts), and the console display (:func:`console_kind`).
RESUME_ENV = "CIFAR10_LIGHTNING_RESUME"
CONSOLE_ENV = "CIFAR10_LIGHTNING_CONSOLE"
# How long a SLURM task waits for its job's task 0 to name the run folder. Every task loads the
# data first, so they normally arrive together; a shared file system may show a new file late.
JOIN_TIMEOUT_S = 600.0


def joins_run() -> bool:
    """True for a process that trains a run opened by another process of the same run, which holds
    its lock: a DDP worker started by Lightning (it inherits :data:`RUN_DIR_ENV`), or a SLURM task
    other than the job's global rank 0 (:func:`join_run_dir`)."""
    if RUN_DIR_ENV in os.environ:
        return True
    task = slurm_task()
    return task is not None and task.global_rank != 0


def console_kind() -> str:
    """``bar`` (a live progress bar) or ``lines`` (one line per epoch), the same on every process.

    The two run different collectives at an epoch's end (the lines read the synced epoch metrics on
    every rank), so the ranks must not choose by their own terminals: DDP workers started by
    Lightning's launcher take rank 0's choice (:data:`CONSOLE_ENV`, handed down by ``run.life.open_run``).
    Tasks that SLURM starts (several per job) cannot be told, and under ``srun --pty`` only task 0
    has a terminal: they all print lines. Otherwise a bar where standard output is a terminal.
    """
    handed = os.environ.get(CONSOLE_ENV)
    if handed in ("bar", "lines"):
        return handed
    task = slurm_task()
    if task is not None and task.ntasks > 1:
        return "lines"
    return "bar" if sys.stdout.isatty() else "lines"


@contextmanager
def handed_down(**values: str) -> Iterator[None]:
    """Within the block, environment variables (name=value) that processes started from this one
    inherit, as Lightning's launcher starts the DDP workers: each set unless this process inherited
    it (a worker keeps rank 0's), and removed afterwards by the process that set it."""
    mine = [name for name in values if name not in os.environ]
    for name in mine:
        os.environ[name] = values[name]
    try:
        yield
    finally:
        for name in mine:
            os.environ.pop(name, None)


def inherited_resume() -> tuple[bool, Path | None]:
    """(whether this process inherited rank 0's resolved ``--resume``, that checkpoint or None for a
    new run): a DDP worker started by Lightning takes it rather than resolving the flag again."""
    if RESUME_ENV not in os.environ:
        return False, None
    value = os.environ[RESUME_ENV]
    return True, (Path(value) if value else None)


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


def announce_choice(run: Path, output_dir: Path) -> None:
    """Say, before any work, which run ``--resume last`` without ``--model`` took when runs of other
    networks are there too: the newest of any network, which may not be the one meant (a stray run
    started by a typo minutes before), and how to take another network's newest instead. On
    standard output, as the run's other news: an error that may follow stays one line on stderr."""
    newest = {}
    for config in output_dir.glob(f"*/*/{CONFIG_NAME}"):
        other = config.parent
        if other.parent.name != run.parent.name and (other.parent.name not in newest
                                                      or _last_activity(other) > _last_activity(newest[other.parent.name])):
            newest[other.parent.name] = other
    if not newest:
        return  # one network's runs only: nothing to mistake
    others = "; ".join(f"for the newest {model} run ({path.name}) add --model {model}" for model, path in sorted(newest.items()))
    print(f"--resume last: continuing {run}, the newest run of any network ({run.parent.name}); {others}", flush=True)


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
            others = sorted(path.name for path in (run / "checkpoints").glob("*.ckpt"))
            if others:
                # A run killed while its last.ckpt was being written may have others: not "no epoch".
                raise UserError(
                    f"--resume last: the newest run, {run}, has no {LAST_NAME}, only {', '.join(others)}; resume from "
                    f"one of them with --resume {shlex.quote(str(run / 'checkpoints' / others[-1]))}"
                )
            raise UserError(
                f"--resume last: the newest run, {run}, has no {LAST_NAME} (stopped before its first epoch ended); "
                "start it again without --resume, or name an older run's checkpoint with --resume PATH"
            )
        if model is None and process_rank() == 0:
            announce_choice(run, output_dir)
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
    # A process that joins a run (joins_run) finds it held by the process it joins; that one checked.
    if (run_dir / LOCK_NAME).is_file() and not joins_run():
        with hold_run(run_dir):
            pass


def check_resumable(checkpoint: Path) -> Path:
    """``checkpoint``, resolved, if it is a checkpoint file inside a run folder; a one-line UserError otherwise.

    Only the file's first bytes are read: ``run.life.start.read_resume`` checks
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
    # Imported here: filelock takes a noticeable part of a flag error's time, which never needs it.
    from filelock import FileLock, Timeout

    lock = FileLock(run_dir / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        message = (
            f"run {run_dir} is being trained by another process right now; wait for it to end or stop it "
            "(Ctrl-C, or kill its PID), then continue the run with --resume"
        )
        # Task 0 of a SLURM job alone checks: its other tasks would wait for a folder that never comes.
        announce_run_dir(run_dir.parent.parent, error=message)
        raise UserError(message) from None
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


# --- several SLURM tasks, one run -----------------------------------------------------------------
# Under srun every task runs all of train.py, each started on its own (no parent process to inherit
# RUN_DIR_ENV from). Task 0 alone creates or continues the run folder and holds its lock; it then
# writes the folder's path into a small file under the output folder, named after this start of
# the job (job id, restart count, step id: SlurmTask.attempt), which the job's other tasks wait for.
# A file of an earlier start has another name, so it is never read; task 0 removes its own when it
# ends, and those of the job's earlier starts when it writes one.
ANNOUNCEMENT_PREFIX = ".slurm-job-"
_announced: set[Path] = set()  # by this process: an error must not replace a folder announced already


def _announcement(output_dir: Path, task: SlurmTask) -> Path:
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in task.attempt)
    return output_dir / f"{ANNOUNCEMENT_PREFIX}{safe}.json"


def announce_run_dir(
    output_dir: Path, run_dir: Path | None = None, resume: Path | None = None, error: str | None = None
) -> Path | None:
    """SLURM task 0 of a job of several tasks: tell the others that this start trains ``run_dir``
    (continuing ``resume``, or new), or that it stopped with ``error`` before opening one.

    Returns the file written (for :func:`withdraw_announcement`), or None in any other process,
    where there is nobody to tell. The write is atomic: a reader sees the whole file or none. An
    error is not announced once a folder was (the others have joined it), nor where it cannot be
    written (an OSError is raised only for a folder).
    """
    task = slurm_task()
    if task is None or task.ntasks < 2 or task.global_rank != 0:
        return None
    path = _announcement(output_dir, task)
    if error is not None and path in _announced:
        return None
    content = {"run_dir": str(run_dir) if run_dir else None, "resume": str(resume) if resume else None, "error": error}
    try:
        atomic_write_text(path, json.dumps(content) + "\n")
    except OSError:
        if error is None:
            raise
        return None  # the error is this process's own to report; the others will time out
    _announced.add(path)
    # Left by earlier starts of this job that were killed before removing theirs.
    job = path.name.removeprefix(ANNOUNCEMENT_PREFIX).split(".")[0]
    for earlier in output_dir.glob(f"{ANNOUNCEMENT_PREFIX}{glob.escape(job)}.*.json"):
        restart = earlier.name.removeprefix(ANNOUNCEMENT_PREFIX).split(".")[1]
        if restart.isdigit() and int(restart) < task.restart_count:
            earlier.unlink(missing_ok=True)
    return path


def withdraw_announcement(path: Path | None) -> None:
    """Remove what :func:`announce_run_dir` wrote (once every task has read it, or none will)."""
    if path is not None:
        path.unlink(missing_ok=True)


def join_run_dir(output_dir: Path, resume: Path | None, timeout: float = JOIN_TIMEOUT_S) -> Path:
    """SLURM task other than 0: the run folder that the job's task 0 announced for this start.

    ``resume`` is the checkpoint this task resolved to continue (None for a new run): it must be
    task 0's, or the tasks would train different runs. Raises a one-line ``UserError`` when task 0
    stopped before announcing, announced another run, or said nothing within ``timeout`` seconds.
    """
    task = slurm_task()
    assert task is not None and task.global_rank != 0, "only the other tasks of a SLURM job join a run"
    path = _announcement(output_dir, task)
    deadline = time.monotonic() + timeout
    while True:
        try:
            said = json.loads(path.read_text(encoding="utf-8"))
            break
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"SLURM task {task.global_rank} of job {task.job_id}: task 0 did not say which run folder to train "
                    f"within {timeout:.0f} s (in {path}); see task 0's output for why it stopped, then submit the job again"
                ) from None
            time.sleep(0.2)
    if said.get("error"):
        raise UserError(f"task 0 of this SLURM job stopped: {said['error']}")
    theirs = said.get("resume")
    if theirs != (str(resume) if resume else None):
        raise UserError(
            f"SLURM task {task.global_rank} of job {task.job_id} resolved {('--resume ' + str(resume)) if resume else 'a new run'}, "
            f"but task 0 {('continues ' + theirs) if theirs else 'starts a new run'} (runs changed while the tasks "
            "started); name the run with --run-name NAME --resume last, and submit the job again"
        )
    return Path(said["run_dir"])
