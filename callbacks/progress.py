"""Console progress: a bar that does not make the host wait for the GPU at every step, epoch lines
for logs, and the run's time left (ETA) with a heads-up when a run will take many hours."""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


def clock_text(seconds: float) -> str:
    """``1:02:03`` for hours, ``2:03`` below an hour."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunClock(L.Callback):
    """How long the rest of the run will take, from the pace so far; one heads-up when that is long.

    The pace is the median time of the finished epochs (training, validation and checkpoints),
    or, within the first epoch, the time per training batch so far times the epoch's batches. The
    epoch a mid-epoch resume came into counts as a whole one: its training time scaled up to all
    its batches, not the few it had left.
    After ``probe_batches`` batches of the first epoch, or at its last batch when it has fewer
    (a short epoch, or the end of one a resume came into), a run projected to last more than
    ``heads_up_hours`` on the CPU prints one line saying so and what shortens it.
    """

    def __init__(self, heads_up_hours: float = 3.0, probe_batches: int = 20) -> None:
        self.heads_up_hours = heads_up_hours
        self.probe_batches = probe_batches
        self.epoch_seconds: list[float] = []
        self._epoch_started = time.monotonic()
        self._batches = 0
        self._batches_left = 0  # of the epoch in progress, after the latest batch
        self._in_epoch = False
        self._warned = False
        self._skipped = 0
        self._trained_until: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)  # a mid-epoch resume starts without that hook

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started, self._batches, self._in_epoch = time.monotonic(), 0, True
        self._skipped = 0  # batches of this epoch trained before a resume came into it
        self._trained_until = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batches == 0:
            self._skipped = batch_idx
        self._batches += 1
        total = trainer.num_training_batches
        self._batches_left = max(0, total - batch_idx - 1) if total not in (0, float("inf")) else 0
        # The probe's batches, or all this epoch has when that is fewer (else no heads-up would come).
        probed = self._batches >= self.probe_batches or (total != float("inf") and batch_idx + 1 >= total)
        if probed and not self._warned and trainer.is_global_zero:
            self._warned = True
            left = self.eta_seconds(trainer)
            if trainer.strategy.root_device.type == "cpu" and left is not None and left > 3600 * self.heads_up_hours:
                faster = ["a GPU (--accelerator gpu)"]
                if not str(trainer.precision).startswith("bf16"):
                    faster.append("--precision bf16-mixed on CPUs with native bfloat16")
                faster.append("a shorter recipe (--epochs, configs/*_fast.yaml)")
                epochs = f"the run's {trainer.max_epochs} epochs"
                if trainer.current_epoch:  # resumed: what is left of them
                    epochs = f"the {trainer.max_epochs - trainer.current_epoch} epochs left of the run's {trainer.max_epochs}"
                print(
                    f"heads-up: at this pace {epochs} take about {left / 3600:.0f} h on "
                    f"this CPU; {', '.join(faster[:-1])} or {faster[-1]} shorten it; Ctrl-C saves the run, "
                    "--resume continues it",
                    flush=True,
                )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._in_epoch and self._trained_until is None:
            self._trained_until = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ended = time.monotonic()
        seconds = ended - self._epoch_started
        if self._skipped and self._batches:
            # The epoch a resume came into trained only its last batches: as a pace it stands for
            # the whole epoch's training (its batches' time scaled up) and its validation as timed.
            trained_until = self._trained_until or ended
            seconds = (trained_until - self._epoch_started) * (self._skipped + self._batches) / self._batches
            seconds += ended - trained_until
        self.epoch_seconds.append(seconds)
        self._in_epoch = False

    def eta_seconds(self, trainer: L.Trainer) -> float | None:
        """Seconds until the last epoch ends, or None before there is a pace to go by."""
        if trainer.max_epochs in (None, -1):
            return None
        in_epoch = time.monotonic() - self._epoch_started
        if self.epoch_seconds:
            per_epoch = statistics.median(self.epoch_seconds)
            rest_of_this = max(0.0, per_epoch - in_epoch)
        elif self._batches and trainer.num_training_batches not in (0, float("inf")):
            per_batch = in_epoch / self._batches
            per_epoch = per_batch * trainer.num_training_batches
            # The batches this epoch still has: not the whole epoch's less those timed, since a
            # resume may have come into the middle of it.
            rest_of_this = per_batch * self._batches_left
        else:
            return None
        epochs_after_this = trainer.max_epochs - trainer.current_epoch - 1
        return (rest_of_this if self._in_epoch else 0.0) + per_epoch * epochs_after_this


class ThrottledProgressBar(RichProgressBar):
    """Lightning's RichProgressBar that never makes the host wait for the device at a training step.

    The stock bar reads every ``prog_bar=True`` value after every training batch, and reading a
    tensor on the GPU (``.item()``) waits for all queued work: the CPU can then no longer queue
    the next step while the GPU runs this one. No step value is on the bar here (the module logs
    epoch values only); the step loss shown is the one ``loss_guard``
    (:class:`callbacks.checkpoints.FiniteLossGuard`) read for logging, once per
    ``--log-every-n-steps`` steps. The bar still advances every batch and refreshes its metrics
    at most every ``metrics_interval`` seconds; those shown at the end of an epoch, of validation
    and of testing are read fresh as usual.

    It also shows the training throughput, ``img/s``: the images of all processes trained between
    two of the guard's reads, over the time between them. A read waits for the device to finish
    the steps queued so far, so that time is the device's, not the host's queueing; the
    measurement adds no wait of its own. Epochs are counted from 1, as the run's summary counts
    them, and Lightning's ``v_num`` (the run's version number) is left out.
    """

    def __init__(
        self, metrics_interval: float = 0.5, clock: RunClock | None = None, loss_guard: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.metrics_interval = metrics_interval
        self.clock = clock
        self.loss_guard = loss_guard
        self._in_train_batch_end = False
        self._metrics: dict[str, Any] | None = None
        self._read_at = float("-inf")
        self._batch_images = 0
        self._previous: Any = None  # the guard's reading that the throughput was last measured from
        self._throughput: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        # A new window: the time since the last read holds validation and checkpointing.
        self._previous = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The batch's size is known on the host (a shape), so counting never waits for the device.
        # Every process trains a batch of the same size at every step.
        self._batch_images = len(batch[0]) * trainer.world_size
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
        for name, value in metrics.items():
            # Accuracies as everything else prints them (the epoch lines, the summary, test.py).
            if name.startswith("acc") and isinstance(value, (int, float)):
                metrics[name] = f"{100 * value:.2f} %"
        reading = getattr(self.loss_guard, "reading", None)
        if self._in_train_batch_end and reading is not None:
            metrics["loss"] = f"{reading.loss:.4g}"
            previous = self._previous
            if previous is not None and reading.step > previous.step and reading.time > previous.time:
                self._throughput = (reading.step - previous.step) * self._batch_images / (reading.time - previous.time)
            if previous is None or reading.step > previous.step:
                self._previous = reading
        if self._throughput is not None:
            metrics["img/s"] = f"{self._throughput:,.0f}"
        left = self.clock.eta_seconds(trainer) if self.clock is not None and trainer.training else None
        if left is not None:
            metrics["run eta"] = clock_text(left)
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

    def __init__(self, enabled: bool | None = None, clock: RunClock | None = None) -> None:
        self.enabled = (not sys.stdout.isatty()) if enabled is None else enabled
        self.clock = clock
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
        left = self.clock.eta_seconds(trainer) if self.clock is not None else None
        if left is not None and trainer.current_epoch + 1 < trainer.max_epochs:
            fields.append(f"run eta {clock_text(left)}")
        print(" | ".join(fields), flush=True)
