"""The two data paths (datamodules/augment.py, the DataLoader of datamodules/cifar10.py) and
the augmentation they share (datamodules/augment.py).

The augmentation is checked on an image that reveals it: a constant image with one marker pixel
that every crop keeps, so the marker's position in an augmented image gives back the crop
offsets and the flip that were drawn; the reference is torchvision's own RandomCrop and flip.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from fakedata import make_image_folder
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from base.errors import UserError
from datamodules import MEAN, STD, CIFAR10DataModule
from datamodules.augment import Augmentation, Placement, TrainBatchBuilder
from datamodules.cifar10 import BatchKeys, PlannedBatches, ResumableLoader, TransformedTensorDataset, eval_transform
from datamodules.augment import EvalBatches, ShuffledShard, TrainBatches, resolve_data_path

SIZE = 32
PAD = 4  # the default --translate
OFFSETS = 2 * PAD + 1
MARKER = (10, 10)  # (row, column): inside every crop, since offsets move the image by at most PAD
CELLS = OFFSETS * OFFSETS * 2  # (dy, dx, flip) combinations


def marker_images(n: int) -> torch.Tensor:
    images = torch.full((n, 3, SIZE, SIZE), 100, dtype=torch.uint8)
    images[:, 0, MARKER[0], MARKER[1]] = 250
    return images


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def reference_crop(image: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """torchvision's RandomCrop(32, padding=4) at offsets (dy, dx) into the zero-padded image, then the flip."""
    crop = v2.functional.crop(v2.functional.pad(image, [PAD]), dy, dx, SIZE, SIZE)
    return v2.functional.horizontal_flip(crop) if flip else crop


def decode(batch: torch.Tensor) -> torch.Tensor:
    """(dy, dx, flip) of each augmented marker image, as one cell number in 0 .. CELLS - 1."""
    red = batch[:, 0].flatten(1).argmax(1)
    row, col = red // SIZE, red % SIZE
    dy = MARKER[0] + PAD - row
    flip = col > MARKER[1] + PAD  # unflipped, the marker lands in columns 6..14; flipped, 17..25
    dx = torch.where(flip, col - (SIZE - 1 - MARKER[1] - PAD), MARKER[1] + PAD - col)
    assert dy.min() >= 0 and dy.max() < OFFSETS and dx.min() >= 0 and dx.max() < OFFSETS
    return (dy * OFFSETS + dx) * 2 + flip.long()


def chi_square_limit(dof: int, z: float = 3.0902) -> float:
    """The 0.999 quantile of chi-square with ``dof`` degrees of freedom (Wilson-Hilferty; z of 0.999)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def loader_path(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, workers: int = 0,
                augmentation: Augmentation = Augmentation(), rank: int = 0, world_size: int = 1) -> ResumableLoader:
    """The training DataLoader the DataModule makes for --data-path loader."""
    builder = TrainBatchBuilder(images, labels, augmentation=augmentation, seed=seed, mean=MEAN, std=STD,
                                placement=Placement(rank=rank, world_size=world_size))
    return ResumableLoader(PlannedBatches(builder), batch_size=None, num_workers=workers,
                           sampler=BatchKeys(ShuffledShard(len(images), rank, world_size), batch_size))


def augmented_by_both_paths(n_images: int, epochs: int, workers: int = 0) -> dict[str, list[torch.Tensor]]:
    """Every training batch of ``epochs`` epochs over ``n_images`` marker images, per path."""
    images, labels = marker_images(n_images), torch.zeros(n_images, dtype=torch.long)
    loader = loader_path(images, labels, 100, seed=0, workers=workers)
    device = TrainBatches(images, labels, 100, seed=0, mean=MEAN, std=STD)
    batches: dict[str, list[torch.Tensor]] = {"loader": [], "device": []}
    for epoch in range(epochs):
        device.sampler.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        batches["loader"] += [x for x, _ in loader]
        batches["device"] += [x for x, _ in device]
    return batches


def test_both_paths_crop_and_flip_alike() -> None:
    batches = augmented_by_both_paths(n_images=400, epochs=10)
    # The 162 images that the (dy, dx, flip) cells stand for, normalised as the paths do.
    image = marker_images(1)[0]
    expected = normalise(torch.stack([
        reference_crop(image, dy, dx, bool(flip)) for dy in range(OFFSETS) for dx in range(OFFSETS) for flip in (0, 1)
    ]))
    counts = {}
    for path, path_batches in batches.items():
        cells = []
        for batch in path_batches:
            batch_cells = decode(batch)
            # Each image is exactly its window of the zero-padded image, flipped or not.
            torch.testing.assert_close(batch, expected[batch_cells])
            cells.append(batch_cells)
            # Drawn per image: a batch holds many different crops, not one shared by all.
            assert len(batch_cells.unique()) > 50, path
        counts[path] = torch.cat(cells).bincount(minlength=CELLS).double()

    limit = chi_square_limit(CELLS - 1)
    for path, count in counts.items():
        total = count.sum()
        assert total == 4000
        uniform = ((count - total / CELLS) ** 2 / (total / CELLS)).sum()
        assert uniform < limit, f"{path}: offsets and flips not uniform over the 162 cases (chi2 {uniform:.1f})"
        flip_rate = count[1::2].sum() / total
        assert abs(flip_rate - 0.5) < 0.03, f"{path}: flip rate {flip_rate:.3f}"
        per_axis = count.view(OFFSETS, OFFSETS, 2).sum(dim=(1, 2)), count.view(OFFSETS, OFFSETS, 2).sum(dim=(0, 2))
        for axis in per_axis:
            assert (axis > 0).all()  # all 9 offsets 0..8 occur on each axis
    # One function builds both paths' batches: the same seed gives the same tensors.
    for loader_batch, device_batch in zip(batches["loader"], batches["device"], strict=True):
        assert torch.equal(loader_batch, device_batch)


def test_worker_processes_build_the_same_batches() -> None:
    images, labels = marker_images(60), torch.arange(60)
    in_process = [x for x, _ in loader_path(images, labels, 16, seed=3, augmentation=Augmentation(cutout=8))]
    workers = [x for x, _ in loader_path(images, labels, 16, seed=3, workers=2, augmentation=Augmentation(cutout=8))]
    assert len(in_process) == 4
    for a, b in zip(in_process, workers, strict=True):
        assert torch.equal(a, b)


def _first_release_draw(size: int, seed: int, epoch: int) -> tuple[torch.Tensor, ...]:
    """The epoch draw as the device path made it when it was first released (order, dy, dx, flip):
    what runs started before Cutout and reflected shifts existed must get again on resume."""
    digest = hashlib.blake2b(f"device-batches:{seed}:{epoch}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    order = torch.randperm(size, generator=generator)
    dy, dx = torch.randint(0, 9, (2, size), generator=generator)
    flip = torch.rand(size, generator=generator) < 0.5
    return order, dy, dx, flip


def test_default_draws_are_those_of_runs_started_before() -> None:
    builder = TrainBatchBuilder(marker_images(70), torch.arange(70), augmentation=Augmentation(), seed=11,
                                mean=MEAN, std=STD)
    for epoch in (0, 5):
        order, draws = builder.draw(epoch)
        old = _first_release_draw(70, 11, epoch)
        assert draws.top is None
        for new, before in zip((order, draws.dy, draws.dx, draws.flip), old, strict=True):
            assert torch.equal(new, before)


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_batches_are_normalised_as_the_loader_path(channels_last: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (53, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
    labels = torch.arange(53) % 10
    loader = DataLoader(TransformedTensorDataset(images, labels, eval_transform()), batch_size=10)
    device = EvalBatches(images, labels, 10, mean=MEAN, std=STD, placement=Placement(channels_last=channels_last))
    assert len(device) == len(loader) == 6
    device_images = [x for x, _ in device]
    assert all(x.is_contiguous(memory_format=torch.channels_last) == channels_last for x in device_images)
    torch.testing.assert_close(torch.cat(device_images), torch.cat([x for x, _ in loader]))
    assert torch.equal(torch.cat([y for _, y in device]), labels)


@pytest.mark.parametrize("augmentation", [Augmentation(), Augmentation(padding="reflect", cutout=8)], ids=["course", "cutout"])
def test_channels_last_train_batches_hold_the_same_values(augmentation: Augmentation) -> None:
    images = torch.randint(0, 256, (30, 3, SIZE, SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(30)
    plain = TrainBatches(images, labels, 8, seed=5, mean=MEAN, std=STD, augmentation=augmentation)
    nhwc = TrainBatches(images, labels, 8, seed=5, mean=MEAN, std=STD, placement=Placement(channels_last=True),
                   augmentation=augmentation)
    for (x, y), (x_nhwc, y_nhwc) in zip(plain, nhwc, strict=True):
        assert x_nhwc.is_contiguous(memory_format=torch.channels_last) and x.is_contiguous()
        assert torch.equal(x, x_nhwc) and torch.equal(y, y_nhwc)


def epoch_order(batches: TrainBatches, epoch: int) -> list[int]:
    """The image indices (the labels are 0 .. n-1) of one epoch, in the order they came."""
    batches.sampler.set_epoch(epoch)
    return torch.cat([y for _, y in batches]).tolist()


def test_each_epoch_is_a_seeded_permutation_with_the_last_batch_kept() -> None:
    n = 50
    images, labels = marker_images(n), torch.arange(n)
    batches = TrainBatches(images, labels, 16, seed=3, mean=MEAN, std=STD)
    assert len(batches) == 4 and [len(y) for _, y in batches] == [16, 16, 16, 2]
    first = epoch_order(batches, 0)
    assert sorted(first) == list(range(n))
    assert epoch_order(batches, 1) != first
    torch.manual_seed(123)  # the draw depends on (seed, epoch) only, not on the global RNG
    again = TrainBatches(images, labels, 16, seed=3, mean=MEAN, std=STD)
    assert epoch_order(again, 1) == epoch_order(batches, 1) and epoch_order(again, 0) == first
    assert epoch_order(TrainBatches(images, labels, 16, seed=4, mean=MEAN, std=STD), 0) != first


def test_processes_take_disjoint_equal_shards_of_the_same_draw() -> None:
    n, world = 50, 3
    images, labels = marker_images(n), torch.arange(n)
    single = TrainBatchBuilder(images, labels, augmentation=Augmentation(cutout=5), seed=7, mean=MEAN, std=STD)
    order, draws = single.draw(2)
    crops = {int(i): (int(a), int(b), bool(f), int(t), int(l)) for i, a, b, f, t, l in
             zip(order, draws.dy, draws.dx, draws.flip, draws.top, draws.left)}
    seen: list[int] = []
    for rank in range(world):
        shard = TrainBatches(images, labels, 4, seed=7, mean=MEAN, std=STD, augmentation=Augmentation(cutout=5),
                             placement=Placement(rank=rank, world_size=world))
        assert len(shard) == math.ceil(16 / 4)  # 50 // 3 images each; the 2 left over skip this epoch
        mine = epoch_order(shard, 2)
        assert len(mine) == 16
        seen += mine
        # A shard's images get the crops they get on a single device: the draw is shared.
        rank_order, d = shard.builder.draw(2)
        for i, a, b, f, t, l in zip(rank_order, d.dy, d.dx, d.flip, d.top, d.left):
            assert crops[int(i)] == (int(a), int(b), bool(f), int(t), int(l))
    assert len(set(seen)) == len(seen) == 48


def test_eval_shards_cover_every_image_once_in_equal_batch_counts() -> None:
    n, world = 53, 4
    images, labels = marker_images(n), torch.arange(n)
    shards = [EvalBatches(images, labels, 5, mean=MEAN, std=STD, placement=Placement(rank=r, world_size=world)) for r in range(world)]
    assert {len(shard) for shard in shards} == {3}  # ranks must run the same number of steps
    seen = [y for shard in shards for _, batch in shard for y in batch.tolist()]
    assert sorted(seen) == list(range(n))
    assert max(len(y) for shard in shards for _, y in shard) <= 5
    with pytest.raises(UserError, match="fewer images than batches"):
        EvalBatches(images[:3], labels[:3], 1, mean=MEAN, std=STD, placement=Placement(rank=0, world_size=2))


def test_too_few_training_images_for_the_processes() -> None:
    with pytest.raises(UserError, match="cannot be shared by 4 processes"):
        TrainBatches(marker_images(3), torch.arange(3), 2, seed=0, mean=MEAN, std=STD, placement=Placement(rank=0, world_size=4))


class _Recorder(L.LightningModule):
    """A linear model that remembers which labels each epoch trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3 * SIZE * SIZE, 1)
        self.epochs: dict[int, list[int]] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        self.epochs.setdefault(self.current_epoch, []).extend(labels.tolist())
        return self.layer(images.flatten(1)).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_fit_loop_reseeds_every_epoch() -> None:
    n = 30
    images, labels = marker_images(n), torch.arange(n)
    batches = TrainBatches(images, labels, 8, seed=9, mean=MEAN, std=STD)
    model = _Recorder()
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=batches)
    assert trainer.num_training_batches == 4 and trainer.global_step == 12
    reference = TrainBatches(images, labels, 8, seed=9, mean=MEAN, std=STD)
    for epoch in range(3):
        assert model.epochs[epoch] == epoch_order(reference, epoch)
    assert model.epochs[0] != model.epochs[1]


def test_the_datamodule_picks_the_path(tmp_path: Path) -> None:
    tree = make_image_folder(tmp_path / "tree", 4, 3)

    def loaders(data_path: str) -> tuple[object, object, object]:
        dm = CIFAR10DataModule(tree, batch_size=8, eval_batch_size=7, val_size=10, cache_dir=tmp_path / "cache",
                               download=False, data_path=data_path)
        dm.setup()
        return dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()

    train, val, test = loaders("device")
    assert isinstance(train, TrainBatches) and isinstance(val, EvalBatches) and isinstance(test, EvalBatches)
    assert all(isinstance(loader, DataLoader) for loader in loaders("loader"))
    classic, device = loaders("loader"), loaders("device")
    for name, a, b in zip(("val", "test"), classic[1:], device[1:]):
        torch.testing.assert_close(torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b]), msg=name)
    assert resolve_data_path("auto", torch.device("cuda")) == "device"
    assert resolve_data_path("loader", torch.device("cuda")) == "loader"
    with pytest.raises(UserError, match="data_path must be one of auto, device, loader"):
        CIFAR10DataModule(tree, data_path="gpu")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_serves_the_rest_of_the_epoch_with_any_workers(workers: int) -> None:
    """As Lightning resumes: iter() first, then load_state_dict, then set_epoch, then the batches."""
    images, labels = marker_images(60), torch.arange(60)
    straight = loader_path(images, labels, 10, seed=2, workers=workers)
    straight.sampler.set_epoch(1)
    every = [y for _, y in straight]
    resumed = loader_path(images, labels, 10, seed=2, workers=workers)
    iterator = iter(resumed)
    resumed.load_state_dict({"epoch": 1, "served": 3})
    resumed.sampler.set_epoch(1)
    rest = [y for _, y in iterator]
    assert len(every) == 6 and len(rest) == 3
    assert all(torch.equal(a, b) for a, b in zip(every[3:], rest, strict=True))
    resumed.sampler.set_epoch(2)  # the next epoch starts from its first batch
    assert len([y for _, y in resumed]) == 6
