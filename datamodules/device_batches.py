"""The fast data path: whole batches built on the training device from one uint8 tensor.

The loader path (a ``DataLoader``) builds its batches in worker processes on the CPU and copies
every one to the device. Here a decoded split lives on the device as one uint8 tensor, and a
training batch is one gather that picks, crops and flips its images at once, then the float
conversion, normalisation and Cutout: a few kernels per batch, no worker processes, no pixels
crossing the host-device bus after the start. Both paths build a batch with the same function
(``datamodules.augment.TrainBatchBuilder``), so they serve the same batches for the same seed.

Both iterables work as Lightning train / val / test "dataloaders": they have ``len()``, can be
iterated again every epoch, and the training one exposes ``sampler.set_epoch``, which Lightning
calls at the start of every epoch as it does for a ``DistributedSampler``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from base.errors import UserError
from base.options import DATA_PATHS
from datamodules.augment import Augmentation, Normalize, TrainBatchBuilder


def resolve_data_path(requested: str, device: torch.device) -> str:
    """``device`` or ``loader``: what ``requested`` (one of :data:`DATA_PATHS`) means on ``device``.

    ``auto`` takes the device path on CUDA, where it removes the per-image CPU work and the
    host-to-device copies that otherwise starve the GPU, and on the CPU, where it measured faster
    than the worker-process loader for resnet50 at batch 100 (docs/speed.md). Elsewhere (MPS)
    it keeps the classic loader, which is the path tested there.
    """
    if requested not in DATA_PATHS:
        raise UserError(f"unknown data path {requested!r}: choose one of {', '.join(DATA_PATHS)}")
    if requested != "auto":
        return requested
    return "device" if device.type in ("cuda", "cpu") else "loader"


class ShuffledShard:
    """How this process's share of a seeded per-epoch permutation is cut, and which epoch it is in.

    What ``DistributedSampler`` is to a ``DataLoader``: all processes draw the same permutation
    of the ``size`` images from (seed, epoch) (``augment.TrainBatchBuilder.draw``), cut it to a
    multiple of ``world_size`` and take every ``world_size``-th position from ``rank`` on, so the
    shards are disjoint and equally long (ranks must run the same number of steps). Cutting
    rather than padding with repeats leaves out fewer than ``world_size`` images an epoch,
    different ones each epoch. Raises UserError for fewer images than processes.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if size < world_size:
            raise UserError(
                f"{size} training image(s) cannot be shared by {world_size} processes; use more images or fewer devices"
            )
        self.size = size
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def batches(self, batch_size: int, first: int = 0) -> list[tuple[int, int]]:
        """(start, stop) positions in the shard of its batches from batch ``first`` on, the last partial."""
        return [(start, min(start + batch_size, len(self))) for start in range(first * batch_size, len(self), batch_size)]


class EpochProgress:
    """Where a training loader stands in its epoch: what makes it resumable mid-epoch.

    ``served`` counts the batches handed out in ``epoch``. Lightning builds no batch ahead when
    a loader has a length, so at a checkpoint it is the number of batches trained. After
    :meth:`load_state_dict`, the next iteration of that same epoch starts after them; any other
    epoch starts from its first batch.
    """

    def __init__(self) -> None:
        self.epoch = -1
        self.served = 0
        self._resume: dict[str, int] | None = None

    def start(self, epoch: int) -> int:
        """Begin iterating ``epoch``; returns the index of its first batch to serve."""
        resume, self._resume = self._resume, None
        first = resume["served"] if resume is not None and resume["epoch"] == epoch else 0
        self.epoch, self.served = epoch, first
        return first

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = {"epoch": int(state_dict["epoch"]), "served": int(state_dict["served"])}


class TrainBatches:
    """Shuffled, augmented, normalised training batches built on ``device``.

    ``images`` is a uint8 (N, C, H, W) tensor, ``labels`` int64 (N,). Each epoch yields this
    rank's ``len(sampler)`` images in batches of ``batch_size``, the last one partial, augmented
    as ``augmentation`` says. ``channels_last`` gathers straight into that memory format.

    Resumable mid-epoch (Lightning's ``state_dict`` / ``load_state_dict`` interface of stateful
    loaders): the state is the epoch and how many of its batches were served; the epoch's draw
    is a function of (seed, epoch), so a resumed iteration serves exactly the remaining batches.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        seed: int,
        mean: Sequence[float],
        std: Sequence[float],
        augmentation: Augmentation = Augmentation(),
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        _check_arrays(images, labels)
        self.batch_size = batch_size
        self.sampler = ShuffledShard(len(images), rank, world_size)
        self.builder = TrainBatchBuilder(
            images, labels, augmentation=augmentation, seed=seed, mean=mean, std=std, device=device,
            rank=rank, world_size=world_size, channels_last=channels_last,
        )
        self.progress = EpochProgress()

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator, so the draw happens at the first next(): Lightning calls iter() on the
        # first epoch's loader before it calls sampler.set_epoch for that epoch.
        plan = self.builder.plan(self.sampler.epoch)
        first = self.progress.start(self.sampler.epoch)
        for start, stop in self.sampler.batches(self.batch_size, first):
            self.progress.served += 1
            yield self.builder.batch(plan, start, stop)

    def state_dict(self) -> dict[str, int]:
        return self.progress.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.progress.load_state_dict(state_dict)


class EvalBatches:
    """Normalised evaluation batches built on ``device``, in dataset order, without augmentation.

    Under several processes each rank evaluates its :class:`EvalShard`.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        _check_arrays(images, labels)
        batches = EvalShard(len(images), batch_size, rank, world_size).batches()
        self.num_batches = len(batches)
        self.device = torch.device(device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.images = images.to(self.device).contiguous(memory_format=memory_format)
        self.labels = labels.to(self.device)
        self.bounds = [(int(batch[0]), int(batch[-1]) + 1) for batch in batches]
        self.normalize = Normalize(mean, std, self.device)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start, stop in self.bounds:
            yield self.normalize(self.images[start:stop]), self.labels[start:stop]


class EvalShard:
    """This process's evaluation batches: a contiguous block of the images, split evenly.

    Every image is evaluated exactly once (a ``DistributedSampler`` would pad with repeats), and
    all ranks run the same number of batches of at most ``batch_size`` images, as collective
    metric syncs need. Iterating gives each batch's image indices (a DataLoader batch sampler).
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        blocks = torch.arange(size).tensor_split(world_size)
        self.num_batches = math.ceil(len(blocks[0]) / batch_size)  # the first block is the longest
        if len(blocks[-1]) < self.num_batches:
            raise UserError(
                f"{size} evaluation image(s) over {world_size} processes leave a process fewer images "
                f"than batches; use a larger --eval-batch-size or --val-size"
            )
        self.block = blocks[rank]

    def batches(self) -> list[torch.Tensor]:
        return list(self.block.tensor_split(self.num_batches)) if self.num_batches else []

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches():
            yield batch.tolist()


def _check_arrays(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
