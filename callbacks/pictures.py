"""Pictures to whichever of a run's loggers take them: TensorBoard and MLflow; CSV takes none.

A run may log to any set of Lightning loggers (``--logger tensorboard,csv,mlflow``, built by
``run.loggers``). The dashboards' pictures (confusion matrices, the misclassified grid, the
learning-rate range test's plot) go to each logger that shows images:

- ``TensorBoardLogger``: its ``SummaryWriter.add_image``, at the given step (the Images tab);
- ``MLFlowLogger``: its ``MlflowClient.log_image`` with ``key`` and ``step`` (MLflow's image
  artifacts of the run, ``artifacts/images/<tag>+step+<step>...png``, shown per step in its UI);
- any other logger (``CSVLogger``: numbers only) is skipped silently.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def takes_images(logger: Logger) -> bool:
    """Whether ``logger`` shows pictures (TensorBoard, MLflow)."""
    return isinstance(logger, (TensorBoardLogger, MLFlowLogger))


def image_loggers(loggers: Iterable[Logger]) -> list[Logger]:
    """The loggers of ``loggers`` that show pictures, in their order."""
    return [logger for logger in loggers if takes_images(logger)]


def figure_to_array(figure: Figure) -> np.ndarray:
    """The figure rendered as an RGB uint8 array (H, W, 3), the layout both loggers' images take."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_image(logger: Logger, tag: str, image: np.ndarray, step: int) -> None:
    """Write ``image`` (H, W, 3) uint8 RGB as ``tag`` at training step ``step`` to ``logger``;
    nothing for a logger that takes no pictures."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image, key=tag, step=step)


def log_figure(loggers: Iterable[Logger], tag: str, figure: Figure, step: int) -> None:
    """Render ``figure`` once and write it as ``tag`` at ``step`` to each of ``loggers`` that takes pictures."""
    takers = image_loggers(loggers)
    if not takers:
        return
    image = figure_to_array(figure)
    for logger in takers:
        log_image(logger, tag, image, step)
