"""A run's TensorBoard side: its logger, and test.py's additions to the run's loggers (``--log-to-run``)."""
from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from base.errors import UserError
from callbacks.dashboards import Dashboards
from run.checkpoints import CheckpointContents


def run_logger(run_dir: Path, purge_step: int | None = None) -> TensorBoardLogger:
    """The TensorBoard logger that writes into ``run_dir``, new or existing.

    No ``hp_metric`` placeholder: the HParams tab gets the run's real results at its end
    (:func:`run.loggers.log_final_hparams`). ``purge_step`` (a resume's first step): its events
    file starts with TensorBoard's purge marker, so the points of the run's earlier files at that
    step and later are not shown; the resume's own are.
    """
    extra = {"purge_step": purge_step} if purge_step is not None else {}
    return TensorBoardLogger(
        save_dir=run_dir.parent.parent, name=run_dir.parent.name, version=run_dir.name, default_hp_metric=False,
        **extra,
    )


def run_dashboards(
    run_dir: Path, contents: CheckpointContents, class_names: Sequence[str], names: Sequence[str]
) -> Dashboards:
    """The callback that writes a checkpoint's test results into the run in ``run_dir``, at the step it
    was saved at, through each of the run's loggers ``names`` (as its config records them:
    ``run.loggers.recorded_loggers``).

    That step puts test.py's points on the run's curves where the tested weights came from.
    TensorBoard's events file is added whole or not at all (:class:`StagedRunLogger`); the CSV
    logger writes a new ``RUN/csv/version_N``; MLflow's points go to the run's own MLflow run.
    """
    from run.loggers import build_loggers

    if contents.global_step is None:
        raise UserError(
            f"--log-to-run: {contents.path} is not a checkpoint written by train.py (no training step in it), "
            "so it has no place in the run's curves; leave out --log-to-run"
        )
    others = build_loggers([name for name in names if name != "tensorboard"], run_dir, contents.model_name)
    loggers = ([StagedRunLogger(run_dir)] if "tensorboard" in names else []) + others
    return _RunDashboards(class_names, loggers=loggers, step=contents.global_step)


class _RunDashboards(Dashboards):
    """Dashboards whose staged TensorBoard logger is discarded when the test fails (Ctrl-C, an
    error): the run's events are left as they were."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        for logger in self.loggers or []:
            if isinstance(logger, StagedRunLogger):
                logger.discard()


class StagedRunLogger(TensorBoardLogger):
    """A TensorBoard logger that adds an events file to ``run_dir`` whole or not at all.

    TensorBoard's writer creates its events file at once and writes it from a thread; on a full
    disk that thread dies with a traceback, the next write raises another, and a 0-byte events
    file stays in the run. Here the file is written in a hidden folder inside ``run_dir`` (the
    same file system) and renamed into ``run_dir`` by :meth:`finalize` once closed; a failed
    write (an ``OSError``) becomes one ``UserError`` line, the writer thread's own traceback is not
    printed, and the hidden folder goes (also by :meth:`discard`, when the test fails otherwise).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        # Created by the writer, when the first picture or number is written.
        self._staging: Path | None = run_dir / f".test-log-{os.getpid()}-{secrets.token_hex(4)}"
        super().__init__(save_dir=run_dir, name="", version=self._staging.name, default_hp_metric=False)
        self._guarded: _GuardedWriter | None = None
        self._previous_hook = threading.excepthook
        threading.excepthook = self._quiet_writer_thread

    @property
    def experiment(self) -> Any:
        if self._guarded is None:
            self._guarded = _GuardedWriter(self._write_failed, lambda: TensorBoardLogger.experiment.fget(self))
        return self._guarded

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # Lightning's own turns any error of the writer into "you tried to log ... not supported".
        for name, value in metrics.items():
            self.experiment.add_scalar(name, float(value), step)

    def finalize(self, status: str) -> None:
        if self._staging is None:
            return
        if status != "success":
            self.discard()
            return
        if self._experiment is not None:
            self.experiment.flush()
            self.experiment.close()
        for events in sorted(self._staging.glob("events.out.tfevents.*")):
            os.replace(events, self.run_dir / events.name)
        self.discard()

    def save(self) -> None:
        pass  # the run's hparams.yaml is its training's; nothing else to save here

    def discard(self) -> None:
        """Close the writer, remove what it wrote, and let its thread's errors be printed again."""
        if self._experiment is not None:
            try:
                TensorBoardLogger.experiment.fget(self).close()
            except OSError:
                pass  # what it could not write is being removed
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
        if threading.excepthook == self._quiet_writer_thread:
            threading.excepthook = self._previous_hook

    def _write_failed(self, exc: OSError) -> UserError:
        self.discard()
        return UserError(
            f"--log-to-run: cannot write to the dashboards of {self.run_dir} ({exc.strerror or exc}); nothing was added "
            "to them and the run is as it was; free disk space and test again, or leave out --log-to-run"
        )

    def _quiet_writer_thread(self, args: Any) -> None:
        # The writer thread's error reaches the main thread at its next write, as one line (above).
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            self._previous_hook(args)


class _GuardedWriter:
    """TensorBoard's SummaryWriter, created when first used, whose ``OSError`` becomes ``failed(exc)``."""

    def __init__(self, failed: Any, create: Any) -> None:
        self._failed, self._create, self._writer = failed, create, None

    def __getattr__(self, name: str) -> Any:
        try:
            if self._writer is None:
                self._writer = self._create()
            attribute = getattr(self._writer, name)
        except OSError as exc:
            raise self._failed(exc) from None
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except OSError as exc:
                raise self._failed(exc) from None

        return call

