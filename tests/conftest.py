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
    return build_splits(smoke_suite.data, None, smoke_suite.curves.size)


def with_train(suite: Suite, **changes) -> Suite:
    return replace(suite, train=replace(suite.train, **changes))
