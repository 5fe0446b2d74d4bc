"""Model zoo: every built model takes [0, 1] images and normalises them inside `forward`.

`build_model(cfg, info)` builds an architecture from a suite's `ModelConfig` for a
dataset's `DatasetInfo` (channels, image side, classes) and wraps it in
`NormalizedModel`, which holds the dataset's per-channel mean and std as buffers
(`normalize.mean`, `normalize.std` in the state dict) and applies them first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from bench.config import ConfigError, ModelConfig
from bench.models.preact_resnet import PreActResNet18
from bench.models.small_cnn import SmallCNN
from bench.models.wide_resnet import WideResNet

if TYPE_CHECKING:
    from bench.data import DatasetInfo

__all__ = ["Normalize", "NormalizedModel", "PreActResNet18", "SmallCNN", "WideResNet",
           "build_model", "list_models", "model_defaults"]


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean and std as (saved) buffers."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"bad normalisation: mean {mean}, std {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Module):
    """An architecture that sees normalised inputs: `net(normalize(x))` for x in [0, 1]."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


# name -> (class, default kwargs). Every class takes (in_channels, num_classes, size,
# **kwargs) and expects normalised inputs.
_MODELS: dict[str, tuple[Callable[..., nn.Module], dict]] = {
    "preact_resnet18": (PreActResNet18, {"width": 64}),
    "wide_resnet": (WideResNet, {"depth": 34, "widen_factor": 10, "dropout": 0.0}),
    "small_cnn": (SmallCNN, {"width": 32, "conv_layers": 2, "convs_per_block": 1,
                             "fc": 256, "batchnorm": True}),
}


def list_models() -> list[str]:
    """Names accepted by `build_model`."""
    return sorted(_MODELS)


def model_defaults(name: str) -> dict:
    """The keyword arguments of model `name` with their default values."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; valid models are {list_models()}")
    return dict(_MODELS[name][1])


def build_model(cfg: ModelConfig, info: DatasetInfo) -> NormalizedModel:
    """Build `cfg.name` with `cfg.kwargs` for a dataset described by `info`.

    Unknown names and unknown or mistyped kwargs raise `ConfigError`.
    """
    defaults = model_defaults(cfg.name)
    unknown = sorted(set(cfg.kwargs) - set(defaults))
    if unknown:
        raise ConfigError(
            f"model {cfg.name!r}: unknown kwarg(s) {unknown}; valid kwargs are "
            f"{sorted(defaults)}"
        )
    kwargs = {**defaults, **cfg.kwargs}
    for key, value in kwargs.items():
        default = defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(
                f"model {cfg.name!r}: kwarg {key!r} must be a {type(default).__name__}, "
                f"got {value!r}"
            )
    if len(info.mean) != info.channels or len(info.std) != info.channels:
        raise ConfigError(f"dataset {info.name!r}: mean/std do not have {info.channels} channels")
    net = _MODELS[cfg.name][0](
        in_channels=info.channels, num_classes=info.num_classes, size=info.size, **kwargs
    )
    return NormalizedModel(net, info.mean, info.std)
