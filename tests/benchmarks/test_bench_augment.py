"""Cost of IDBH's on-device augmentation: one batch of 128 CIFAR-shaped images (3 x 32 x 32,
channels_last, as the engine holds them) against one PGD-10 AT training step of the engine
(small CNN, the same batch size), CPU, measured in the same run.

Run: `python -m pytest tests/benchmarks/test_bench_augment.py -s` (threads:
`ROBENCH_BENCH_THREADS`, default 2)
Target: augmentation < 15% of the training step. The measured ratio is printed and stored
in `benchmark.extra_info["ratio"]`.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_bench_engine import CASES as ENGINE_CASES
from test_bench_engine import _trainer, best_time, engine_stepper

from defenses.idbh import VARIANTS, idbh_augment

TARGET = 0.15
CASES = {"small_cnn": ENGINE_CASES["small_cnn"]}  # (model config, batch size, images)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_idbh_vs_pgd10_step(benchmark, case, variant, tmp_path):
    torch.set_num_threads(int(os.environ.get("ROBENCH_BENCH_THREADS", "2")))
    model_cfg, batch, n = CASES[case]
    trainer, state = _trainer(model_cfg, batch, n, tmp_path)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(1)

    def augment() -> None:
        idbh_augment(x, generator, VARIANTS[variant])

    t_step = best_time(engine_stepper(trainer, state), repeats=3)
    t_aug = min(best_time(augment, repeats=10) for _ in range(3))
    ratio = t_aug / t_step
    print(f"\n{case} idbh-{variant}: augmentation {t_aug * 1000:.1f} ms per batch of {batch}, "
          f"PGD-10 AT step {t_step * 1000:.0f} ms, ratio {100 * ratio:.2f}%")
    benchmark.extra_info.update({"augment_s": t_aug, "step_s": t_step, "ratio": ratio})
    benchmark.pedantic(augment, rounds=10, iterations=1)
    assert ratio < TARGET, f"{case} idbh-{variant}: augmentation costs {100 * ratio:.1f}% of a step"
