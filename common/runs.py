"""Run folders of train.py (``OUTPUT_DIR/<model>/version_N``): recognising them and logging into them.

Shared by train.py, which creates and resumes runs, and ``test.py --log-to-run``, which adds a
checkpoint's test results to the dashboards of the run that wrote it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger

from common.checkpoints import CheckpointContents
from common.errors import UserError
from lit_modules.dashboards import Dashboards

CONFIG_NAME = "config.yaml"


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run folder that train.py wrote ``checkpoint`` into, or None for a checkpoint from elsewhere."""
    folder = checkpoint.resolve().parent
    run = folder.parent
    return run if folder.name == "checkpoints" and (run / CONFIG_NAME).is_file() else None


def run_logger(run_dir: Path) -> TensorBoardLogger:
    """The TensorBoard logger that writes into ``run_dir``, new or existing.

    No ``hp_metric`` placeholder: the HParams tab gets the run's real results at its end
    (:func:`log_final_hparams`).
    """
    return TensorBoardLogger(
        save_dir=run_dir.parent.parent, name=run_dir.parent.name, version=run_dir.name, default_hp_metric=False
    )


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
