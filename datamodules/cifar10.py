"""A data set (CIFAR-10 by default, any ``--dataset``) as a LightningDataModule: held-out
validation split, augmentation (``augment``), loaders.

Reading the data from disk lives in ``sources``; this module only decides which images go where
and how they are transformed on their way into the model, normalised with the data set's own
statistics (``dataset_info``).
"""

from __future__ import annotations

import dataclasses

import math
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from base.datasets import CIFAR10, DatasetInfo
from base.errors import UserError
from base.schema import DataOptions
from datamodules.augment import (
    DATA_PATHS,
    Augmentation,
    Draws,
    EpochProgress,
    EvalBatches,
    EvalShard,
    Placement,
    ShuffledShard,
    TrainBatchBuilder,
    TrainBatches,
    resolve_data_path,
)
from datamodules.datasets import dataset as catalog_entry
from datamodules.layout import Split, check_data_dir, shown_names
from datamodules.sources import SplitData, ensure_downloaded, measure_stats, read_split

TEST_ORDER_SEED = 0
# Per-channel statistics of the CIFAR-10 training set, as the course normalised with them
# (base.datasets.CIFAR10), by their names before the data sets had their own.
MEAN = CIFAR10.mean
STD = CIFAR10.std
# The least std a measured channel gets: a channel of one constant value (a grey-scale set's) has
# none, and dividing by 0 would make every input inf.
_LEAST_STD = 1 / 255


def eval_transform(mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> v2.Compose:
    """Normalisation only, for validation and test images (default: CIFAR-10's statistics)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def measured_info(name: str, classes: tuple[str, ...], images: torch.Tensor) -> DatasetInfo:
    """The :class:`DatasetInfo` of a data set without fixed statistics: ``classes``, and the mean and
    std of its training ``images`` (uint8 N,3,H,W) per channel (``sources.measure_stats``)."""
    mean, std = measure_stats(images)
    return DatasetInfo(name, classes, mean, tuple(max(value, _LEAST_STD) for value in std))


class TransformedTensorDataset(Dataset):
    """Images (uint8 N,3,32,32) and labels held in memory, transformed one item at a time."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class PlannedBatches(Dataset):
    """Whole training batches as the items of a map-style dataset, for a DataLoader's workers.

    An item's key is (epoch, start, stop): positions ``start:stop`` of that epoch's plan
    (``TrainBatchBuilder``), built with the same function as the device path's batches, on the CPU.
    Each worker process draws an epoch's plan once, at its first batch of that epoch; the draw is
    a function of (seed, epoch), so every worker has the same one and the batch does not depend
    on which worker builds it, nor on how many there are.
    """

    def __init__(self, builder: TrainBatchBuilder) -> None:
        self.builder = builder
        self._plan: tuple[int, tuple[torch.Tensor, Draws]] | None = None

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, start, stop = key
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self.builder.plan(epoch))
        return self.builder.batch(self._plan[1], start, stop)


class BatchKeys(Sampler[tuple[int, int, int]]):
    """The keys of one epoch's :class:`PlannedBatches`, in order, for a DataLoader without batching.

    Lightning calls ``set_epoch`` at every epoch, as for a ``DistributedSampler``; ``skip`` drops
    the first batches of each iteration, for a resumed epoch. ``ResumableLoader`` sets it before
    every epoch; it is not reset here because a multi-process DataLoader iterates its sampler
    twice when it starts (``_MultiProcessingDataLoaderIter`` makes its sampler iterator, then
    makes it again in ``_reset``).
    """

    def __init__(self, shard: ShuffledShard, batch_size: int) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.shard.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.shard) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self.shard.epoch
        return iter([(epoch, start, stop) for start, stop in self.shard.batches(self.batch_size, self.skip)])


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable mid-epoch through Lightning's stateful-loader interface.

    Its state is the epoch and how many of its batches were served (see ``EpochProgress``); a
    resumed iteration of that epoch skips them in the sampler, so the remaining batches hold the
    same images as in an uninterrupted run. Exact with ``--workers 0``; worker processes draw
    their augmentation from their own streams, which are not saved.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = EpochProgress()

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        assert isinstance(sampler, BatchKeys)
        sampler.skip = self.progress.start(sampler.shard.epoch)
        for batch in super().__iter__():
            self.progress.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return self.progress.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.progress.load_state_dict(state_dict)


def holdout_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly pick ``val_size`` of ``n`` indices for validation: (train indices, val indices).

    Uses its own generator so the split depends on ``seed`` alone, not on whatever else consumed
    the global RNG first. Train indices stay in random order, so taking the first few of them
    gives a class-balanced sample even when the source is sorted by class.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    return order[val_size:], order[:val_size]


class ImageDataModule(L.LightningDataModule):
    """Train / validation / test loaders of one data set (``dataset``, a ``--dataset`` name) for a Trainer.

    The validation images are held out from the training split, so the test split is only
    touched by testing. ``train_limit`` keeps only that many training images, for quick runs.

    :attr:`dataset_info` is what the data set is: its class names in label order and the mean and
    std every image is normalised with, on both data paths. CIFAR-10 and CIFAR-100 have fixed
    ones (``base.datasets``); an image-folder tree's classes are its folders and its statistics
    are measured on its training split (read at first use, before ``setup`` if asked first).
    ``dataset_info``, when given, is the data set a checkpoint was trained on (test.py): the
    data's classes must be exactly its (else a one-line UserError) and its statistics normalise,
    and the training split is not read for them.
    """

    def __init__(
        self,
        data: DataOptions | str | Path | None = None,
        *,
        seed: int = 0,
        channels_last: bool = False,
        download: bool = True,
        pin_memory: bool | None = None,
        device: str | torch.device | None = None,
        dataset_info: DatasetInfo | None = None,
        **options: Any,
    ) -> None:
        """``data``: the data group of the option schema (``base.schema.DataOptions``), or only the
        data's folder (the other options their defaults); ``options`` replace some of its values
        (``batch_size=8``; TypeError for a name the group lacks)."""
        super().__init__()
        if not isinstance(data, DataOptions):
            data = DataOptions() if data is None else DataOptions(data_dir=Path(data))
        data = dataclasses.replace(data, **options)
        self.options = data
        data_dir, dataset, data_path = data.data_dir, data.dataset, data.data_path
        batch_size, eval_batch_size, val_size = data.batch_size, data.eval_batch_size, data.val_size
        num_workers, train_limit, cache_dir = data.workers, data.train_limit, data.cache_dir
        self.entry = catalog_entry(dataset)
        self.dataset = dataset
        _require(data_path in DATA_PATHS, f"data_path must be one of {', '.join(DATA_PATHS)}, got {data_path!r}")
        _require(batch_size >= 1, f"batch_size must be at least 1, got {batch_size}")
        _require(eval_batch_size >= 1, f"eval_batch_size must be at least 1, got {eval_batch_size}")
        _require(val_size >= 0, f"val_size must be 0 or more, got {val_size}")
        _require(num_workers >= 0, f"workers must be 0 or more, got {num_workers}")
        _require(
            train_limit is None or train_limit >= 1,
            f"train_limit must be at least 1 (or unset for all images), got {train_limit}",
        )
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_limit = train_limit
        self.cache_dir = cache_dir
        self.download = download
        # None: pinned when the batches go to a CUDA device (the loader path; the device path builds
        # its batches there already). Pinned host memory lets the copy to the GPU run asynchronously.
        self.pin_memory = pin_memory
        # The device path (datamodules.augment) builds batches on the Trainer's root
        # device; ``device`` stands in for it when no Trainer is attached (default: the CPU).
        self.data_path = data_path
        self.channels_last = channels_last
        self.device = device
        try:
            self.augmentation = Augmentation(data.translate, data.translate_padding, data.cutout)
            self.augmentation.check_size(32, 32)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        # In every checkpoint (Lightning saves a DataModule's hyper-parameters beside the module's),
        # so a checkpoint says how its network was trained, as config.yaml does.
        self.save_hyperparameters({"augmentation": dataclasses.asdict(self.augmentation)})
        self.train_set: TransformedTensorDataset | None = None
        self.val_set: TransformedTensorDataset | None = None
        self.test_set: TransformedTensorDataset | None = None
        self.expected = dataset_info
        if dataset_info is not None and self.entry.info is not None:
            self._check_classes(self.entry.info.classes, "the data")
        # Fixed when the data set has fixed classes and statistics or a checkpoint gives them;
        # else measured on the training split, at first use.
        self._info: DatasetInfo | None = dataset_info or self.entry.info
        self._train: SplitData | None = None

    @property
    def dataset_info(self) -> DatasetInfo:
        """The data set's class names and statistics (see the class docstring); reads the training
        split of an image-folder tree the first time, which raises the UserErrors of reading it."""
        if self._info is None:
            train = self._train_split()
            self._info = measured_info(self.dataset, train.classes, train.images)
        return self._info

    @property
    def classes(self) -> tuple[str, ...]:
        return self.dataset_info.classes

    @property
    def num_classes(self) -> int:
        return self.dataset_info.num_classes

    def prepare_data(self) -> None:
        # Lightning runs this once per node, so a download never races between processes.
        check_data_dir(self.data_dir, self.download, self.dataset)
        if self.download:
            ensure_downloaded(self.data_dir, self.dataset)

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_set is None:
            self._setup_train_val()
        if stage in ("test", None) and self.test_set is None:
            test = self._load("test")
            images, labels = test.images, test.labels
            # Sources list the test images class by class; a fixed shuffle makes any first batches
            # (--limit-test-batches, --fast-dev-run) a fair sample of all classes, the same for
            # every run, while a full test sees every image as before.
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(TEST_ORDER_SEED))
            images, labels = images[order], labels[order]
            info = self.dataset_info
            self.test_set = TransformedTensorDataset(images, labels, eval_transform(info.mean, info.std))

    def _setup_train_val(self) -> None:
        train = self._train_split()
        images, labels = train.images, train.labels
        _require(
            self.val_size < len(images),
            f"val_size {self.val_size} leaves no training images: the training split at "
            f"{self.data_dir} has {len(images)}; choose a smaller validation size",
        )
        train_idx, val_idx = holdout_split(len(images), self.val_size, self.seed)
        if self.train_limit is not None:
            train_idx = train_idx[: self.train_limit]
        info = self.dataset_info
        # Normalised only: training batches are augmented by augment.TrainBatchBuilder, on either path.
        self.train_set = TransformedTensorDataset(images[train_idx], labels[train_idx], eval_transform(info.mean, info.std))
        self.val_set = TransformedTensorDataset(images[val_idx], labels[val_idx], eval_transform(info.mean, info.std))
        self._train = None  # the sets hold what they need; the whole split's arrays can go

    def _train_split(self) -> SplitData:
        if self._train is None:
            self._train = self._load("train")
        return self._train

    def _load(self, split: Split) -> SplitData:
        data = read_split(self.data_dir, split, cache_dir=self.cache_dir, download=self.download, dataset=self.dataset)
        self._check_classes(data.classes, f"the {split} split at {self.data_dir}")
        return data

    def _check_classes(self, classes: tuple[str, ...], what: str) -> None:
        """Refuse data whose classes are not those of the checkpoint's data set (``dataset_info``)."""
        if self.expected is None or tuple(classes) == self.expected.classes:
            return
        ours, theirs = set(classes), set(self.expected.classes)
        if ours == theirs:
            why = "the same names in another order"
        else:
            parts = [f"{len(classes)} classes"]
            if missing := sorted(theirs - ours):
                parts.append(f"without {shown_names(missing)}")
            if extra := sorted(ours - theirs):
                parts.append(f"with {shown_names(extra)}, which the checkpoint lacks")
            why = ", ".join(parts)
        raise UserError(
            f"{what} does not have the classes the checkpoint was trained on ({self.expected.num_classes} classes of "
            f"{self.expected.name}): it has {why}; pass --data-dir pointing at that data set's test split"
        )

    def train_dataloader(self) -> DataLoader | TrainBatches:
        train_set = self._ready(self.train_set, "fit")
        placement = self._placement()
        info, augmentation = self.dataset_info, self.augmentation
        if resolve_data_path(self.data_path, placement.device) == "device":
            return TrainBatches(
                train_set.images, train_set.labels, self.batch_size,
                seed=self.seed, mean=info.mean, std=info.std, augmentation=augmentation, placement=placement,
            )
        # The loader path builds its batches in CPU worker processes; Lightning moves them over.
        builder = TrainBatchBuilder(
            train_set.images, train_set.labels, augmentation=augmentation, seed=self.seed, mean=info.mean,
            std=info.std, placement=dataclasses.replace(placement, device="cpu"),
        )
        return ResumableLoader(
            PlannedBatches(builder),
            batch_size=None,
            sampler=BatchKeys(ShuffledShard(len(train_set), placement.rank, placement.world_size), self.batch_size),
            num_workers=self.num_workers,
            pin_memory=self._pins(placement.device),
            persistent_workers=self.num_workers > 0,
            # DataLoader draws its workers' base seed at every iter(), from the global RNG unless it
            # has a generator of its own: that draw would shift dropout's stream after a resume.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader | EvalBatches | list:
        val_set = self._ready(self.val_set, "fit")
        # An empty list tells Lightning there is nothing to validate on (val_size=0).
        return self._eval_loader(val_set) if len(val_set) else []

    def test_dataloader(self) -> DataLoader | EvalBatches:
        return self._eval_loader(self._ready(self.test_set, "test"))

    def batches_per_process(self, split: str, world_size: int = 1) -> int:
        """How many batches each of ``world_size`` processes gets of ``split`` (``train``, ``val`` or
        ``test``) per epoch: the length of its loader, which Lightning's ``limit_*_batches`` fractions
        are taken of. 0 for an empty validation split. Needs ``setup`` for the split's stage first;
        raises the loaders' own UserError when the split cannot be shared by ``world_size`` processes.
        """
        if split == "train":
            # Both training loaders (TrainBatches, ResumableLoader) serve their ShuffledShard in
            # batches of batch_size, the last one partial.
            shard = ShuffledShard(len(self._ready(self.train_set, "fit")), 0, world_size)
            return math.ceil(len(shard) / self.batch_size)
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        dataset = self._ready(self.val_set, "fit") if split == "val" else self._ready(self.test_set, "test")
        # Every rank runs as many batches as the first, longest, block of the EvalShard.
        return len(EvalShard(len(dataset), self.eval_batch_size, 0, world_size))

    def _eval_loader(self, dataset: TransformedTensorDataset) -> DataLoader | EvalBatches:
        placement = self._placement()
        if resolve_data_path(self.data_path, placement.device) == "device":
            info = self.dataset_info
            return EvalBatches(
                dataset.images, dataset.labels, self.eval_batch_size, mean=info.mean, std=info.std, placement=placement
            )
        return DataLoader(
            dataset,
            batch_sampler=EvalShard(len(dataset), self.eval_batch_size, placement.rank, placement.world_size),
            num_workers=self.num_workers,
            pin_memory=self._pins(placement.device),
            persistent_workers=self.num_workers > 0,
            # Not from the global RNG (see train_dataloader): a resumed run starts its workers at
            # another point of the run than an uninterrupted one, and must not shift dropout's stream.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _pins(self, device: torch.device) -> bool:
        """Whether the loader path's batches go through pinned memory on their way to ``device``."""
        return device.type == "cuda" if self.pin_memory is None else self.pin_memory

    def _placement(self) -> Placement:
        """The device, global rank and world size that batches are built for: the Trainer's, when attached."""
        if self.trainer is None:
            return Placement(torch.device(self.device or "cpu"), channels_last=self.channels_last)
        strategy = self.trainer.strategy
        return Placement(strategy.root_device, self.trainer.global_rank, self.trainer.world_size, self.channels_last)

    @staticmethod
    def _ready(dataset: TransformedTensorDataset | None, stage: str) -> TransformedTensorDataset:
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for this dataloader")
        return dataset


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


# The name it had when it read CIFAR-10 only; every data set's module now.
CIFAR10DataModule = ImageDataModule
