"""The run's checkpoints, written so that nothing is lost: which files, how each is written, and
the stops that save one.

* :class:`NamedCheckpoint` is the callback of ``best``, ``last`` and the periodic checkpoints.
* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file and renames it into
  place, and refuses to write weights that are NaN or infinite.
* :class:`BackgroundCheckpointIO` is Lightning's ``AsyncCheckpointIO`` with one save in flight at
  most: the training loop goes on while a checkpoint is written, fsynced and renamed into place.
* :class:`PreemptionCheckpoint` saves ``last.ckpt`` when Lightning stops on SIGTERM, Ctrl-C, a
  hang-up (SIGHUP), a CPU-time limit (SIGXCPU) or a requeue signal such as SIGUSR1; the command
  then exits with 143 (130 for Ctrl-C).
* :class:`FiniteLossGuard` stops training with a one-line error as soon as the loss is NaN or
  infinite, before any checkpoint of the diverged weights is written.
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
import os
import shlex
import signal
import struct
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
import torch.distributed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from base.errors import UserError
from base.schema import REQUEUE_SIGNALS, STOP_SIGNALS
from base.slurm import requeue, slurm_task
from base.files import TEMP_SUFFIX, atomic_write, temp_prefix


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
    transfer to the host, the write and the fsync (:class:`AtomicCheckpointIO`,
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


def non_finite_keys(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` that hold a NaN or an infinity.

    One host read per device, not one per tensor: each tensor's check stays on its device, the
    answers are stacked there, and only the stack is read (a ResNet50's ~320 tensors would
    otherwise make the host wait ~320 times at every save, on the default stream).
    """
    checked: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != "meta":
            checked.setdefault(value.device, []).append((key, value))
    bad = []
    for pairs in checked.values():
        finite = torch.stack([torch.isfinite(value).all() for _, value in pairs]).tolist()
        bad += [key for (key, _), ok in zip(pairs, finite) if not ok]
    order = {key: index for index, key in enumerate(tensors)}
    return sorted(bad, key=order.__getitem__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written so that a crash never leaves half a file.

    Each save goes to a hidden ``.NAME.XXXX.tmp`` beside the target, is flushed and fsynced,
    then renamed over the target (``base.files.atomic_write``). An exception or a kill during
    the save leaves the previous checkpoint intact and loadable; a kill can leave a temporary
    file, which the next save of the same checkpoint removes. Only global rank zero writes a
    given checkpoint (Lightning's strategies call ``save_checkpoint`` there alone), so another
    temporary file of the same target is never a save in progress.

    ``preloaded``: a checkpoint already read, with its path: the first load of that path returns
    it instead of reading the file again (a resume's checkpoint, read once by ``run.life.start``).
    """

    def __init__(self, preloaded: tuple[Path, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self._preloaded = preloaded

    def load_checkpoint(self, path: _PATH, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if self._preloaded is not None and Path(path) == self._preloaded[0]:
            # Once: a later load of the same path (the final test of best.ckpt) reads what is there then.
            checkpoint, self._preloaded = self._preloaded[1], None
            return checkpoint
        return super().load_checkpoint(path, *args, **kwargs)

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


class PreemptionCheckpoint(Callback):
    """On SIGTERM, Ctrl-C, a hang-up (``base.schema.STOP_SIGNALS``) and ``requeue_signal``, save ``path``
    so that ``--resume`` continues the run.

    Lightning's ``_SignalConnector`` already catches SIGTERM during ``fit``: it sets
    ``trainer.received_sigterm``, and the loops raise ``SIGTERMException`` at the next safe
    point (after the current batch), which reaches every callback's ``on_exception``. This
    callback writes the checkpoint there, through the Trainer, hence atomically, and waits until
    it and every checkpoint queued before it are on disk. A requeue signal, SIGHUP and SIGXCPU
    are forwarded to the process as SIGTERM, so they follow the very same path, and so is the
    first Ctrl-C (SIGINT); ``received`` names the signal, and a second Ctrl-C exits at once
    with code 130.

    A stop that arrives during validation (or the sanity check) takes effect when that validation
    ends, as Lightning already does for a stop in an epoch's last training batch: the epoch's
    ``acc/val``, its checkpoints and the best score are all written, and the resume starts the
    next epoch. Stopped in the middle, Lightning 2.6 would save a checkpoint that its resume
    takes for "validation done" (``_TrainingEpochLoop``'s ``restarted_on_last``): that epoch's
    validation would never run, and the best checkpoint would be chosen without it.

    Several processes (DDP, SLURM tasks): a signal reaches each at its own moment, and Lightning
    lets each stop at the first safe point after its own (its handler even broadcasts from inside
    the signal handler), so two of them can stop after different batches, one then waiting for
    ever in a collective that the others never join. Here every process only marks the signal it
    got, and at the same steps on every process (each ``log_every_n_steps``-th step and each
    epoch's last batch) they take the largest mark (one all-reduce): if any process got a signal,
    all stop after that same batch, through Lightning's flag, so all of them save together.
    Lightning's own per-step broadcast of its flag is then turned off (a host wait at every step;
    :meth:`_stop_lightning_broadcast`). After the save every process waits at a barrier until
    rank 0's write of ``path`` (queued in the background) is whole: a process that exited first
    would make Lightning's launcher kill the others, rank 0 in the middle of that write.

    Under SLURM (``base.slurm``), a stop on the requeue signal then asks SLURM to requeue the job:
    once ``last.ckpt`` is whole, global rank 0 runs ``scontrol requeue $SLURM_JOB_ID``, once, and
    says in one line whether that worked. The requeued job repeats its command, which resumes the
    run (``--run-name NAME --resume last``). SIGTERM and Ctrl-C never requeue: SLURM sends SIGTERM
    for ``scancel`` and for a preemption that requeues by itself.
    """

    # Lightning's own per-step SIGTERM broadcast off under DDP (False only to measure what it costs:
    # benchmarks/ddp_host_waits.py).
    silence_lightning_broadcast = True

    def __init__(self, path: Path, requeue_signal: str | None = None) -> None:
        if requeue_signal is not None and requeue_signal not in REQUEUE_SIGNALS:
            raise ValueError(f"requeue_signal must be one of {', '.join(REQUEUE_SIGNALS)}, got {requeue_signal!r}")
        self.path = Path(path)
        self.requeue_signal = requeue_signal
        self.received = "SIGTERM"
        self._previous_handlers: dict[int, Any] = {}
        self._stop_after_validation = False
        self._signalled_in_validation = False
        self._lightning_sigterm: Any = None  # Lightning's SIGTERM handler, while validation defers stops
        # Several processes: signals are marked (the largest number got) and stops agreed on.
        self._agree = False
        self._marked = 0
        self._requeued = False
        self._rank = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed here, not in setup: Lightning's signal connector records every handler after
        # setup and puts those back at its teardown, which would leave ours installed for good.
        # Signal handlers can only be installed from the main thread (Lightning skips them too).
        if threading.current_thread() is not threading.main_thread():
            return
        self._agree, self._marked = trainer.world_size > 1, 0
        self._rank = trainer.global_rank
        if self._agree:
            # SIGTERM too is only marked (see the class docstring); Lightning's handler goes back afterwards.
            self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._forward_as_sigterm)
            self._stop_lightning_broadcast(trainer, self.silence_lightning_broadcast)
        # Ctrl-C: the first one stops like SIGTERM (after the batch, saving last.ckpt), a second
        # one aborts at once. Lightning's own handling of KeyboardInterrupt saves nothing.
        self._previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._stop_after_batch)
        # A hang-up or a CPU-time limit would kill the process where it stands, the checkpoints
        # queued to the background writer with it: they stop the run as SIGTERM does instead.
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self._previous_handlers[signum] = signal.signal(signum, self._forward_as_sigterm)
        if self.requeue_signal is not None:
            signum = getattr(signal, self.requeue_signal, None)
            if signum is None:
                raise UserError(f"--requeue-signal {self.requeue_signal}: this platform has no such signal")
            self._previous_handlers[signum] = signal.signal(signum, self._forward_as_sigterm)

    @staticmethod
    def _stop_lightning_broadcast(trainer: L.Trainer, silenced: bool) -> None:
        """Turn Lightning's per-step SIGTERM broadcast off (``silenced``) or back on.

        Under DDP, Lightning 2.6's training epoch loop broadcasts rank 0's SIGTERM flag before every
        training batch and reads it with ``.item()`` (``_TrainingEpochLoop._broadcast_sigterm_tensor``):
        a host wait at every step on a GPU. Here the stop is agreed on instead (every rank's mark, at
        the logging steps), and the agreement sets Lightning's flag on every rank at the same batch,
        where its loop raises ``SIGTERMException`` after the batch anyway; the broadcast adds nothing.
        Lightning offers no option for it, so the loop's method is shadowed on that loop alone.
        """
        loop = trainer.fit_loop.epoch_loop
        if not hasattr(type(loop), "_broadcast_sigterm_tensor"):
            return  # another Lightning: nothing to turn off
        if silenced:
            loop._broadcast_sigterm_tensor = _no_broadcast
        else:
            loop.__dict__.pop("_broadcast_sigterm_tensor", None)

    def _forward_as_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        if self._agree:
            self._marked = max(self._marked, int(signum))
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._agree:
            return
        if trainer.global_step % max(1, trainer.log_every_n_steps) and batch_idx + 1 < trainer.num_training_batches:
            return
        # The same steps on every process, so every process joins this collective.
        marked = torch.tensor(self._marked, device=pl_module.device)
        agreed = int(trainer.strategy.reduce(marked, reduce_op="max"))
        if agreed:
            # Lightning stops every process after this batch, at the same point, as for its own SIGTERM.
            self.received = signal.Signals(agreed).name
            trainer._signal_connector.received_sigterm = True

    def _stop_after_batch(self, signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, _abort_now)
        if self._rank == 0:  # once, not once per process: a terminal's Ctrl-C reaches every one
            _say("\ninterrupted: saving last.ckpt after the current batch (press Ctrl-C again to abort without saving)")
        self._forward_as_sigterm(signum, frame)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
        self._stop_lightning_broadcast(trainer, False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The evaluation loop checks Lightning's flag after every batch. Until validation ends, a
        # SIGTERM only marks the stop as due, and a stop already due (a signal in the epoch's last
        # training batch) is hidden from that check. (Lightning 2.6 keeps the flag in its signal
        # connector; the class docstring says why.) Handlers are the main thread's to change.
        if trainer.state.fn != TrainerFn.FITTING or threading.current_thread() is not threading.main_thread():
            return
        self._stop_after_validation = trainer.received_sigterm
        trainer._signal_connector.received_sigterm = False
        self._signalled_in_validation = False
        self._lightning_sigterm = signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._signalled_in_validation = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._lightning_sigterm is None:
            return
        signal.signal(signal.SIGTERM, self._lightning_sigterm)
        if self._signalled_in_validation and callable(self._lightning_sigterm):
            # The handling it would have had, now: Lightning's flag, or (several processes) the mark.
            self._lightning_sigterm(signal.SIGTERM, None)
        if self._stop_after_validation:
            trainer._signal_connector.received_sigterm = True
        self._lightning_sigterm = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hooks after an exception. The handlers go back only after the
        # save: a second Ctrl-C during it must abort (the previous last.ckpt stays whole), not raise
        # KeyboardInterrupt in the middle of torch.save.
        stopping = isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING
        try:
            if stopping:
                trainer.save_checkpoint(self.path, weights_only=False)  # full state: loops, callbacks, optimiser
                # Checkpoints are written in the background (callbacks.checkpoints): whole before it is said.
                getattr(trainer.strategy.checkpoint_io, "wait", lambda: None)()
                if trainer.is_global_zero:
                    signal_name = "Ctrl-C" if self.received == "SIGINT" else self.received
                    epochs = trainer.fit_loop.epoch_progress.current
                    # At an epoch's end its count is complete already: the stop came between two epochs.
                    where = (f"after epoch {epochs.completed}" if epochs.completed == epochs.ready
                             else f"in epoch {trainer.current_epoch + 1}")
                    _say(
                        f"stopped by {signal_name} {where}, after step "
                        f"{trainer.global_step}: saved {self.path}; continue with: python train.py --resume "
                        f"{shlex.quote(str(self.path.parent.parent))}"
                    )
                    self._requeue_if_asked()
            else:
                # Any other end: the checkpoints already queued are written before a signal's
                # default action (a hang-up) could end the process with them in its queue.
                try:
                    getattr(trainer.strategy.checkpoint_io, "wait", lambda: None)()
                except Exception:  # noqa: BLE001 - Lightning's teardown raises it again, after this exception
                    pass
        finally:
            self._restore_handlers()
            if stopping and trainer.world_size > 1:
                # Only rank 0 writes, and its write may still be queued above while the other ranks
                # are done: one of them exiting (143) makes Lightning's launcher SIGKILL every
                # process (its child-process observer), rank 0's write and requeue included. No
                # rank leaves before rank 0 has finished; on rank 0's error too, or the others
                # would wait for it in a collective until their timeout.
                trainer.strategy.barrier("PreemptionCheckpoint.saved")
        self._stop_lightning_broadcast(trainer, False)

    def _requeue_if_asked(self) -> None:
        """Under SLURM, after a stop on the requeue signal: ``scontrol requeue`` the job, once."""
        task = slurm_task()
        if task is None or self.requeue_signal is None or self.received != self.requeue_signal or self._requeued:
            return
        self._requeued = True
        print(requeue(task.job_id), file=sys.stderr, flush=True)


def _say(line: str) -> None:
    """A line on stderr that is never an error of its own: after a hang-up the terminal may be gone
    (EIO), and the stop it reports has already been saved."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _no_broadcast() -> None:
    """In place of Lightning's per-step SIGTERM broadcast (:meth:`PreemptionCheckpoint._stop_lightning_broadcast`)."""


def _abort_now(signum: int, frame: FrameType | None) -> None:
    # The checkpoints already on disk are whole (atomic writes); nothing else is worth waiting for.
    print("aborted", file=sys.stderr, flush=True)
    os._exit(130)


@dataclass(frozen=True)
class LossReading:
    """One host read of the training loss: its value, the step it was logged at, and when (the
    ``time.monotonic()`` just after the read, which waited for the device to finish that step)."""

    loss: float
    step: int
    time: float


class FiniteLossGuard(Callback):
    """Logs ``loss/train_step`` and ``grad_norm/train`` and stops training with a UserError when the
    loss is NaN or infinite, reading the device once per ``trainer.log_every_n_steps`` steps for all.

    ``grad_norm/train`` is the global L2 norm of all gradients, taken in ``on_before_optimizer_step``
    of the logging steps: Lightning calls it after the backward pass and before it clips
    (``--gradient-clip-val``), so it is the norm clipping compares with its limit (under ``16-mixed``
    without the loss scale). The norm stays on the device until the step's one read.

    Reading a tensor's value on the host (``.item()``) waits for every queued kernel, so the GPU
    runs dry while the host queues the next step. Logged with ``self.log``, the step loss would be
    read by Lightning at its logging steps and this guard's flag would be read again at the same
    steps; here each step only updates, on the device, the first step whose loss was not finite
    (``torch.isfinite`` and ``torch.where``), and at Lightning's logging steps (``global_step %
    log_every_n_steps == 0``) that step and the loss travel to the host in one small tensor. The
    loss then goes straight to the loggers (as Lightning's ``LearningRateMonitor`` logs ``lr``), at
    the step Lightning would have used, and :attr:`reading` keeps it for the progress bar. The flag
    is read once more before each validation and at each epoch's end, outside the training steps,
    before any checkpoint of the epoch. So a diverged run trains at most ``log_every_n_steps`` more
    steps, and the error names the first bad step. Lightning's ``Trainer(detect_anomaly=True)``
    would stop at the first bad step, but it is autograd's debugging mode: far too slow to leave on.

    Under DDP every rank must stop at the same point, or the others wait forever in their next
    collective. Each read therefore takes the minimum over the ranks (one all-reduce, at the same
    steps on every rank); the loss logged is rank 0's batch. Checks on the way into a checkpoint
    (``on_save_checkpoint``, before the file is written, also for a save on SIGTERM) need no
    collective: they look at the weights being saved, which DDP keeps identical on every rank.
    """

    def __init__(self) -> None:
        self._first_bad_step: torch.Tensor | None = None
        self._grad_norm: torch.Tensor | None = None
        self.reading: LossReading | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_bad_step = None
        self._grad_norm = None
        self.reading = None

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # The step about to be taken is a logging step when the count after it is (on_train_batch_end).
        every = trainer.log_every_n_steps
        if not every or (trainer.global_step + 1) % every:
            return
        # The optimiser's parameters: those Lightning clips. Low-precision gradients (bf16-true) are
        # measured in float32, as a bf16 norm would keep only about three significant digits.
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            self._grad_norm = None
            return
        norm = torch.nn.utils.get_total_norm([g if g.dtype == torch.float32 else g.float() for g in grads]).float()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Under 16-mixed a fused optimiser unscales inside its step, so Lightning hands this hook
            # gradients still multiplied by the loss scale: divided here, on the device.
            norm = norm / scaler._scale.to(norm.device)
        self._grad_norm = norm.reshape(1)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        step = trainer.global_step
        loss = loss.detach().float().reshape(())
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        first_seen = self._first_bad_step.lt(0) & ~torch.isfinite(loss)
        self._first_bad_step = torch.where(first_seen, step, self._first_bad_step)
        if trainer.log_every_n_steps and step % trainer.log_every_n_steps == 0:
            # The float32 bits of the loss and the gradient norm ride in the same int64 tensor as
            # the step: one read, and no float64, which some devices (MPS) lack.
            values = [loss.reshape(1)] + ([] if self._grad_norm is None else [self._grad_norm.to(loss.device)])
            bits = torch.cat(values).view(torch.int32).long()
            *value_bits, first_bad = torch.cat([bits, self._reduced_first_bad(trainer).reshape(1)]).tolist()
            loss_value, *grad_norm = (struct.unpack("<f", struct.pack("<i", b))[0] for b in value_bits)
            self._grad_norm = None
            self.reading = LossReading(loss_value, step - 1, time.monotonic())
            if trainer.is_global_zero:
                metrics = {"loss/train_step": loss_value, **({"grad_norm/train": grad_norm[0]} if grad_norm else {})}
                # Lightning logs a step's values at the step count before it (its _batches_that_stepped).
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=self.reading.step)
            self._raise_if_bad(trainer, pl_module, first_bad)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._first_bad_step is not None:
            self._raise_if_bad(trainer, pl_module, int(self._reduced_first_bad(trainer)))

    def _reduced_first_bad(self, trainer: L.Trainer) -> torch.Tensor:
        """The first bad step over all ranks (a collective under DDP), or int64's maximum for none."""
        assert self._first_bad_step is not None
        local = torch.where(self._first_bad_step.lt(0), _NEVER, self._first_bad_step)
        return trainer.strategy.reduce(local, reduce_op="min")

    def _raise_if_bad(self, trainer: L.Trainer, pl_module: L.LightningModule, first_bad: int) -> None:
        if first_bad != _NEVER:
            self._stop(trainer, pl_module, f"the loss became NaN or infinite at step {first_bad}")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = non_finite_keys(checkpoint.get("state_dict", {}))
        if bad:
            what = f"the weights became NaN or infinite by step {trainer.global_step} ({bad[0]})"
            self._stop(trainer, pl_module, what)

    @staticmethod
    def _stop(trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        optim = getattr(pl_module, "optim", None)  # ImageClassifier's optimiser options
        lr = optim.lr if optim is not None and isinstance(optim.lr, float) else None
        advice = f"lower the learning rate (e.g. --lr {lr / 10:g}, now {lr:g})" if lr else "lower the learning rate"
        # Checked at least before every validation and epoch end, so the bad step lies in this epoch.
        raise UserError(
            f"training diverged: {what} (epoch {trainer.current_epoch}); "
            f"stopped without saving the diverged weights; {advice}"
        )


_NEVER = torch.iinfo(torch.long).max
