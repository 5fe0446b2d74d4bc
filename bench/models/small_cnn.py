"""A small plain CNN for the CPU suites.

`conv_layers` blocks; block i has `width * 2**i` channels and is `convs_per_block` times
conv3x3 (-BN) -ReLU, then a 2x2 max-pool. The feature map is flattened (its side follows
from the image side) into a hidden layer of `fc` units with ReLU (none if `fc` is 0) and
a linear classifier. PyTorch's default initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.config import ConfigError


class SmallCNN(nn.Module):
    """Plain CNN: [conv3x3-BN-ReLU] x convs_per_block + maxpool, repeated; then FC layers."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        size: int = 28,
        width: int = 32,
        conv_layers: int = 2,
        convs_per_block: int = 1,
        fc: int = 256,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        if width < 1 or conv_layers < 1 or convs_per_block < 1 or fc < 0:
            raise ConfigError(
                "small_cnn: need width, conv_layers, convs_per_block >= 1 and fc >= 0"
            )
        side = size
        for _ in range(conv_layers):
            side //= 2
        if side < 1:
            raise ConfigError(
                f"small_cnn: {conv_layers} pooling blocks do not fit {size}x{size} images"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(conv_layers):
            out = width * 2**i
            for _ in range(convs_per_block):
                layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batchnorm))
                if batchnorm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU())
                channels = out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        flat = channels * side * side
        head: list[nn.Module] = [nn.Flatten()]
        if fc > 0:
            head += [nn.Linear(flat, fc), nn.ReLU(), nn.Linear(fc, num_classes)]
        else:
            head.append(nn.Linear(flat, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
