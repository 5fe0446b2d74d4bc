"""PGD-20 speed: ours (attacks.pgd) versus torchattacks' PGD, same model and batch, CPU.

Not part of the default test run; run explicitly:
    pytest tests/benchmarks/test_bench_pgd.py
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

from attacks import pgd

torchattacks = pytest.importorskip("torchattacks")

EPS, ALPHA, STEPS, BATCH = 8 / 255, 2 / 255, 20, 128


@pytest.fixture(scope="module")
def setup():
    """A small CNN (eval mode) and one batch of 128 3x32x32 images in [0, 1]."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    ).eval()  # fmt: skip
    x = torch.rand(BATCH, 3, 32, 32)
    y = torch.randint(0, 10, (BATCH,))
    return model, x, y


def _ours(model, x, y):
    return pgd(model, x, y, eps=EPS, step_size=ALPHA, steps=STEPS)


def _theirs(model, x, y):
    return torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)(x, y)


def test_pgd20_ours(benchmark, setup):
    benchmark.pedantic(_ours, args=setup, rounds=5, iterations=1, warmup_rounds=1)


def test_pgd20_torchattacks(benchmark, setup):
    benchmark.pedantic(_theirs, args=setup, rounds=5, iterations=1, warmup_rounds=1)


def test_pgd20_speed_ratio(benchmark, setup, repeats: int = 7):
    """torchattacks time / our time, from interleaved perf_counter timings (target >= 1)."""
    for fn in (_ours, _theirs):  # warm-up
        fn(*setup)
    ours, theirs = [], []
    for _ in range(repeats):  # interleaved, so that load drift hits both alike
        for fn, times in ((_ours, ours), (_theirs, theirs)):
            start = time.perf_counter()
            fn(*setup)
            times.append(time.perf_counter() - start)
    ratio = statistics.median(t / o for t, o in zip(theirs, ours))
    benchmark.extra_info.update(
        ours_median_s=statistics.median(ours),
        torchattacks_median_s=statistics.median(theirs),
        ratio_torchattacks_over_ours=ratio,
    )
    print(
        f"\nPGD-{STEPS}, batch {BATCH}: ours {statistics.median(ours):.3f} s, "
        f"torchattacks {statistics.median(theirs):.3f} s, ratio {ratio:.2f} (target >= 1.0)"
    )
    benchmark.pedantic(_ours, args=setup, rounds=1, iterations=1)
    assert ratio > 0.8, "our PGD is clearly slower than torchattacks'"
