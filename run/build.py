"""One assembly: the DataModule, the LightningModule, the callbacks and the Trainer of a run.

Everything is built from a resolved :class:`run.config.RunConfig` and nothing else, so train.py,
test.py and the benchmarks get the same pieces for the same options.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelSummary, RichModelSummary
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

from base.datasets import DatasetInfo
from base.errors import UserError, ctrl_c_raises
from base.schema import DataOptions, NetworkOptions, OptimOptions
from base.slurm import check_layout
from callbacks.checkpoints import (
    AtomicCheckpointIO,
    BackgroundCheckpointIO,
    FiniteLossGuard,
    NamedCheckpoint,
    PreemptionCheckpoint,
)
from callbacks.dashboards import Dashboards
from callbacks.progress import EpochLines, RunClock, ThrottledProgressBar
from callbacks.recipes import TimeToAccuracy, recipe_callbacks
from callbacks.resume import ResumableRNG, SameData
from datamodules import ImageDataModule
from datamodules.augment import resolve_data_path
from lit_modules import ImageClassifier
from models import prepare_backbone
from run.checkpoints import load_backbone_weights
from run.config import RunConfig
from run.hardware import check_shared_memory, worker_failures_explained
from run.loggers import build_loggers
from run.life import FromWeights, Resume, Start, console_kind


def quiet_lightning() -> None:
    """Keep the console to what the user asked for: Lightning's hints are noise in a finished tool."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.accelerators.cuda").setLevel(logging.WARNING)
    # "weights_only was not set" on every save: about what a save includes, not about loading.
    logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").setLevel(logging.WARNING)
    # "Received SIGTERM" also for Ctrl-C, which is forwarded as SIGTERM: the stop is reported by
    # callbacks/checkpoints.py, with the signal's real name.
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*GPU available but not used.*",
        ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ".*LeafSpec.*",
        # A resumed run writes into its own checkpoint folder, which is never empty.
        ".*Checkpoint directory .* exists and is not empty.*",
        # Quick runs have fewer batches than --log-every-n-steps: the epoch values are still logged.
        ".*is smaller than the logging interval.*",
        # The summary's size estimate in bf16; the parameters are fp32 under bf16-mixed anyway.
        ".*is not supported by the model summary.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def build_datamodule(config: RunConfig, dataset_info: DatasetInfo | None = None) -> ImageDataModule:
    """The DataModule of ``config`` (its ``--dataset``). With a fractional ``--limit-*-batches`` below 1
    its splits are loaded already (``prepare_data``, ``setup``), to refuse a fraction that leaves no
    batch (:func:`check_batch_limits`); the Trainer's own ``setup`` then finds them loaded.

    ``dataset_info``: the data set a checkpoint was trained on (test.py), whose classes the data
    must have and whose statistics normalise it (``ImageDataModule``)."""
    datamodule = ImageDataModule(
        config.group(DataOptions), seed=config.seed, channels_last=config.channels_last, dataset_info=dataset_info
    )
    check_batch_limits(config, datamodule)
    device = {"gpu": "cuda"}.get(config.accelerator, config.accelerator)
    if device in ("cpu", "cuda", "mps") and resolve_data_path(config.data_path, torch.device(device)) == "loader":
        # Worker processes hand their batches over in shared memory: float32 3x32x32 images.
        check_shared_memory(config.workers, max(config.batch_size, config.eval_batch_size) * 3 * 32 * 32 * 4)
    return datamodule


# (split, flag, what the message calls its batches, the DataModule stage that loads it)
_LIMITS = (
    ("train", "limit_train_batches", "training", "fit"),
    ("val", "limit_val_batches", "validation", "fit"),
    ("test", "limit_test_batches", "test", "test"),
)


def check_batch_limits(config: RunConfig, datamodule: ImageDataModule) -> None:
    """Refuse, before any training, a fractional ``--limit-*-batches`` that leaves no batch.

    Lightning 2.6 (``_parse_num_batches``) keeps ``int(fraction * batches)`` of each process's
    batches and raises a MisconfigurationException, with a traceback, when that is 0: for the
    test limit only once training is over. This applies the same rule to the same per-process
    counts (:meth:`ImageDataModule.batches_per_process`, over ``devices x nodes`` processes),
    loading the splits concerned only when a fraction below 1 is given. ``--fast-dev-run``
    replaces the limits, so nothing is checked then. Raises ``UserError``.
    """
    if config.fast_dev_run:
        return
    fractions = [
        (split, flag, noun, stage, limit)
        for split, flag, noun, stage in _LIMITS
        # Lightning's own test: a float (an int counts batches), above 0 (0.0 turns the loop off).
        if isinstance(limit := getattr(config, flag), float) and 0.0 < limit < 1.0
    ]
    if not fractions:
        return
    processes = config.hardware.device_count * config.num_nodes
    datamodule.prepare_data()
    for stage in dict.fromkeys(stage for _, _, _, stage, _ in fractions):
        datamodule.setup(stage)
    for split, flag, noun, _, limit in fractions:
        batches = datamodule.batches_per_process(split, processes)
        # No batches at all (--val-size 0) is no validation, which Lightning accepts whatever the limit.
        if batches and int(batches * limit) == 0:
            size = f"batch size {datamodule.batch_size}" if split == "train" else f"eval batch size {datamodule.eval_batch_size}"
            shared = (" per process", f", {processes} processes") if processes > 1 else ("", "")
            raise UserError(
                f"--{flag.replace('_', '-')} {limit:g} is 0 of the {batches} {noun} batches{shared[0]} ({size}{shared[1]}); "
                f"give a fraction of at least {least_fraction(batches)} or a number of batches"
            )


def least_fraction(batches: int) -> str:
    """The smallest fraction of 3 significant digits, as text, that keeps at least one of ``batches``
    (``int(fraction * batches) >= 1``, checked on the value the text reads back as)."""
    step = 10.0 ** (math.floor(math.log10(1 / batches)) - 2)
    # Rounding 1 / batches to 3 digits may round down (1/3 -> 0.333, and int(3 * 0.333) is 0).
    count = math.floor(1 / batches / step)
    while int(batches * float(text := f"{count * step:.3g}")) < 1:
        count += 1
    return text


def build_module(config: RunConfig, dataset: DatasetInfo, start: Start | None = None) -> ImageClassifier:
    """The LightningModule of ``config`` for ``dataset``'s classes; started from weights (``start``,
    ``run.life.FromWeights``), its network has them, built with the run's options (the weights'
    own where they show in the weights: ``run.config.settle``)."""
    module = ImageClassifier(config.group(NetworkOptions), config.group(OptimOptions), dataset)
    if isinstance(start, FromWeights):
        load_backbone_weights(module.backbone, start.weights, dataset.num_classes)
    prepare_backbone(module.backbone, channels_last=config.channels_last, compile=config.compile)
    if config.compile:
        module.example_input_array = None  # the summary's forward would compile one more shape
    return module


@dataclass
class RunCallbacks:
    """The callbacks of a training run, with the ones train.py reads after fitting named."""

    all: list[Callback]
    best: NamedCheckpoint
    latest: NamedCheckpoint
    clock: TimeToAccuracy | None


# At most one last.ckpt per this many seconds, and always after the last epoch (docs/checkpoints.md:
# Where outputs go). Epochs of minutes (any CPU run) save it every epoch; a GPU run whose epochs
# take seconds would otherwise spend as long writing it as training.
LAST_EVERY_S = 60.0


def build_callbacks(config: RunConfig, run_dir: Path, dataset: DatasetInfo) -> RunCallbacks:
    checkpoint_dir = run_dir / "checkpoints"
    best = NamedCheckpoint(
        dirpath=checkpoint_dir,
        filename="best",
        monitor="acc/val",
        mode="max",
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # Its own callback rather than save_last=True: Lightning 2.6 refreshes save_last only in
    # epochs where the monitored checkpoint was also saved; this one saves by time (LAST_EVERY_S),
    # whatever the monitored score did.
    latest = NamedCheckpoint(
        dirpath=checkpoint_dir, filename="last", save_top_k=1, enable_version_counter=False, min_interval_s=LAST_EVERY_S
    )
    periodic = NamedCheckpoint(
        dirpath=checkpoint_dir,
        filename="epoch{epoch:03d}",
        every_n_epochs=config.checkpoint_every,
        save_top_k=-1,
        auto_insert_metric_name=False,
    )
    clock = RunClock()  # the run's ETA, for the bar and the epoch lines
    # In a terminal a live bar; in a log file (nohup, SLURM, CI) one line per epoch, since a
    # live bar draws nothing there until its last frame (console_kind: the same on every rank).
    # Lightning's rich model summary is drawn 80 columns wide where there is no terminal: plain text there.
    loss_guard = FiniteLossGuard()  # logs loss/train_step too: the bar shows what it read
    if console_kind() == "bar":
        console = [ThrottledProgressBar(clock=clock, loss_guard=loss_guard), RichModelSummary()]
    else:
        console = [EpochLines(enabled=True, clock=clock), ModelSummary()]
    # Fast recipes: EMA of the weights, time-to-accuracy benchmark (callbacks/recipes.py).
    extras = recipe_callbacks(config.ema_decay, config.time_to_accuracy)
    callbacks: list[Callback] = [
        best,
        latest,
        periodic,
        LearningRateMonitor(),
        # Confusion matrices, per-class validation accuracy, misclassified test images.
        Dashboards(dataset),
        clock,
        *console,
        # Reliability (callbacks/checkpoints.py, callbacks/resume.py): stop on a NaN loss, save on SIGTERM, exact resume on the same data.
        loss_guard,
        PreemptionCheckpoint(checkpoint_dir / "last.ckpt", requeue_signal=config.requeue_signal),
        ResumableRNG(),
        SameData(),
        *extras,
    ]
    timer = next((callback for callback in extras if isinstance(callback, TimeToAccuracy)), None)
    return RunCallbacks(callbacks, best, latest, timer)


def build_trainer(
    config: RunConfig,
    *,
    logger: Logger | list[Logger] | bool,
    callbacks: list[Callback],
    root_dir: Path | None = None,
    progress_bar: bool = True,
    resume: Resume | None = None,
    background_saves: bool = True,
) -> L.Trainer:
    """The Trainer of ``config``; ``logger``, ``callbacks``, Lightning's own folder and whether it may
    add its progress bar as the caller needs them. ``resume``: the checkpoint a resumed run continues,
    as ``run.life`` read it; Lightning is handed that read instead of reading the file again.
    ``background_saves``: checkpoints written by a thread while training goes on (a run's), or
    whole when ``save_checkpoint`` returns (a Trainer that reads back what it saved on every rank).

    Under SLURM it runs in Lightning's SLURM environment without Lightning's requeue handling
    (``auto_requeue=False``: on SIGUSR1 Lightning would write ``hpc_ckpt_N.ckpt`` into the working
    folder and requeue; ``PreemptionCheckpoint`` saves ``last.ckpt`` and requeues instead), and it
    never loads such a file by itself (:class:`_NoHpcResume`).
    """
    quiet_lightning()
    check_layout(config.hardware.device_count, config.num_nodes)
    devices = list(config.devices) if isinstance(config.devices, tuple) else config.devices
    cluster = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
    writer = AtomicCheckpointIO(preloaded=(resume.path, resume.checkpoint) if resume else None)
    trainer = L.Trainer(
        accelerator=config.accelerator,
        devices=devices,
        num_nodes=config.num_nodes,
        strategy=config.strategy,
        precision=config.precision,
        max_epochs=config.epochs,
        gradient_clip_val=config.gradient_clip_val,
        gradient_clip_algorithm="norm",
        logger=logger,
        callbacks=callbacks,
        plugins=[BackgroundCheckpointIO(writer) if background_saves else writer, *cluster],
        fast_dev_run=config.fast_dev_run,
        limit_train_batches=config.limit_train_batches,
        limit_val_batches=config.limit_val_batches,
        limit_test_batches=config.limit_test_batches,
        log_every_n_steps=config.log_every_n_steps,
        benchmark=config.accelerator == "gpu",
        # Both data paths shard the data between processes themselves (datamodules/), and their
        # training loaders are resumable; a sampler Lightning swapped in would be neither.
        use_distributed_sampler=False,
        default_root_dir=root_dir,
        enable_progress_bar=progress_bar,
    )
    trainer._checkpoint_connector.__class__ = _NoHpcResume
    return trainer


class _NoHpcResume(_CheckpointConnector):
    """Lightning's checkpoint connector, blind to ``hpc_ckpt_N.ckpt`` files.

    Under SLURM, Lightning 2.6 loads the newest ``hpc_ckpt_N.ckpt`` of ``default_root_dir`` (the
    working folder, by default) whenever ``fit``, ``validate`` or ``test`` is given no checkpoint
    path (``_CheckpointConnector._parse_ckpt_path``): a file left by some other run would silently
    replace the weights test.py evaluates, or a new run's start. This project's runs resume only
    from the checkpoint ``--resume`` names.
    """

    @property
    def _hpc_resume_path(self) -> None:
        return None


@dataclass
class Assembly:
    datamodule: ImageDataModule
    module: ImageClassifier
    trainer: L.Trainer
    callbacks: RunCallbacks
    workers: int = 0  # DataLoader workers (--workers): a failure of theirs is explained in one line

    @contextmanager
    def guarded(self, stopped: str) -> Iterator[None]:
        """Ctrl-C outside a training step (setup, sanity check, teardown, where Lightning would end with
        exit code 1) raises ``Interrupted(stopped)``; a DataLoader worker's failure is one line.
        Inside the training steps Ctrl-C saves ``last.ckpt`` (``PreemptionCheckpoint``)."""
        with ctrl_c_raises(stopped), worker_failures_explained(self.workers):
            yield

    def test(self, checkpoint: str | None, stopped: str) -> list[dict[str, float]]:
        """The test metrics of ``checkpoint``'s weights; ``stopped``: what Ctrl-C says (``Interrupted``)."""
        with self.guarded(stopped):
            return self.trainer.test(self.module, datamodule=self.datamodule, ckpt_path=checkpoint, weights_only=True,
                                     verbose=False)


def build_data_and_module(config: RunConfig, start: Start | None = None) -> tuple[ImageDataModule, ImageClassifier]:
    """The seeded DataModule and LightningModule of a run that starts as ``start`` says (default:
    new): everything that can fail on bad input, no run files written (the data is read, or
    downloaded, already when a fractional ``--limit-*-batches`` needs its size)."""
    L.seed_everything(config.seed, workers=True, verbose=False)
    datamodule = build_datamodule(config)
    return datamodule, build_module(config, datamodule.dataset_info, start)


def build_run_loggers(config: RunConfig, run_dir: Path, start: Start | None = None) -> list[Logger]:
    """The run's loggers, one of Lightning's per name of ``config.logger`` (``--logger tensorboard,csv,mlflow``),
    all writing inside ``run_dir`` (layout: ``run.loggers``). A resumed run continues its MLflow run,
    and its TensorBoard curves from the resumed step (:func:`first_logged_step`).
    Raises ``UserError`` for a logger whose library is not installed."""
    resumed_at = first_logged_step(start.checkpoint) if isinstance(start, Resume) else None
    return build_loggers(config.logger, run_dir, config.model, purge_step=resumed_at)


def first_logged_step(checkpoint: dict[str, Any]) -> int | None:
    """The first step a run resumed from ``checkpoint`` logs at: Lightning's count of the batches
    that stepped the optimiser, the x of every curve (None in a checkpoint without loop state).

    Whatever an earlier process of the run logged at that step or later came after the checkpoint
    and is trained again: a crash (``kill -9``, a power cut) after a ``last.ckpt`` leaves those
    points in the events files, where TensorBoard would draw two per step.
    """
    state = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    step = state.get("_batches_that_stepped") if isinstance(state, dict) else None
    return int(step) if isinstance(step, int) else None


def build(
    config: RunConfig,
    run_dir: Path,
    loggers: list[Logger] | None = None,
    parts: tuple[ImageDataModule, ImageClassifier] | None = None,
    start: Start | None = None,
) -> Assembly:
    """Everything a training run needs, writing into ``run_dir`` through ``loggers`` (default: the
    run's own, :func:`build_run_loggers`), for a run that starts as ``start`` says (default: new).

    ``parts`` are what :func:`build_data_and_module` returned, when the caller built them first.
    """
    datamodule, module = parts or build_data_and_module(config, start)
    callbacks = build_callbacks(config, run_dir, datamodule.dataset_info)
    has_bar = any(isinstance(callback, ThrottledProgressBar) for callback in callbacks.all)
    if loggers is None:
        loggers = build_run_loggers(config, run_dir, start)
    trainer = build_trainer(config, logger=loggers, callbacks=callbacks.all, progress_bar=has_bar,
                            resume=start if isinstance(start, Resume) else None)
    return Assembly(datamodule, module, trainer, callbacks, workers=config.workers)
