"""VGG16 for CIFAR-10, laid out exactly like the course's network.

The module and attribute layout (``features``, ``classifier`` and their Sequential indices) is
the state-dict contract with the course checkpoints, so it must not be reorganised.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

CFG_VGG16: list[int | str] = [
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
]  # fmt: skip


class VGG(nn.Module):
    """VGG built from a cfg list: an int is a 3x3 conv of that width, ``'M'`` a 2x2 max-pool.

    Takes (N, 3, 32, 32) images and returns (N, ``num_classes``) logits. ``dropout`` is the
    probability of both Dropout layers of the classifier, from 0 to 1 (``nn.Dropout`` raises
    ValueError outside; ``models.build_model`` also refuses 1, which would zero every feature).
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        num_classes: int = 10,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = self._make_features(cfg, batch_norm)
        # Five pools take 32x32 down to 1x1, hence 512 inputs; BatchNorm1d sits at index 2
        # because the course checkpoints store it there. The two Dropout layers hold no weights,
        # so their probability (the course's 0.5 by default) leaves the state dict unchanged.
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(True),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )
        self._init_weights()

    @staticmethod
    def _make_features(cfg: Sequence[int | str], batch_norm: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        in_channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            layers.append(nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(v)))
            layers.append(nn.ReLU(inplace=True))
            in_channels = int(v)
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # He-style init with fan-out, as the course did; Linear and BatchNorm keep the defaults.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        # flatten rather than view: also works on channels_last (non-contiguous) activations.
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg16(num_classes: int = 10, dropout: float = 0.5) -> VGG:
    """The course's VGG16 (no BatchNorm2d in ``features``): 14,983,498 parameters for 10 classes."""
    return VGG(CFG_VGG16, num_classes=num_classes, batch_norm=False, dropout=dropout)


def vgg16_bn(num_classes: int = 10, dropout: float = 0.5) -> VGG:
    """VGG16 with a BatchNorm2d after every conv; its ``features`` indices differ from ``vgg16``."""
    return VGG(CFG_VGG16, num_classes=num_classes, batch_norm=True, dropout=dropout)
