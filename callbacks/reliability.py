"""Training that loses nothing: atomic checkpoints, exact resume, preemption, divergence guard.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file and renames it into
  place, and refuses to write weights that are NaN or infinite.
* :class:`ResumableRNG` puts the torch / numpy / python RNG states into each checkpoint and puts
  them back before the resumed epoch's data iterator is built, so shuffling, augmentation and
  dropout continue exactly where they stopped.
* :class:`PreemptionCheckpoint` saves ``last.ckpt`` when Lightning stops on SIGTERM, Ctrl-C or a
  requeue signal such as SIGUSR1; ``cli.flags.run_main`` then exits with 143 (130 for Ctrl-C).
* :class:`FiniteLossGuard` stops training with a one-line error as soon as the loss is NaN or
  infinite, before any checkpoint of the diverged weights is written.
"""
from __future__ import annotations

import hashlib
import os
import random
import shlex
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from base.errors import UserError
from base.options import REQUEUE_SIGNALS
from base.files import TEMP_SUFFIX, atomic_write, temp_prefix



def non_finite_keys(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity."""
    # One host sync per tensor, but only when a checkpoint is written, which copies every
    # tensor to the host anyway.
    return [
        key
        for key, value in tensors.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.device.type != "meta"
        and not bool(torch.isfinite(value).all())
    ]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written so that a crash never leaves half a file.

    Each save goes to a hidden ``.NAME.XXXX.tmp`` beside the target, is flushed and fsynced,
    then renamed over the target (``base.files.atomic_write``). An exception or a kill during
    the save leaves the previous checkpoint intact and loadable; a kill can leave a temporary
    file, which the next save of the same checkpoint removes. Only global rank zero writes a
    given checkpoint (Lightning's strategies call ``save_checkpoint`` there alone), so another
    temporary file of the same target is never a save in progress.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        bad = non_finite_keys(checkpoint.get("state_dict", {}))
        if bad:
            raise UserError(
                f"refusing to write checkpoint {path}: {len(bad)} weight tensor(s) hold NaN or infinite values "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); training diverged, lower --lr"
            )
        try:
            atomic_write(path, lambda f: torch.save(checkpoint, f))
        except OSError as exc:
            raise UserError(
                f"cannot write checkpoint {path} ({exc.strerror or exc}); the previous one is intact; "
                "free disk space or choose another --output-dir"
            ) from exc
        for leftover in path.parent.glob(f"{temp_prefix(path)}*{TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain Python values (``torch.load(weights_only=True)``-safe)."""
    algorithm, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, python_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "algorithm": str(algorithm),
            "keys": [int(k) for k in keys],
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": list(python_state), "gauss_next": gauss_next},
    }
    # Only when this process already uses CUDA: asking would otherwise initialise it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["algorithm"],
            np.array(numpy["keys"], dtype=np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
    cuda = state.get("cuda")
    # A checkpoint resumed on another machine may have other GPUs: their streams start afresh.
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class ResumableRNG(Callback):
    """Saves the global RNG states in every checkpoint and restores them when fitting resumes.

    Lightning restores model, optimiser, scheduler and loop state, but not the RNGs that drive
    the DataLoader's shuffle (its seed is drawn from torch's global RNG when the epoch's
    iterator is created), the augmentation and dropout. Without them a resumed run trains on
    other batches than the uninterrupted one would have.

    When the states go back matters. A resumed fit builds the first iterator in
    ``FitLoop.setup_data`` (and, unlike later epochs, not again in the epoch loop), before any
    epoch hook runs. The only hook that comes earlier is the callback's ``load_state_dict``,
    called from ``Trainer._run`` while restoring the checkpoint; between it and that iterator
    nothing draws from the global RNGs (the sanity check runs under ``isolate_rng``). The saved
    states, in turn, are those at the end of an epoch, after which the uninterrupted run draws
    nothing until it builds the next epoch's iterator. So both runs build that iterator from the
    same RNG state. Not exact with ``--workers`` > 0: persistent worker processes keep their own
    RNG streams across epochs, and those are not in the checkpoint.
    """

    def __init__(self) -> None:
        self._fitting = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning also restores callbacks for trainer.test(ckpt_path=...): that must not
        # rewind the RNGs of a process that may train again.
        self._fitting = stage == "fit"

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._fitting:
            restore_rng_state(state_dict)


def data_fingerprint(datamodule: L.LightningDataModule) -> dict[str, Any]:
    """Which training and validation images ``datamodule`` (set up) serves: their counts, and a hash
    of the labels in split order with every 64th image's pixels. Cheap; another data set, or the
    same images in another order (hence another validation split), changes it."""
    digest = hashlib.sha1()
    for split in (datamodule.train_set, datamodule.val_set):
        step = max(1, len(split.labels) // 64)
        digest.update(split.labels.cpu().numpy().tobytes())
        digest.update(split.images[::step].cpu().numpy().tobytes())
    return {"train_images": len(datamodule.train_set.labels), "val_images": len(datamodule.val_set.labels),
            "sha1": digest.hexdigest()[:16]}


def check_same_data(saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> None:
    """Refuse to resume a run whose checkpoint saved the fingerprint ``saved`` on data that gives ``now``.

    ``--data-dir`` may move with the data; other data would continue the run on images its best
    score was not measured on. Checkpoints from before the fingerprint (None) are not checked.
    """
    if not saved or dict(saved) == dict(now):
        return
    counts = lambda f: f"{f['train_images']:,} training and {f['val_images']:,} validation images"  # noqa: E731
    same = counts(saved) == counts(now)
    raise UserError(
        f"this is not the data the run was trained on ({counts(saved)}; this data gives "
        + ("as many, but other images or another order" if same else counts(now))
        + "): resume with the run's own --data-dir, or start a new run from its weights with --weights"
    )


class SameData(Callback):
    """Saves :func:`data_fingerprint` of the run's data in every checkpoint, for
    :func:`check_same_data` when the run is resumed."""

    def __init__(self) -> None:
        self.fingerprint: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.datamodule is not None:
            self.fingerprint = data_fingerprint(trainer.datamodule)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.fingerprint)


class PreemptionCheckpoint(Callback):
    """On SIGTERM, Ctrl-C and ``requeue_signal``, save ``path`` so that ``--resume`` continues the run.

    Lightning's ``_SignalConnector`` already catches SIGTERM during ``fit``: it sets
    ``trainer.received_sigterm``, and the loops raise ``SIGTERMException`` at the next safe
    point (after the current batch), which reaches every callback's ``on_exception``. This
    callback writes the checkpoint there, through the Trainer, hence atomically. A requeue
    signal is forwarded to the process as SIGTERM, so it follows the very same path, and so is
    the first Ctrl-C (SIGINT); ``received`` names the signal, and a second Ctrl-C exits at once
    with code 130.
    """

    def __init__(self, path: Path, requeue_signal: str | None = None) -> None:
        if requeue_signal is not None and requeue_signal not in REQUEUE_SIGNALS:
            raise ValueError(f"requeue_signal must be one of {', '.join(REQUEUE_SIGNALS)}, got {requeue_signal!r}")
        self.path = Path(path)
        self.requeue_signal = requeue_signal
        self.received = "SIGTERM"
        self._previous_handlers: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, not in setup: Lightning's signal connector records every handler after
        # setup and puts those back at its teardown, which would leave ours installed for good.
        # Signal handlers can only be installed from the main thread (Lightning skips them too).
        if threading.current_thread() is not threading.main_thread():
            return
        # Ctrl-C: the first one stops like SIGTERM (after the batch, saving last.ckpt), a second
        # one aborts at once. Lightning's own handling of KeyboardInterrupt saves nothing.
        self._previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._stop_after_batch)
        if self.requeue_signal is not None:
            signum = getattr(signal, self.requeue_signal, None)
            if signum is None:
                raise UserError(f"--requeue-signal {self.requeue_signal}: this platform has no such signal")
            self._previous_handlers[signum] = signal.signal(signum, self._forward_as_sigterm)

    def _forward_as_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        os.kill(os.getpid(), signal.SIGTERM)

    def _stop_after_batch(self, signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, _abort_now)
        print(
            "\ninterrupted: saving last.ckpt after the current batch (press Ctrl-C again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )
        self._forward_as_sigterm(signum, frame)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hooks after an exception. The handlers go back only after the
        # save: a second Ctrl-C during it must abort (the previous last.ckpt stays whole), not raise
        # KeyboardInterrupt in the middle of torch.save.
        try:
            if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
                trainer.save_checkpoint(self.path, weights_only=False)  # full state: loops, callbacks, optimiser
                if trainer.is_global_zero:
                    signal_name = "Ctrl-C" if self.received == "SIGINT" else self.received
                    print(
                        f"stopped by {signal_name} in epoch {trainer.current_epoch + 1}, after step "
                        f"{trainer.global_step}: saved {self.path}; continue with: python train.py --resume "
                        f"{shlex.quote(str(self.path.parent.parent))}",
                        file=sys.stderr,
                    )
        finally:
            self._restore_handlers()


def _abort_now(signum: int, frame: FrameType | None) -> None:
    # The checkpoints already on disk are whole (atomic writes); nothing else is worth waiting for.
    print("aborted", file=sys.stderr, flush=True)
    os._exit(130)


class FiniteLossGuard(Callback):
    """Stops training with a UserError when the training loss is NaN or infinite.

    Checking each step's loss on the host would wait for the GPU at every step. Instead each
    step only updates a flag on the loss's device (``torch.isfinite`` and ``torch.where``, no
    sync), and the host reads it every ``trainer.log_every_n_steps`` steps, where Lightning's
    logging waits for the device anyway, and after each epoch's last batch, before validation
    and the epoch's checkpoints. So a diverged run trains at most ``log_every_n_steps`` more
    steps, and the error names the first bad step, as recorded on the device. Lightning's own
    ``Trainer(detect_anomaly=True)`` would stop at the first bad step, but it is autograd's
    debugging mode, which checks every backward operation and records a traceback for each
    forward one: far too slow to leave on.

    Under DDP every rank must stop at the same point, or the others wait forever in their next
    collective. Each check therefore takes the minimum over the ranks (one all-reduce, at the
    same steps on every rank, like Lightning's own per-step SIGTERM broadcast). Checks on the
    way into a checkpoint (``on_save_checkpoint``, run before the file is written, also for a
    save on SIGTERM) need no collective: they look at the weights being saved, which DDP keeps
    identical on every rank, and a NaN loss on any rank makes them NaN at the next step.
    """

    def __init__(self) -> None:
        self._first_bad_step: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_bad_step = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        step = trainer.global_step
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        first_seen = self._first_bad_step.lt(0) & ~torch.isfinite(loss.detach()).all()
        self._first_bad_step = torch.where(first_seen, step, self._first_bad_step)
        if step % trainer.log_every_n_steps == 0 or batch_idx + 1 >= trainer.num_training_batches:
            # Every rank takes the minimum, so all of them stop together.
            never = torch.iinfo(torch.long).max
            local = torch.where(self._first_bad_step.lt(0), never, self._first_bad_step)
            first_bad = int(trainer.strategy.reduce(local, reduce_op="min"))
            if first_bad != never:
                self._stop(trainer, pl_module, f"the loss became NaN or infinite at step {first_bad}")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = non_finite_keys(checkpoint.get("state_dict", {}))
        if bad:
            what = f"the weights became NaN or infinite by step {trainer.global_step} ({bad[0]})"
            self._stop(trainer, pl_module, what)

    @staticmethod
    def _stop(trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        lr = pl_module.hparams.get("lr") if isinstance(pl_module.hparams, Mapping) else None
        advice = f"lower the learning rate (e.g. --lr {lr / 10:g}, now {lr:g})" if lr else "lower the learning rate"
        # Checked at least after every epoch's last batch, so the bad step lies in this epoch.
        raise UserError(
            f"training diverged: {what} (epoch {trainer.current_epoch}); "
            f"stopped without saving the diverged weights; {advice}"
        )
