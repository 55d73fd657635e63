"""The run's checkpoints: Lightning's ModelCheckpoint keyed by file name, movable and throttled, and
checkpoint files written in the background.

* :class:`NamedCheckpoint` is the callback of ``best``, ``last`` and the periodic checkpoints.
* :class:`BackgroundCheckpointIO` is Lightning's ``AsyncCheckpointIO`` with one save in flight at
  most: the training loop goes on while a checkpoint is written, fsynced and renamed into place.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, CheckpointIO


class NamedCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose saved state is keyed by its file name, and survives a moved run folder.

    Lightning keys a callback's state by monitor and frequency only, so two unmonitored
    checkpoint callbacks (the per-epoch ``last`` and the periodic one) would collide.

    Lightning also drops the best score and the kept checkpoints when the checkpoint folder's
    path differs from the one saved (a run folder moved, renamed, copied with rsync): the first
    resumed epoch would then replace ``best.ckpt`` without comparing scores. The checkpoints
    moved with the folder, so their saved paths are rebased onto the new folder instead.
    """

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            monitor=self.monitor,
            mode=self.mode,
            every_n_train_steps=self._every_n_train_steps,
            every_n_epochs=self._every_n_epochs,
            train_time_interval=self._train_time_interval,
            filename=self.filename,
        )

    def __init__(self, *args: Any, min_interval_s: float = 0.0, **kwargs: Any) -> None:
        """``min_interval_s``: skip an epoch's save when the previous one of this callback is more
        recent than that, except at the last epoch (the ``last`` checkpoint of a run whose epochs
        take seconds, where writing it every epoch would cost as much as training).

        Under DDP a save is a collective (every rank builds the checkpoint: the RNG states are
        gathered, then a barrier), so the ranks must agree on it: rank 0 decides from its clock
        and broadcasts the decision, as Lightning's ``train_time_interval`` does. Decided once
        per epoch-end hook, never at a training step (Lightning asks ``_should_skip_saving_checkpoint``
        at every step; a broadcast there would make the host wait at every step)."""
        super().__init__(*args, **kwargs)
        self.min_interval_s = min_interval_s
        self._saved_at: float | None = None
        self._too_recent = False

    def _decide_too_recent(self, trainer: L.Trainer) -> None:
        if self.min_interval_s <= 0:
            return
        recent = self._saved_at is not None and time.monotonic() - self._saved_at < self.min_interval_s
        # Every rank reaches this hook, whatever the rest of the decision: the broadcast always matches.
        self._too_recent = bool(trainer.strategy.broadcast(recent, src=0))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._decide_too_recent(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._decide_too_recent(trainer)
        super().on_validation_end(trainer, pl_module)

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        if super()._should_skip_saving_checkpoint(trainer):
            return True
        final = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        return self._too_recent and not final and not trainer.should_stop

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saved_at = time.monotonic()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and saved != self.dirpath:
            state_dict = _rebase(state_dict, Path(saved), Path(self.dirpath))
        super().load_state_dict(state_dict)


def _rebase(state_dict: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    def moved(path: Any) -> Any:
        if not path:
            return path
        path = Path(path)
        return str(new / path.relative_to(old)) if path.is_relative_to(old) else str(path)

    rebased = dict(state_dict, dirpath=str(new))
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in rebased:
            rebased[key] = moved(rebased[key])
    if "best_k_models" in rebased:
        rebased["best_k_models"] = {moved(path): score for path, score in rebased["best_k_models"].items()}
    return rebased


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Writes checkpoints in a background thread, in order, through ``checkpoint_io``.

    Lightning's ``AsyncCheckpointIO``: the checkpoint's tensors are cloned on the caller's thread
    (a copy on the device, milliseconds) and the ``torch.save`` runs in one worker thread, so the
    transfer to the host, the write and the fsync (``callbacks.reliability.AtomicCheckpointIO``,
    about a second for VGG16's 180 MB with momentum and EMA) overlap with training instead of
    leaving the GPU idle. Unlike it, at most ``max_pending`` saves are queued (an epoch's best,
    last and periodic checkpoint): a further save first waits for the oldest, so memory stays
    bounded when saves come faster than the disk takes them, and an error of a save (a full
    disk) is raised at the next save rather than lost. :meth:`wait` blocks until every queued
    file is whole; Lightning's teardown calls it before ``fit`` returns or raises. A load or a
    removal of a file still queued first waits for its write (Lightning's ``Tuner.lr_find``
    restores the checkpoint it has just saved; read early, it would not exist yet).
    """

    def __init__(self, checkpoint_io: CheckpointIO | None = None, max_pending: int = 3) -> None:
        super().__init__(checkpoint_io)
        self.max_pending = max_pending
        self._pending: deque[tuple[Path, Future]] = deque()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        while len(self._pending) >= self.max_pending:
            self._pending.popleft()[1].result()
        self._ensure_setup()
        assert self._executor is not None and self.checkpoint_io is not None
        # A point-in-time copy, taken on this thread: the tensors change as soon as training goes on.
        snapshot = apply_to_collection(checkpoint, torch.Tensor, lambda tensor: tensor.detach().clone())
        future = self._executor.submit(self.checkpoint_io.save_checkpoint, snapshot, path, storage_options)
        self._pending.append((Path(path), future))

    def wait(self, path: Any = None) -> None:
        """Block until every queued save is on disk, or (``path`` given) the saves queued up to the
        last one of ``path``; raise the first error if one failed."""
        target = None if path is None else Path(path)
        while self._pending and (target is None or any(queued == target for queued, _ in self._pending)):
            self._pending.popleft()[1].result()

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.wait(path)
        return super().load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.wait(path)
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            super().teardown()
