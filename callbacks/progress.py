"""Console progress: a bar that does not make the host wait for the GPU at every step, and epoch lines for logs."""
from __future__ import annotations

import sys
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

    Besides the logged metrics it shows the training throughput, ``img/s``: the images of all
    processes trained between two of those reads, over the time between them. A read waits for
    the device to finish the steps queued so far, so that time is the device's, not the host's
    queueing; the measurement adds no wait of its own. Epochs are counted from 1, as the run's
    summary counts them, and Lightning's ``v_num`` (the run's version number) is left out.
    """

    def __init__(self, metrics_interval: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics_interval = metrics_interval
        self._in_train_batch_end = False
        self._metrics: dict[str, Any] | None = None
        self._read_at = float("-inf")
        self._window_start = 0.0
        self._window_images = 0
        self._throughput: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # A run resumed in the middle of an epoch enters it without on_train_epoch_start.
        self._window_start, self._window_images = time.monotonic(), 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # A new window: the time since the last read holds validation and checkpointing.
        self._window_start, self._window_images = time.monotonic(), 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The batch's size is known on the host (a shape), so counting never waits for the device.
        # Every process trains a batch of the same size at every step.
        self._window_images += len(batch[0]) * trainer.world_size
        self._in_train_batch_end = True
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
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
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if self._in_train_batch_end:
            read = time.monotonic()  # after the read, which waited for the device
            if self._window_images and read > self._window_start:
                self._throughput = self._window_images / (read - self._window_start)
            self._window_start, self._window_images = read, 0
        if self._throughput is not None:
            metrics["img/s"] = f"{self._throughput:,.0f}"
        self._metrics = metrics
        self._read_at = now
        return metrics

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's own (a private hook of RichProgressBar) says "Epoch 0/249" for the first of
        # 250 epochs; padded as Lightning pads it, so that the bar does not jump at validation.
        total = f"/{self.trainer.max_epochs}" if self.trainer.max_epochs not in (None, -1) else ""
        return f"Epoch {current_epoch + 1}{total}".ljust(len(self.validation_description))


class EpochLines(L.Callback):
    """One plain line per epoch (losses, accuracies, rate, throughput, time) for logs.

    A live progress bar draws nothing into a file until the run ends, so a run writing to a log
    (nohup, SLURM, CI, benchmarks/accuracy.py) would show no progress for hours. Where standard
    output is not a terminal, or when ``enabled`` is true, this prints a line after each epoch's
    validation instead. The values are the epoch's, read once per epoch; the throughput counts the
    images of all processes trained before validation started.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = (not sys.stdout.isatty()) if enabled is None else enabled
        self._started = 0.0
        self._trained_until: float | None = None
        self._images = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed in the middle of an epoch enters it without on_train_epoch_start.
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._trained_until, self._images = time.monotonic(), None, 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._images += len(batch[0]) * trainer.world_size

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._trained_until is None:
            self._trained_until = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        # Every process reads (computes) the epoch's metrics here, in the same order: a synced
        # value read on rank 0 alone would start a collective the other ranks never join.
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        if not trainer.is_global_zero:
            return
        ended = time.monotonic()
        trained = (self._trained_until or ended) - self._started
        fields = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        for stage, loss, accuracy in (("train", "loss/train_epoch", "acc/train"), ("val", "loss/val", "acc/val")):
            if loss in metrics or accuracy in metrics:
                shown = [f"loss {metrics[loss]:.4f}"] if loss in metrics else []
                shown += [f"acc {100 * metrics[accuracy]:.2f} %"] if accuracy in metrics else []
                fields.append(f"{stage} " + " ".join(shown))
        if trainer.optimizers:
            fields.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        if trained > 0:
            fields.append(f"{self._images / trained:,.0f} img/s")
        fields.append(f"{ended - self._started:.1f} s")
        print(" | ".join(fields), flush=True)
