"""What a data set is to the rest of the project: its name, class names and pixel statistics.

A :class:`DatasetInfo` travels with a run: the DataModule exposes the one it reads, the
LightningModule saves it in its checkpoint (``hparams["dataset"]``, as :meth:`DatasetInfo.to_dict`),
and test.py, predict.py, export.py and the dashboards read it back from there, so a model is always
fed and labelled the way it was trained. Importable without torch.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DatasetInfo:
    """One data set: ``name`` (a ``--dataset`` name: ``datamodules.datasets.CATALOG``), ``classes`` in label order (label
    i is ``classes[i]``), and the per-channel ``mean`` and ``std`` (RGB, of pixels scaled to [0, 1])
    that images are normalised with, ``(x - mean) / std``.

    Raises ValueError for fewer than 2 classes, repeated or empty class names, or statistics that
    are not 3 finite numbers (std above 0).
    """

    name: str
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        # Normalise what from_dict or a caller hands over (lists, numpy floats) to plain tuples.
        object.__setattr__(self, "classes", tuple(str(name) for name in self.classes))
        object.__setattr__(self, "mean", _three(self.mean, "mean"))
        object.__setattr__(self, "std", _three(self.std, "std"))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a data set needs a name, got {self.name!r}")
        if len(self.classes) < 2:
            raise ValueError(f"data set {self.name} needs at least 2 classes, got {len(self.classes)}")
        if any(not name for name in self.classes):
            raise ValueError(f"data set {self.name} has an empty class name")
        if len(set(self.classes)) != len(self.classes):
            repeated = sorted({name for name in self.classes if self.classes.count(name) > 1})
            raise ValueError(f"data set {self.name} repeats class name(s) {', '.join(repeated)}")
        if any(value <= 0 for value in self.std):
            raise ValueError(f"data set {self.name}: std must be above 0, got {self.std}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Plain values that YAML, JSON and ``torch.load(weights_only=True)`` all take: str, lists of
        str and of float."""
        return {"name": self.name, "classes": list(self.classes), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DatasetInfo:
        """The inverse of :meth:`to_dict`; ValueError naming what is missing or malformed."""
        if not isinstance(values, Mapping):
            raise ValueError(f"a data set record is a mapping, got {type(values).__name__}")
        missing = [key for key in ("name", "classes", "mean", "std") if key not in values]
        if missing:
            raise ValueError(f"data set record lacks {', '.join(missing)}")
        classes = values["classes"]
        if isinstance(classes, (str, bytes)) or not isinstance(classes, (list, tuple)):
            raise ValueError(f"data set record: classes must be a list of names, got {type(classes).__name__}")
        return cls(str(values["name"]), tuple(classes), values["mean"], values["std"])


def _three(values: Any, what: str) -> tuple[float, float, float]:
    try:
        numbers = tuple(float(value) for value in values)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be 3 numbers (R, G, B), got {values!r}") from None
    if len(numbers) != 3 or not all(math.isfinite(value) for value in numbers):
        raise ValueError(f"{what} must be 3 finite numbers (R, G, B), got {values!r}")
    return numbers  # type: ignore[return-value]


# CIFAR-10's classes in label order, and the statistics the course normalised with (SPEC.md: Training
# recipe). That std is the mean of per-image standard deviations, smaller than the pixels' overall
# one (about 0.247, 0.243, 0.261); it is kept because the course's checkpoints were trained with it.
CIFAR10 = DatasetInfo(
    name="cifar10",
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2023, 0.1994, 0.2010),
)

# CIFAR-100's 100 fine labels in their official order (the archive's meta ``fine_label_names``, as
# torchvision's CIFAR100.classes lists them), and the usual statistics of its training set.
CIFAR100 = DatasetInfo(
    name="cifar100",
    classes=(
        "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
        "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
        "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
        "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
        "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
        "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
        "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
        "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
        "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
        "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
    ),
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)
