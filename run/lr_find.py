"""The learning-rate range test (``--find-lr``, ``--lr find``): Lightning's ``Tuner.lr_find`` on the run's
own network, data, optimiser and batch size.

Smith, "Cyclical Learning Rates for Training Neural Networks" (2017): train for a few steps while
the learning rate grows exponentially from ``MIN_LR`` to ``MAX_LR``, record the loss, and suggest
the rate where the loss falls fastest (Lightning's suggestion: the steepest negative gradient of
the smoothed loss curve). Lightning swaps in its own schedule for the test, whatever the run's
scheduler, and puts the weights back afterwards; its temporary checkpoint goes to a scratch
folder that is removed, so nothing is left behind but the plot and the numbers.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.tuner import Tuner, lr_finder

from base.errors import UserError, ctrl_c_raises
from base.files import atomic_write, atomic_write_text
from callbacks.pictures import log_figure
from run.build import build_data_and_module, build_trainer, check_batch_limits
from run.config import RunConfig
from run.hardware import worker_failures_explained
from run.loggers import build_loggers, check_loggers, dashboards_hint
from run.life import console_kind, open_range_test

if TYPE_CHECKING:
    import lightning as L

MIN_LR, MAX_LR, STEPS = 1e-6, 1.0, 100


@dataclass
class LrFinding:
    """The range test's outcome: the suggested rate, and the curve (rates and smoothed losses)."""

    suggestion: float
    lrs: list[float]
    losses: list[float]
    figure: Any  # matplotlib Figure of loss against learning rate, the suggestion marked
    # Whether this process is rank 0 of the test's processes (the one that reports and writes it).
    is_global_zero: bool = True

    def describe(self) -> str:
        return (f"learning-rate range test: suggested lr {self.suggestion:.3g} (swept {MIN_LR:g} to {MAX_LR:g} "
                f"over {len(self.lrs)} steps)")

    def save(self, folder: Path) -> Path:
        """Write ``lr_find.png`` and ``lr_find.json`` into ``folder``; returns the picture's path."""
        picture = folder / "lr_find.png"
        atomic_write(picture, lambda file: self.figure.savefig(file, format="png", dpi=100))
        numbers = {"suggestion": self.suggestion, "min_lr": MIN_LR, "max_lr": MAX_LR, "lrs": self.lrs, "losses": self.losses}
        atomic_write_text(folder / "lr_find.json", json.dumps(numbers, indent=1) + "\n")
        return picture


@contextmanager
def sweep_bar(shown: bool) -> Iterator[None]:
    """Within the block, Lightning's range test draws its "Finding best initial lr" bar only if ``shown``.

    That bar is not the Trainer's (``enable_progress_bar`` does not turn it off): the test's own
    callback (``lightning.pytorch.tuner.lr_finder._LRCallback``) always opens a tqdm bar on
    standard error, which in a log file is one long line of carriage-return updates. Hidden, the
    module is handed a tqdm that is disabled, and its own is put back afterwards.
    """
    bar = getattr(lr_finder, "tqdm", None)
    if shown or bar is None:
        yield
        return
    lr_finder.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        lr_finder.tqdm = bar


def find_lr(config: RunConfig, before_launch: Callable[[], None] | None = None) -> LrFinding:
    """Run the range test for ``config`` (its ``lr`` is ignored); a UserError when it suggests nothing.

    ``before_launch``: called once the data and the limits are checked, before the test's Trainer
    starts the other DDP processes (Lightning's launcher, ``--devices N``): what they must inherit,
    such as the run folder, is made there, and nothing is made for a refused command."""
    # Any number will do for building: the test sets the optimiser's rate at every step.
    # Enough epochs for STEPS steps however small the data: Lightning's test stops at max_epochs too.
    # No test limit: the range test never tests.
    probe = dataclasses.replace(config, lr=MIN_LR, fast_dev_run=0, limit_val_batches=0, limit_test_batches=None,
                                epochs=max(config.epochs, STEPS))
    datamodule, module = build_data_and_module(probe)
    if not config.find_lr:
        # --lr find: a run follows, whose validation and test limits are refused now, not after the test.
        check_batch_limits(config, datamodule)
    datamodule.prepare_data()
    if before_launch is not None:
        before_launch()
    # Lightning's own bars for the test in a terminal; in a log file they would print every step.
    # Decided as the run's console is (once, by rank 0): the Trainer's bar is a callback of every rank.
    in_terminal = console_kind() == "bar"
    with tempfile.TemporaryDirectory(prefix="lr-find-") as scratch, sweep_bar(in_terminal and sys.stderr.isatty()):
        # Lightning saves the weights before the test and every rank reads them back after it: written
        # whole before the save returns, since only rank 0 would know to wait for a background write.
        trainer = build_trainer(probe, logger=False, callbacks=[], root_dir=Path(scratch), progress_bar=in_terminal,
                                background_saves=False)
        # Lightning ends a Ctrl-C inside the Trainer with exit code 1 and a message about missing
        # callbacks; the range test keeps nothing, so a Ctrl-C simply ends it (exit 130).
        with ctrl_c_raises("stopped by Ctrl-C during the learning-rate range test; nothing was trained or saved"), \
                worker_failures_explained(config.workers):
            finder = Tuner(trainer).lr_find(
                module, datamodule=datamodule, min_lr=MIN_LR, max_lr=MAX_LR, num_training=STEPS, update_attr=False,
                # The whole sweep, always: Lightning's default stops once the loss is 4x its best, which
                # a noisy first few batches can trigger before there is a curve to suggest from.
                early_stop_threshold=None,
            )
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None:
        raise UserError(
            "the learning-rate range test found no falling stretch in the loss to suggest a rate from "
            "(too few training batches?); pass a number to --lr"
        )
    figure = finder.plot(suggest=True)
    figure.axes[0].set_title(f"{config.model}, {config.optimizer}, batch {config.batch_size}: suggested lr {suggestion:.3g}")
    return LrFinding(float(suggestion), [float(x) for x in finder.results["lr"]],
                     [float(x) for x in finder.results["loss"]], figure, trainer.is_global_zero)


def find_lr_only(config: RunConfig) -> Path:
    """``--find-lr``: the range test alone, its plot and numbers in ``OUTPUT_DIR/MODEL/lr_find/version_N``."""
    check_loggers(config.logger)
    with open_range_test(config.output_dir, config.model) as folder:
        if folder.inherited:
            find_lr(config)  # a DDP worker takes part in rank 0's test; rank 0 writes the results
            return folder.path
        print(f"learning-rate range test: {config.model}, {config.optimizer}, batch {config.batch_size}, rate from "
              f"{MIN_LR:g} to {MAX_LR:g} over {STEPS} steps", flush=True)
        finding = find_lr(config, folder.make)
    picture = finding.save(folder.path)
    # The plot, to the loggers of --logger that take pictures (a CSV logger has no number to take).
    takers = [name for name in config.logger if name != "csv"]
    loggers = build_loggers(takers, folder.path, config.model)
    log_figure(loggers, "lr_find", finding.figure, step=0)
    for logger in loggers:
        logger.finalize("success")
    print(finding.describe())
    print(f"plot: {picture}" + (f" (also in {dashboards_hint(folder.path, takers)})" if takers else ""))
    print(f"train with it: python train.py --lr {finding.suggestion:.3g} ..., or let train.py do both: --lr find")
    return folder.path


def settle_lr(config: RunConfig, before_launch: Callable[[], None]) -> tuple[RunConfig, LrFinding | None]:
    """``--lr find``: the range test before the run, and ``config`` with the rate it suggests (what the
    run records is what it uses); ``config`` as it is, and no finding, for any other ``--lr``.
    ``before_launch``: as :func:`find_lr`'s (the run's folder is opened there)."""
    if config.lr != "find":
        return config, None
    finding = find_lr(config, before_launch)
    if finding.is_global_zero:
        print(finding.describe(), flush=True)
    return dataclasses.replace(config, lr=finding.suggestion), finding


def keep_finding(finding: LrFinding | None, run_dir: Path, trainer: L.Trainer) -> None:
    """The range test of ``--lr find`` kept with its run, on rank 0: its plot and numbers in the run's
    folder, the plot in its dashboards."""
    if finding is not None and trainer.is_global_zero:
        finding.save(run_dir)
        log_figure(trainer.loggers, "lr_find", finding.figure, step=0)
