"""The course's "ResNet50_layer4": a ResNet-50 cut after its third bottleneck stage.

It deliberately differs from the textbook ResNet-50 (downsampling in the last block of a stage,
a ReLU at the end of every branch, a projection shortcut in every block) because the course
checkpoints were trained on this layout and must keep loading with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """1x1 Conv2d + BatchNorm2d + ReLU, the course's shortcut and bottleneck unit."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, padding=0),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 Conv2d + BatchNorm2d + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    """Bottleneck block ``layer(x) + shortcut(x)``.

    The course tested ``x.size() is not out.size()``, which is always true, so its
    ``make_equal_channel`` projection runs in every non-downsampling block; that is the default
    here. ``identity_shortcut=True`` opts into a plain identity wherever the shapes already match,
    which changes the state-dict keys and so cannot load course checkpoints.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        downsample: bool = False,
        identity_shortcut: bool = False,
    ) -> None:
        super().__init__()
        stride = 2 if downsample else 1
        self.layer = nn.Sequential(
            conv1x1(in_channels, mid_channels, stride),
            conv3x3(mid_channels, mid_channels, 1),
            conv1x1(mid_channels, out_channels, 1),
        )
        # The shortcut lives under one of two attribute names (or none) because those names
        # are the state-dict keys of the course checkpoints.
        self.downsize: nn.Sequential | None = None
        self.make_equal_channel: nn.Sequential | None = None
        if downsample:
            self.downsize = conv1x1(in_channels, out_channels, 2)
        elif in_channels != out_channels or not identity_shortcut:
            self.make_equal_channel = conv1x1(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        if self.downsize is not None:
            return out + self.downsize(x)
        if self.make_equal_channel is not None:
            return out + self.make_equal_channel(x)
        return out + x


class ResNet50Layer4(nn.Module):
    """The course network: stem, three bottleneck stages, 2x2 average pool, linear classifier."""

    def __init__(self, num_classes: int = 10, identity_shortcut: bool = False) -> None:
        super().__init__()
        s = identity_shortcut
        # The stem is called layer1 in the course code, so the stages are layer2..layer4.
        self.layer1 = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.layer2 = nn.Sequential(
            Bottleneck(64, 64, 256, identity_shortcut=s),
            Bottleneck(256, 64, 256, identity_shortcut=s),
            Bottleneck(256, 64, 256, downsample=True, identity_shortcut=s),
        )
        self.layer3 = nn.Sequential(
            Bottleneck(256, 128, 512, identity_shortcut=s),
            Bottleneck(512, 128, 512, identity_shortcut=s),
            Bottleneck(512, 128, 512, identity_shortcut=s),
            Bottleneck(512, 128, 512, downsample=True, identity_shortcut=s),
        )
        self.layer4 = nn.Sequential(
            Bottleneck(512, 256, 1024, identity_shortcut=s),
            *(Bottleneck(1024, 256, 1024, identity_shortcut=s) for _ in range(5)),
        )
        self.avgpool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.fc = nn.Linear(1024, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The course used Xavier on weights only; biases keep PyTorch's default init.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet50(num_classes: int = 10, identity_shortcut: bool = False) -> ResNet50Layer4:
    """The course's ResNet50_layer4: 14,750,730 parameters for 10 classes by default."""
    return ResNet50Layer4(num_classes=num_classes, identity_shortcut=identity_shortcut)
