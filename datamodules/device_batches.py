"""The fast data path: whole batches built on the training device from one uint8 tensor.

The classic path (a ``DataLoader`` over ``TransformedTensorDataset``) augments one image at a time
on the CPU, in worker processes, and copies every batch to the device. Here a decoded split lives
on the device as one uint8 tensor, and a training batch is one gather that picks the images,
crops and flips them all at once, followed by the float conversion and normalisation: a few
kernels per batch, no worker processes, no pixels crossing the host-device bus after the start.

The augmentation means what the classic path's does: ``RandomCrop(32, padding=4)`` with zero
padding, then ``RandomHorizontalFlip(p=0.5)``, drawn independently for every image; then
``(x / 255 - mean) / std``. Every random draw comes from a CPU generator seeded with
(seed, epoch), so an epoch's order and crops are the same on any device, for any number of
processes (each takes its share of the same draw) and after a resume, whatever else used the
global RNG.

Both iterables work as Lightning train / val / test "dataloaders": they have ``len()``, can be
iterated again every epoch, and the training one exposes ``sampler.set_epoch``, which Lightning
calls at the start of every epoch as it does for a ``DistributedSampler``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from base.errors import UserError
from base.options import DATA_PATHS

PAD = 4  # RandomCrop(32, padding=4)
# Offsets a padded image can be cropped at, per axis: 0 .. 2 * PAD (torchvision draws them the same).
OFFSETS = 2 * PAD + 1


def resolve_data_path(requested: str, device: torch.device) -> str:
    """``device`` or ``loader``: what ``requested`` (one of :data:`DATA_PATHS`) means on ``device``.

    ``auto`` takes the device path on CUDA, where it removes the per-image CPU work and the
    host-to-device copies that otherwise starve the GPU, and on the CPU, where it measured faster
    than the worker-process loader for resnet50 at batch 100 (README, "Speed"). Elsewhere (MPS)
    it keeps the classic loader, which is the path tested there.
    """
    if requested not in DATA_PATHS:
        raise UserError(f"unknown data path {requested!r}: choose one of {', '.join(DATA_PATHS)}")
    if requested != "auto":
        return requested
    return "device" if device.type in ("cuda", "cpu") else "loader"


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one epoch's draws, a function of (seed, epoch) alone.

    Hashed rather than ``seed + epoch``, so that no epoch repeats the stream that
    ``holdout_split`` (or another epoch of a neighbouring seed) draws from.
    """
    digest = hashlib.blake2b(f"device-batches:{seed}:{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


class _Normalize:
    """uint8 images -> float32 ``(x / 255 - mean) / std``, as one multiply-add after the conversion."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std_t)).to(device)
        self.bias = (-mean_t / std_t).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Element-wise, so the result keeps the input's memory format (channels_last stays so).
        return torch.addcmul(self.bias, images.float(), self.scale)


class ShuffledShard:
    """This process's share of a seeded per-epoch permutation, with every image's crop and flip.

    What ``DistributedSampler`` is to a ``DataLoader``: all processes draw the same permutation
    of the ``size`` images from (seed, epoch), cut it to a multiple of ``world_size`` and take
    every ``world_size``-th position from ``rank`` on, so the shards are disjoint and equally
    long (ranks must run the same number of steps). Cutting rather than padding with repeats
    leaves out fewer than ``world_size`` images an epoch, different ones each epoch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if size < world_size:
            raise UserError(
                f"{size} training image(s) cannot be shared by {world_size} processes; use more images or fewer devices"
            )
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def draw(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This epoch's (image indices, row offsets, column offsets, flips) for this rank, on the CPU.

        Offsets are in 0 .. 2 * PAD into the zero-padded image, as RandomCrop draws them; the
        draws are made for the whole permutation, so an image's crop does not depend on
        ``world_size``.
        """
        generator = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.size, generator=generator)
        dy, dx = torch.randint(0, OFFSETS, (2, self.size), generator=generator)
        flip = torch.rand(self.size, generator=generator) < 0.5
        mine = slice(self.rank, len(self) * self.world_size, self.world_size)
        return order[mine], dy[mine], dx[mine], flip[mine]


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

    ``images`` is a uint8 (N, 3, H, W) tensor, ``labels`` int64 (N,). Each epoch yields this
    rank's ``len(sampler)`` images in batches of ``batch_size``, the last one partial.
    ``channels_last`` gathers straight into that memory format.

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
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        _check_arrays(images, labels)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.channels_last = channels_last
        self.sampler = ShuffledShard(len(images), seed, rank, world_size)
        # Padded once, so a crop is a plain gather: 4 zero rows / columns on each side, the fill
        # RandomCrop(padding=4) uses.
        self.padded = F.pad(images, (PAD, PAD, PAD, PAD)).to(self.device)
        self.labels = labels.to(self.device)
        self.size = images.shape[-1]
        self.normalize = _Normalize(mean, std, self.device)
        self.progress = EpochProgress()

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator, so the draw happens at the first next(): Lightning calls iter() on the
        # first epoch's loader before it calls sampler.set_epoch for that epoch.
        indices, dy, dx, flip = (t.to(self.device) for t in self.sampler.draw())
        rows, cols = crop_coordinates(dy, dx, flip, self.size)
        first = self.progress.start(self.sampler.epoch)
        for start in range(first * self.batch_size, len(indices), self.batch_size):
            batch = slice(start, start + self.batch_size)
            images = gather_crops(self.padded, indices[batch], rows[batch], cols[batch], self.channels_last)
            self.progress.served += 1
            yield self.normalize(images), self.labels[indices[batch]]

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
        self.normalize = _Normalize(mean, std, self.device)

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


def crop_coordinates(
    dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source rows and columns, (n, size) each, of n crops of a padded image, flips folded in.

    A flip after the crop reads the crop's columns backwards: output column j comes from padded
    column ``dx + size - 1 - j`` instead of ``dx + j``.
    """
    steps = torch.arange(size, device=dy.device)
    rows = dy[:, None] + steps
    cols = dx[:, None] + torch.where(flip[:, None], size - 1 - steps, steps)
    return rows, cols


def gather_crops(
    padded: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, channels_last: bool
) -> torch.Tensor:
    """``padded[indices]`` (contiguous uint8 N, C, Hp, Wp) cropped at (``rows``, ``cols``), uint8.

    Two gathers: whole padded rows first (one per image, channel and output row, a plain copy of
    Wp bytes each), then the columns within them. One indexing kernel over all four dimensions
    does the same, but measured 5x slower on the CPU (3.1 ms against 0.56 ms for 100 images, one
    thread), and the GPU runs both in microseconds. For ``channels_last`` the column gather writes
    (B, H, W, C) and returns its (B, C, H, W) view, which is a channels_last tensor.
    """
    channels, padded_height, padded_width = padded.shape[1:]
    batch, height = rows.shape
    width = cols.shape[1]
    channel_ids = torch.arange(channels, device=padded.device)
    row_ids = (indices[:, None, None] * channels + channel_ids[:, None]) * padded_height + rows[:, None, :]
    picked = padded.view(-1, padded_width).index_select(0, row_ids.view(-1)).view(batch, channels, height, padded_width)
    if channels_last:
        picked = picked.permute(0, 2, 3, 1)
        return picked.gather(2, cols[:, None, :, None].expand(batch, height, width, channels)).permute(0, 3, 1, 2)
    return picked.gather(3, cols[:, None, None, :].expand(batch, channels, height, width))


def _check_arrays(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
