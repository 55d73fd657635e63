"""Exact resume: a continued run draws the same random numbers and reads the same data.

* :class:`ResumableRNG` puts the torch / numpy / python RNG states into each checkpoint and puts
  them back before the resumed epoch's data iterator is built, so shuffling, augmentation and
  dropout continue exactly where they stopped.
* :class:`SameData` saves a fingerprint of the training data in each checkpoint;
  :func:`check_same_data` refuses a resume on other data.
"""
import hashlib
import random
from collections.abc import Mapping
from typing import Any
import lightning as L
import numpy as np
import torch
import torch.distributed
from lightning.pytorch.callbacks import Callback

from base.errors import UserError


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


def seed_rank_streams(seed: int, rank: int) -> None:
    """Seed the torch (CPU and CUDA), numpy and python RNGs with process ``rank``'s own stream of ``seed``.

    Hashed rather than ``seed + rank``, so that rank 1 of seed 0 does not draw what rank 0 of seed 1
    draws.
    """
    digest = hashlib.sha256(f"seed {seed} rank {rank}".encode()).digest()
    value = int.from_bytes(digest[:8], "little") >> 1  # below 2**63, which every RNG here takes
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


class ResumableRNG(Callback):
    """Saves the global RNG states in every checkpoint and restores them when fitting resumes.

    Lightning restores model, optimiser, scheduler and loop state, but not the global RNGs that
    draw the augmentation of the loader path and dropout. Without them a resumed run trains on
    other random numbers than the uninterrupted one would have.

    When the states go back matters. A resumed fit builds the first iterator in
    ``FitLoop.setup_data`` (and, unlike later epochs, not again in the epoch loop), before any
    epoch hook runs. The only hook that comes earlier is the callback's ``load_state_dict``,
    called from ``Trainer._run`` while restoring the checkpoint; between it and that iterator
    nothing draws from the global RNGs (the sanity check runs under ``isolate_rng``). The saved
    states, in turn, are those at the end of an epoch, after which the uninterrupted run draws
    nothing until it builds the next epoch's iterator. So both runs build that iterator from the
    same RNG state. Not exact with ``--workers`` > 0: persistent worker processes keep their own
    RNG streams across epochs, and those are not in the checkpoint.

    Several processes (DDP): every process was seeded alike, so that the network's initial
    weights agree; left so, all would draw the same dropout masks and augmentation. At ``setup``
    of a fit, once the network is built, each process therefore switches to its own stream of the
    run's seed (:func:`seed_rank_streams`), and a checkpoint holds every process's states,
    ``{"ranks": [state of rank 0, state of rank 1, ...]}``, gathered in ``state_dict``: Lightning
    builds a checkpoint's contents on every process (``dump_checkpoint``, for every save, the one
    on SIGTERM included) and only rank 0 writes them, so the gather is a collective every process
    reaches. On resume each process restores its own. A checkpoint of one process's states (a
    single-process run, or a DDP run saved before every rank's were kept) is restored on rank 0;
    the other ranks keep the streams of their own seeded at ``setup``.
    """

    def __init__(self) -> None:
        self._fitting = False
        self._rank, self._world_size = 0, 1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning also restores callbacks for trainer.test(ckpt_path=...): that must not
        # rewind the RNGs of a process that may train again.
        self._fitting = stage == "fit"
        self._rank, self._world_size = trainer.global_rank, trainer.world_size
        if self._fitting and self._world_size > 1:
            # torch's initial seed is the run's (L.seed_everything); a resume then restores the saved states.
            seed_rank_streams(torch.initial_seed(), self._rank)

    def state_dict(self) -> dict[str, Any]:
        state = capture_rng_state()
        if self._world_size < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return state
        states: list[Any] = [None] * self._world_size
        torch.distributed.all_gather_object(states, state)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._fitting:
            return
        ranks = state_dict.get("ranks")
        if ranks is None:
            if self._rank == 0:
                restore_rng_state(state_dict)
        elif self._rank < len(ranks):
            restore_rng_state(ranks[self._rank])


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
