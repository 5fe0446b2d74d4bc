"""WideResNet (Zagoruyko & Komodakis, 2016) in the form used by TRADES and Rice et al.

WRN-depth-k: a 3x3 stem of 16 channels, three groups of (depth - 4) / 6 pre-activation
basic blocks of 16k, 32k, 64k channels (strides 1, 2, 2), optional dropout between the two
convolutions of a block, a final BN-ReLU, global average pooling and a linear layer.
Where a block changes the shape, both branches start from the pre-activated input and
the shortcut is a 1x1 convolution. Initialisation as in the reference: convolutions
N(0, 2 / (k * k * out_channels)), BatchNorm weight 1 and bias 0, linear bias 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ConfigError


class WideBlock(nn.Module):
    """Pre-activation basic block with optional dropout and a 1x1 projection shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if in_planes != planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(act)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for normalised inputs (WRN-34-10 by default)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        size: int = 32,
        depth: int = 34,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"wide_resnet: depth must be 6n + 4 with n >= 1, got {depth}")
        if widen_factor < 1 or not 0.0 <= dropout < 1.0:
            raise ConfigError(
                f"wide_resnet: need widen_factor >= 1 and 0 <= dropout < 1, got "
                f"{widen_factor} and {dropout}"
            )
        del size  # global pooling makes the network independent of the image side
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2), strict=True):
            blocks = [WideBlock(in_planes if i == 0 else planes, planes,
                                stride if i == 0 else 1, dropout) for i in range(n)]
            groups.append(nn.Sequential(*blocks))
            in_planes = planes
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)
