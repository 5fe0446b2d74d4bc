"""Shared fixtures: the tiny `smoke` suite on synthetic data."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bench.config import Suite, load_suite
from bench.data import Splits, build_splits

SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


@pytest.fixture(autouse=True)
def _cpu_threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smoke_suite() -> Suite:
    return load_suite("smoke")


@pytest.fixture(scope="session")
def smoke_splits(smoke_suite: Suite) -> Splits:
    return build_splits(smoke_suite.data, None, smoke_suite.curves.size, with_test=True)


def with_train(suite: Suite, **changes) -> Suite:
    return replace(suite, train=replace(suite.train, **changes))


def make_prototype_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten noisy class prototypes, 3x16x16, in [0, 1] (a task a tiny CNN learns in seconds)."""
    protos = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, 10, (n,), generator=generator)
    noise = torch.randn(n, 3, 16, 16, generator=generator)
    return (0.5 * protos[y] + 0.25 + 0.2 * noise).clamp(0, 1), y


def fit_briefly(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator, epochs: int = 3) -> torch.nn.Module:
    """Plain SGD on (x, y) for a few epochs; leaves no parameter gradients behind."""
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.grad = None
    return model
