"""Every augmentation, written once: batched functions of image tensors (N, C, H, W) on any device.

Training augmentation is a random translation (``RandomCrop(H, padding=T)``: the image padded by
T pixels on each side, with zeros or by reflection, and cropped back at a random offset), a
horizontal flip with probability 1/2, and optionally Cutout (one L x L square, wholly inside the
image, set to the data set's mean, i.e. 0 after normalisation: DeVries and Taylor 2017, as
cifar10-fast and airbench place it). Every draw comes from a CPU generator seeded with (seed,
epoch), made for the whole epoch at once, so batch ``b`` of epoch ``e`` is a function of (seed,
e, b) alone: the same on any device, data path, number of worker processes, and after a resume.

Both data paths build their batches with :class:`TrainBatchBuilder`: the device path on the
training device in the main process (:class:`TrainBatches`, :class:`EvalBatches`: a few kernels
per batch from one uint8 tensor on the device), the loader path on the CPU in DataLoader worker
processes (``datamodules.cifar10``), so they serve the same batches for the same seed. Test-time augmentation
(:class:`TestTimeAugmentation`) is used alike by validation, test, predict and export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from base.errors import UserError
from base.schema import DATA_PATHS, PADDING_MODES, TTA_MODES


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What the training augmentation does: ``translate`` (pixels, 0..H/2: the largest shift in
    each direction; 4 is the course's ``RandomCrop(32, padding=4)``), ``padding`` (what the shift
    brings in: ``zeros`` or ``reflect``), ``cutout`` (side in pixels of the erased square; 0: none).
    Raises ValueError for values out of range."""

    translate: int = 4
    padding: str = "zeros"
    cutout: int = 0

    def __post_init__(self) -> None:
        if self.translate < 0:
            raise ValueError(f"translate must be 0 or more pixels, got {self.translate}")
        if self.cutout < 0:
            raise ValueError(f"cutout must be 0 or more pixels, got {self.cutout}")
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {', '.join(PADDING_MODES)}, got {self.padding!r}")

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError where images of ``height`` x ``width`` cannot take these sizes: a shift of
        at most half the side (beyond, images are mostly border; reflection needs it below the side),
        a square that fits. (The flags refuse such values before this, for 32x32 images.)"""
        if self.translate > min(height, width) // 2:
            raise ValueError(f"--translate {self.translate}: at most {min(height, width) // 2} pixels on {height}x{width} images")
        if self.cutout > min(height, width):
            raise ValueError(f"--cutout {self.cutout}: a square that large does not fit {height}x{width} images")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where and for whom batches are built: on ``device``, as process ``rank`` of ``world_size``
    (0 of 1 without DDP), gathered in ``channels_last`` memory format or not."""

    device: torch.device | str = "cpu"
    rank: int = 0
    world_size: int = 1
    channels_last: bool = False


@dataclasses.dataclass(frozen=True)
class Draws:
    """The random choices for n images, each (n,): crop offsets ``dy``, ``dx`` into the padded image
    (0 .. 2 * translate), ``flip`` (bool), and the Cutout square's top-left corner ``top``, ``left``
    (None without Cutout)."""

    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor
    top: torch.Tensor | None = None
    left: torch.Tensor | None = None

    def select(self, index: torch.Tensor | slice) -> Draws:
        return Draws(*(None if t is None else t[index] for t in dataclasses.astuple(self)))

    def to(self, device: torch.device) -> Draws:
        return Draws(*(None if t is None else t.to(device) for t in dataclasses.astuple(self)))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one epoch's draws, a function of (seed, epoch) alone.

    Hashed rather than ``seed + epoch``, so that no epoch repeats the stream that
    ``holdout_split`` (or another epoch of a neighbouring seed) draws from.
    """
    digest = hashlib.blake2b(f"device-batches:{seed}:{epoch}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def draw_epoch(
    size: int, augmentation: Augmentation, height: int, width: int, generator: torch.Generator
) -> tuple[torch.Tensor, Draws]:
    """One epoch's order (a permutation of ``size`` images) and every image's :class:`Draws`, on the CPU.

    The order of the draws is fixed: permutation, offsets, flips, then Cutout corners. Without
    Cutout it is the stream the data path has drawn since its first release, so runs started then
    resume with the same batches.
    """
    order = torch.randperm(size, generator=generator)
    dy, dx = torch.randint(0, 2 * augmentation.translate + 1, (2, size), generator=generator)
    flip = torch.rand(size, generator=generator) < 0.5
    top = left = None
    if augmentation.cutout:
        top = torch.randint(0, height - augmentation.cutout + 1, (size,), generator=generator)
        left = torch.randint(0, width - augmentation.cutout + 1, (size,), generator=generator)
    return order, Draws(dy, dx, flip, top, left)


def pad(images: torch.Tensor, pixels: int, padding: str) -> torch.Tensor:
    """``images`` (N, C, H, W, any dtype) with ``pixels`` more on each side: zeros or reflected."""
    if not pixels:
        return images
    return F.pad(images, (pixels,) * 4, mode="constant" if padding == "zeros" else "reflect")


def crop_and_flip(
    padded: torch.Tensor, indices: torch.Tensor, draws: Draws, height: int, width: int, channels_last: bool = False
) -> torch.Tensor:
    """``padded[indices]`` (contiguous N, C, Hp, Wp) cropped to ``height`` x ``width`` at each image's
    offsets and mirrored where ``draws.flip``: (B, C, height, width), ``padded``'s dtype.

    Two gathers: whole padded rows first (one per image, channel and output row, a plain copy of
    Wp values each), then the columns within them, the flip folded into the column indices. One
    indexing kernel over all four dimensions does the same, but measured 5x slower on the CPU
    (3.1 ms against 0.56 ms for 100 images, one thread). For ``channels_last`` the column gather
    writes (B, H, W, C) and returns its (B, C, H, W) view, which is a channels_last tensor.
    """
    rows = draws.dy[:, None] + torch.arange(height, device=padded.device)
    steps = torch.arange(width, device=padded.device)
    cols = draws.dx[:, None] + torch.where(draws.flip[:, None], width - 1 - steps, steps)
    channels, padded_height, padded_width = padded.shape[1:]
    batch = len(indices)
    channel_ids = torch.arange(channels, device=padded.device)
    row_ids = (indices[:, None, None] * channels + channel_ids[:, None]) * padded_height + rows[:, None, :]
    picked = padded.view(-1, padded_width).index_select(0, row_ids.view(-1)).view(batch, channels, height, padded_width)
    if channels_last:
        picked = picked.permute(0, 2, 3, 1)
        return picked.gather(2, cols[:, None, :, None].expand(batch, height, width, channels)).permute(0, 3, 1, 2)
    return picked.gather(3, cols[:, None, None, :].expand(batch, channels, height, width))


def cutout_mask(draws: Draws, side: int, height: int, width: int) -> torch.Tensor:
    """Where Cutout erases: bool (B, 1, height, width), True inside each image's ``side`` x ``side``
    square at (``draws.top``, ``draws.left``)."""
    assert draws.top is not None and draws.left is not None, "drawn without Cutout"
    ys = torch.arange(height, device=draws.top.device)
    xs = torch.arange(width, device=draws.top.device)
    inside_y = (ys >= draws.top[:, None]) & (ys < draws.top[:, None] + side)
    inside_x = (xs >= draws.left[:, None]) & (xs < draws.left[:, None] + side)
    return (inside_y[:, :, None] & inside_x[:, None, :])[:, None]


class Normalize:
    """uint8 images -> float32 ``(x / 255 - mean) / std``, as one multiply-add after the conversion."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu") -> None:
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std_t)).to(device)
        self.bias = (-mean_t / std_t).to(device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Element-wise, so the result keeps the input's memory format (channels_last stays so).
        return torch.addcmul(self.bias, images.float(), self.scale)


class TrainBatchBuilder:
    """Augmented, normalised training batches of one epoch's draw, for both data paths.

    ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,) are moved to ``device`` once, padded
    for the translation. :meth:`plan` draws an epoch (this rank's share of the permutation, cut
    to a multiple of ``world_size``, and every image's :class:`Draws`); :meth:`batch` builds
    batch ``b`` of a plan: ((B, C, H, W) float32, (B,) int64), on ``device``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        augmentation: Augmentation,
        seed: int,
        mean: Sequence[float],
        std: Sequence[float],
        placement: Placement = Placement(),
    ) -> None:
        self.height, self.width = images.shape[-2:]
        augmentation.check_size(self.height, self.width)
        self.augmentation = augmentation
        self.seed, self.rank, self.world_size = seed, placement.rank, placement.world_size
        self.size = len(images)
        self.device = torch.device(placement.device)
        self.channels_last = placement.channels_last
        self.padded = pad(images, augmentation.translate, augmentation.padding).to(self.device)
        self.labels = labels.to(self.device)
        self.normalize = Normalize(mean, std, self.device)

    def draw(self, epoch: int) -> tuple[torch.Tensor, Draws]:
        """This rank's image indices and their draws for ``epoch``, on the CPU.

        All ranks draw the same permutation and take every ``world_size``-th position from
        ``rank`` on, so the shards are disjoint and equally long; an image's augmentation does not
        depend on ``world_size``.
        """
        order, draws = draw_epoch(self.size, self.augmentation, self.height, self.width, epoch_generator(self.seed, epoch))
        mine = slice(self.rank, (self.size // self.world_size) * self.world_size, self.world_size)
        return order[mine], draws.select(mine)

    def plan(self, epoch: int) -> tuple[torch.Tensor, Draws]:
        """:meth:`draw` moved to ``device``."""
        indices, draws = self.draw(epoch)
        return indices.to(self.device), draws.to(self.device)

    def batch(self, plan: tuple[torch.Tensor, Draws], start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``start:stop`` of ``plan``: the augmented, normalised images and their labels."""
        indices, draws = plan[0][start:stop], plan[1].select(slice(start, stop))
        images = self.normalize(crop_and_flip(self.padded, indices, draws, self.height, self.width, self.channels_last))
        if self.augmentation.cutout:
            # In place on the fresh normalised batch: an out-of-place fill would drop channels_last.
            images.masked_fill_(cutout_mask(draws, self.augmentation.cutout, self.height, self.width), 0.0)
        return images, self.labels[indices]


# The device path: a decoded split lives on the training device as one uint8 tensor, and a
# training batch is one gather that picks, crops and flips its images at once, then the float
# conversion, normalisation and Cutout: no worker processes, no pixels crossing the host-device bus
# after the start. These iterables work as Lightning dataloaders: len(), iterated again every
# epoch, and sampler.set_epoch on the training one, as Lightning calls it on a DistributedSampler.

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
    as ``augmentation`` says, on ``placement``'s device and shard; ``channels_last`` gathers straight
    into that memory format.

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
        placement: Placement = Placement(),
    ) -> None:
        _check_arrays(images, labels)
        self.batch_size = batch_size
        self.sampler = ShuffledShard(len(images), placement.rank, placement.world_size)
        self.builder = TrainBatchBuilder(
            images, labels, augmentation=augmentation, seed=seed, mean=mean, std=std, placement=placement
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
        placement: Placement = Placement(),
    ) -> None:
        _check_arrays(images, labels)
        batches = EvalShard(len(images), batch_size, placement.rank, placement.world_size).batches()
        self.num_batches = len(batches)
        self.device = torch.device(placement.device)
        memory_format = torch.channels_last if placement.channels_last else torch.contiguous_format
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


def shift(images: torch.Tensor, dy: int, dx: int, padding: str = "reflect") -> torch.Tensor:
    """``images`` (N, C, H, W) moved ``dy`` pixels down and ``dx`` right, the uncovered border padded."""
    pixels = max(abs(dy), abs(dx))
    if pixels == 0:
        return images
    height, width = images.shape[-2], images.shape[-1]
    padded = F.pad(images, [pixels, pixels, pixels, pixels], mode="constant" if padding == "zeros" else "reflect")
    top, left = pixels - dy, pixels - dx
    return padded[:, :, top : top + height, left : left + width]


# Test-time views as (weight, rows down, columns right, mirrored); the weights sum to 1 and are
# powers of two, so "flip" is (a + b) / 2 to the last bit. flip-translate is airbench's (Keller
# Jordan, 2024): the image and its mirror at half the weight, and both again moved one pixel
# up-left and one down-right, reflected, at a quarter each.
TTA_VIEWS: dict[str, list[tuple[float, int, int, bool]]] = {
    "none": [(1.0, 0, 0, False)],
    "flip": [(0.5, 0, 0, False), (0.5, 0, 0, True)],
    "flip-translate": [
        (0.25, 0, 0, False), (0.25, 0, 0, True),
        (0.125, -1, -1, False), (0.125, -1, -1, True),
        (0.125, 1, 1, False), (0.125, 1, 1, True),
    ],
}  # fmt: skip
assert set(TTA_VIEWS) == set(TTA_MODES)
# What each mode outputs, in words (export metadata, messages).
TTA_MEANING = {
    "none": "the logits of each image",
    "flip": "the mean logits of each image and its mirror",
    "flip-translate": "the weighted mean logits of each image and its mirror, as they are (1/2) and moved one pixel "
    "up-left and down-right with reflected borders (1/4 each)",
}


class TestTimeAugmentation(nn.Module):
    """``model`` scoring with the test-time augmentation ``mode`` (one of ``TTA_MODES``): the weighted
    mean of its logits over the views of :data:`TTA_VIEWS`.

    The one implementation: validation and test (``ImageClassifier``), predict.py, and export.py,
    which writes it into the ONNX and TorchScript graphs, so that what was measured is what gets
    deployed. Input and output as the model's: normalised images (N, C, H, W) -> logits (N, classes).
    Logits, not probabilities, are averaged (the usual choice of fast CIFAR-10 recipes; their mean
    is a proper input for the cross-entropy). One pass per view at the input's batch size, so a
    compiled model sees no new shape. Raises ValueError for an unknown mode.
    """

    __test__ = False  # a pytest collector must not take it for a test class

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        if mode not in TTA_VIEWS:
            raise ValueError(f"unknown test-time augmentation {mode!r}; choose one of {', '.join(TTA_VIEWS)}")
        self.model = model
        self.mode = mode
        # Not annotated: TorchScript (export.py) infers List[Tuple[float, int, int, bool]] from the
        # value, where it cannot read a postponed annotation.
        self.views = TTA_VIEWS[mode]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if len(self.views) == 1:
            return self.model(images)
        total = torch.zeros(1, device=images.device)
        for weight, dy, dx, mirrored in self.views:
            view = shift(images, dy, dx)
            if mirrored:
                view = view.flip(3)
            total = total + weight * self.model(view)
        return total


def tta_logits(model: nn.Module, images: torch.Tensor, mode: str) -> torch.Tensor:
    """``model``'s logits for ``images`` under the test-time augmentation ``mode``: :class:`TestTimeAugmentation`."""
    return TestTimeAugmentation(model, mode)(images)
