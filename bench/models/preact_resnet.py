"""PreActResNet-18 (He et al., 2016, "Identity mappings"), as used by Rice et al. (2020).

Pre-activation basic blocks, [2, 2, 2, 2] blocks of width w, 2w, 4w, 8w (w = 64 is the
standard model), 1x1 convolution shortcuts without BatchNorm where the shape changes, a
final BN-ReLU, global average pooling (the 4x4 average pool of the 32x32 original) and a
linear classifier. PyTorch's default initialisation, as in the reference code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ConfigError


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus an identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input, the identity the raw one.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreActResNet-18 for normalised inputs of any image side (32, 28, 16, ...)."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, size: int = 32, width: int = 64
    ) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"preact_resnet18: width must be >= 1, got {width}")
        del size  # global pooling makes the network independent of the image side
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**i
            layers.append(nn.Sequential(
                PreActBlock(in_planes, planes, stride), PreActBlock(planes, planes, 1)
            ))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
