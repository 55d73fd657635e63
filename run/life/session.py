"""A training run's life in one process: :func:`open_run`, from its checks to its folder discarded
or its final test recorded.

Every process of a run opens it: rank 0 (or the only process) opens the run's folder (a new one, or
a resumed run's own) and holds it; a DDP worker started by Lightning inherits the folder from rank 0
(``RUN_DIR_ENV``); a SLURM task other than 0 waits for the folder its job's task 0 announces
(``run.life.folder.join_run_dir``). What rank 0 decides once (the checkpoint a resume continues,
the console display) is handed down to the workers the same way.

Nothing here loads torch at import: the Lightning and callback classes a run needs are imported
where they are used, so that ``run.life`` stays cheap for the commands' flag checks.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from base.errors import Interrupted, UserError
from base.slurm import DEFAULT_REQUEUE_SIGNAL, check_layout, process_rank, slurm_task
from run.config import RunConfig, write_config
from run.loggers import check_loggers, remember_mlflow_run
from run.paths import existing_ancestor
from run.life.folder import (
    CONFIG_NAME,
    CONSOLE_ENV,
    RESUME_ENV,
    RESUMED_CONFIG_NAME,
    RUN_DIR_ENV,
    announce_run_dir,
    console_kind,
    create_run_dir,
    discard_if_unfinished,
    handed_down,
    hold_run,
    join_run_dir,
    joins_run,
    withdraw_announcement,
)
from run.life.history import check_resumed_data, record_final_test, rewind
from run.life.start import Resume, Start, plan_start

if TYPE_CHECKING:  # torch and Lightning load where they are used
    import lightning as L
    from lightning import LightningModule

    from datamodules import ImageDataModule

# The share of the free disk above which the checkpoints a run will keep are announced before it starts.
DISK_HEADS_UP = 0.25


def check_outputs(config: RunConfig, module: LightningModule) -> None:
    """Refuse, before any heavy work, a disk too full for the checkpoints this run keeps, and say
    so on stderr when they will take more than ``DISK_HEADS_UP`` of the free space.

    Those are best, last and one every ``--checkpoint-every`` epochs, each with the optimiser's
    state, plus one temporary file while saving. (Whether the paths can be written at all was
    checked with the flags, by ``run.life.resolve``.)
    """
    if config.fast_dev_run:
        return
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    copies = 1 + {"sgd": 1 if config.momentum else 0}.get(config.optimizer, 2) + (2 if config.ema_decay else 0)
    kept = 3 + config.epochs // config.checkpoint_every
    needed = weights * copies * kept
    free = shutil.disk_usage(existing_ancestor(config.output_dir)).free
    keeps = (f"this run keeps about {needed / 2**30:.1f} GiB of checkpoints ({kept} of {weights * copies / 2**20:.0f} "
             f"MiB: best, last, one every {config.checkpoint_every} epochs)")
    if free < needed:
        raise UserError(
            f"--output-dir {config.output_dir}: {free / 2**30:.1f} GiB free, and {keeps}; free space, "
            "choose another --output-dir, or keep fewer with a larger --checkpoint-every"
        )
    if needed > DISK_HEADS_UP * free and process_rank() == 0:
        # Before the run, not when the disk fills hours into it.
        print(f"heads-up: {keeps}, {100 * needed / free:.0f} % of the {free / 2**30:.1f} GiB free under "
              f"{config.output_dir}; a larger --checkpoint-every keeps fewer", file=sys.stderr, flush=True)


def _open_run_dir(config: RunConfig) -> tuple[Path, bool]:
    """(the run's folder, whether this process created it): a resumed run's own, else a new one.

    A DDP worker started by Lightning inherits the folder from rank 0; a SLURM task other than 0
    waits for the one its job's task 0 announces (``join_run_dir``).
    """
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited), False
    if joins_run():
        return join_run_dir(config.output_dir, config.resume), False
    if config.resume is not None:
        return config.resume.parent.parent, False
    return create_run_dir(config.output_dir, config.model, config.run_name), True


class Run:
    """One training run as this process trains it, within :func:`open_run`.

    ``config``: its options (with the SLURM requeue signal filled in); ``start``: how it starts
    (new, from weights, resumed); ``dir``: its folder, once :meth:`open` opened it.
    """

    def __init__(self, config: RunConfig, start: Start, held: ExitStack) -> None:
        self.config = config
        self.start = start
        self.dir: Path | None = None
        self.created = False  # whether this process made the folder (and so may discard it)
        self._held = held
        self._fitted = False  # the fit ended: from here on the folder is the run's, whatever happens
        self._stopped = False  # the fit stopped on a signal, after PreemptionCheckpoint saved what it could

    def open(self) -> Path:
        """The run's folder, opened at the first call: held when this process created it, announced
        to the job's other SLURM tasks, and handed down to the DDP workers that Lightning's launcher
        starts from here on (so call it before a Trainer launches them)."""
        if self.dir is None:
            run_dir, created = _open_run_dir(self.config)
            if created:
                # A named run's folder may be another process's that has not saved a checkpoint yet:
                # refused here, before anything of it could be discarded.
                self._held.enter_context(hold_run(run_dir))
            # Under srun, SLURM task 0 tells the job's other tasks which folder this is (once it holds it).
            self._held.callback(withdraw_announcement, announce_run_dir(self.config.output_dir, run_dir, self.config.resume))
            self._held.enter_context(handed_down(**{RUN_DIR_ENV: str(run_dir)}))
            self.dir, self.created = run_dir, created
        return self.dir

    def check_ready(self, config: RunConfig, datamodule: ImageDataModule, module: LightningModule) -> None:
        """Everything that can be checked before training is, and before the run's folder exists:
        the free disk for ``config``'s checkpoints, the data (downloaded if need be; both splits read,
        so a missing test split is found now, not after hours of training), and that a resume trains
        on the data its run was trained on."""
        check_outputs(config, module)
        datamodule.prepare_data()
        datamodule.setup()
        if isinstance(self.start, Resume):
            from callbacks.resume import SameData, check_same_data, data_fingerprint

            check_same_data(self.start.saved_callback_state(SameData.__qualname__), data_fingerprint(datamodule))

    def begin(self, config: RunConfig, trainer: L.Trainer, description: str) -> None:
        """Once the run is built, on rank 0: its MLflow run remembered (a resume continues it), its
        options ``config`` recorded (``config.yaml``; ``config.resumed.yaml`` for a resume), one line
        saying which run starts (``description``: its options), and a ``--rewind`` carried out."""
        if not trainer.is_global_zero:
            return
        run_dir = self.open()
        remember_mlflow_run(trainer.loggers, run_dir)
        if not config.fast_dev_run:
            write_config(config.to_dict(), run_dir / (RESUMED_CONFIG_NAME if config.resume else CONFIG_NAME))
        if config.fast_dev_run:
            verb = "fast dev run (nothing is kept)"
        elif config.resume:
            verb = f"resuming {run_dir} from {config.resume.name}"
        else:
            verb = f"new run {run_dir}"
        print(f"{verb}: {description}", flush=True)
        if config.rewind and config.resume is not None:
            rewind(run_dir, config.resume, self.start.point if isinstance(self.start, Resume) else None)

    @contextmanager
    def fitting(self, trainer: L.Trainer) -> Iterator[None]:
        """Around the fit: a stop by a signal keeps the folder (``PreemptionCheckpoint`` saved
        ``last.ckpt``), and one by Ctrl-C ends as ``Interrupted`` (exit code 130); once the fit has
        ended, the folder is never discarded."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from callbacks.checkpoints import PreemptionCheckpoint

        try:
            yield
        except SIGTERMException:
            self._stopped = True
            preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
            if preemption.received == "SIGINT":
                raise Interrupted("stopped by Ctrl-C (exit code 130)") from None
            raise
        self._fitted = True

    def record_test(self, *, last_step: int, epochs: int, best: str | None, best_epoch: int | None,
                    metrics: dict[str, float]) -> None:
        """Record, on rank 0 and last (once the dashboards and the results hold it), that the training up
        to ``last_step`` was tested: a resume of this run, finished, says so instead of testing it again
        (``run.life.history``). Nothing for a run without a best checkpoint or a test, or a fast dev run."""
        if best and metrics and not self.config.fast_dev_run:
            record_final_test(self.open(), last_step, epochs, best, best_epoch, metrics)

    def _discard_dev_run(self) -> None:
        # Lightning writes nothing in a fast dev run; its folder, made to hold the run's lock, goes too.
        if self.created and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _discard_if_unfinished(self) -> None:
        if self.created and not self._fitted and not self._stopped and self.dir is not None \
                and discard_if_unfinished(self.dir):
            print(f"removed the run folder {self.dir}: it stopped before writing any checkpoint", flush=True)


@contextmanager
def open_run(config: RunConfig, start: Start | None = None) -> Iterator[Run]:
    """Within the block, ``config``'s run (:class:`Run`) as this process trains it; ``start``: how it
    starts, as ``resolve_run`` planned it (read here from ``config.resume`` or ``config.weights``
    when not given).

    Before the block: the devices are checked against a SLURM job's tasks and the loggers' libraries
    against what is installed (before the data is read). Within it: what rank 0 decides is handed
    down to the DDP workers, a resumed run is held (refused at once when another process trains
    it) and its data folder checked; the run's folder is opened by :meth:`Run.open`. After it: a
    folder this process created is removed when the run stopped before writing any checkpoint or was
    a fast dev run (which keeps nothing), and a ``UserError`` is passed on to the job's other SLURM
    tasks, which may be waiting for task 0 to name the run folder (they stop with it rather than at
    their timeout).
    """
    check_layout(config.hardware.device_count, config.num_nodes)
    # A logger whose library is missing (--logger mlflow without MLflow): refused before the data
    # is read. (resolve_run may refuse it earlier still, with the flags.)
    check_loggers(config.logger)
    if config.requeue_signal is None and slurm_task() is not None:
        # Under SLURM the requeue signal defaults to Lightning's (SIGUSR1); the run's config records it.
        config = dataclasses.replace(config, requeue_signal=DEFAULT_REQUEUE_SIGNAL)
    # Decided here, once, and inherited by the DDP workers that Lightning's launcher starts from
    # this process: which checkpoint a resume continues, and the console display (whose kinds run
    # different collectives at an epoch's end).
    hand_down = {RESUME_ENV: str(config.resume or ""), CONSOLE_ENV: console_kind()}
    try:
        with ExitStack() as held:
            held.enter_context(handed_down(**hand_down))
            if config.resume is not None and not joins_run():
                # Refused at once when another process trains this run (DDP workers, the job's other
                # SLURM tasks: rank 0 holds it).
                held.enter_context(hold_run(config.resume.parent.parent))
            run = Run(config, start or plan_start(config), held)
            try:
                if config.resume is not None:
                    check_resumed_data(config.resume.parent.parent, config.data_dir)  # not downloaded anew where it was
                yield run
            except BaseException:
                run._discard_if_unfinished()
                raise
            if config.fast_dev_run:
                run._discard_dev_run()
    except UserError as exc:
        # Nothing to do in any process but a SLURM job's task 0.
        announce_run_dir(config.output_dir, error=str(exc))
        raise


@dataclass
class RangeTestFolder:
    """The folder of a learning-rate range test run alone (``--find-lr``): ``OUTPUT_DIR/MODEL/lr_find/version_N``."""

    root: Path
    path: Path | None = None
    inherited: bool = False  # a DDP worker's: rank 0 made it and writes the results

    def make(self) -> None:
        """Make the folder, before the test's Trainer starts the other DDP processes (Lightning's
        launcher), which inherit it: each would otherwise make a folder of its own."""
        self.path = create_run_dir(self.root, "lr_find", None)
        os.environ[RUN_DIR_ENV] = str(self.path)


@contextmanager
def open_range_test(output_dir: Path, model: str) -> Iterator[RangeTestFolder]:
    """Within the block, the folder of a range test of ``model`` (:meth:`RangeTestFolder.make` makes
    it; a DDP worker's is rank 0's, inherited) and the console display handed down to the test's
    DDP workers; the folder is removed when the block fails, since nothing of the test was written."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        yield RangeTestFolder(output_dir / model, Path(inherited), inherited=True)
        return
    folder = RangeTestFolder(output_dir / model)
    try:
        with handed_down(**{CONSOLE_ENV: console_kind()}):
            yield folder
    except BaseException:
        if folder.path is not None:
            shutil.rmtree(folder.path, ignore_errors=True)
        raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
