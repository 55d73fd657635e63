"""A progress bar that does not make the host wait for the GPU after every training step."""
from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class ThrottledProgressBar(RichProgressBar):
    """Lightning's RichProgressBar, reading the logged metrics at most every ``metrics_interval`` s.

    The stock bar reads every ``prog_bar=True`` value after every training batch, and reading a
    tensor on the GPU (``.item()``) waits for all queued work: the CPU can then no longer queue
    the next step while the GPU runs this one. This bar still advances every batch, but shows
    metrics read at most once per interval, so on a GPU running tens of steps a second the host
    waits a couple of times a second instead of at every step. Metrics shown at the end of an
    epoch, of validation and of testing are read fresh as usual.
    """

    def __init__(self, metrics_interval: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_interval = metrics_interval
        self._in_train_batch_end = False
        self._metrics: dict[str, Any] | None = None
        self._read_at = float("-inf")

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._in_train_batch_end = True
        try:
            super().on_train_batch_end(*args, **kwargs)
        finally:
            self._in_train_batch_end = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            super().on_train_epoch_end(trainer, pl_module)
            return
        # The stock bar reads the epoch's metrics here, on rank 0 alone (the others have no bar)
        # and before Lightning computes them on every rank. Computing a synced value (sync_dist,
        # torchmetrics) starts a collective that the other ranks start only later, after any
        # collective of another callback's epoch-end hook (FiniteLossGuard's): the processes
        # then exchange mismatched data or hang. The epoch's values are shown from the next read
        # on, once every rank has computed them.
        self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        now = time.monotonic()
        if self._in_train_batch_end and self._metrics is not None and now - self._read_at < self.metrics_interval:
            return self._metrics
        self._metrics = super().get_metrics(trainer, pl_module)
        self._read_at = now
        return self._metrics
