"""A run's TensorBoard side: its logger, test.py's additions to it, and the final hparams."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

from base.errors import UserError
from callbacks.dashboards import Dashboards
from run.checkpoints import CheckpointContents


def run_logger(run_dir: Path) -> TensorBoardLogger:
    """The TensorBoard logger that writes into ``run_dir``, new or existing.

    No ``hp_metric`` placeholder: the HParams tab gets the run's real results at its end
    (:func:`log_final_hparams`).
    """
    return TensorBoardLogger(
        save_dir=run_dir.parent.parent, name=run_dir.parent.name, version=run_dir.name, default_hp_metric=False
    )


def run_dashboards(run_dir: Path, contents: CheckpointContents, class_names: Sequence[str]) -> Dashboards:
    """The callback that writes a checkpoint's test results into ``run_dir``, at the step it was saved at.

    That step puts test.py's points on the run's curves where the tested weights came from.
    """
    if contents.global_step is None:
        raise UserError(
            f"--log-to-run: {contents.path} is not a checkpoint written by train.py (no training step in it), "
            "so it has no place in the run's curves; leave out --log-to-run"
        )
    return Dashboards(class_names, logger=run_logger(run_dir), step=contents.global_step)


def log_final_hparams(
    logger: TensorBoardLogger, config: Mapping[str, Any], metrics: Mapping[str, float | None], step: int
) -> None:
    """Record the run's options with its final results, for TensorBoard's HParams tab, and flush.

    Metrics that a run does not have (no test after ``--fast-dev-run``) are left out rather than
    written as a made-up number.
    """
    logger.log_hyperparams(dict(config), {name: value for name, value in metrics.items() if value is not None}, step=step)
    logger.finalize("success")
