"""Cost of AROID's per-image augmentation of a training batch: sampling from the policy (one
forward of the policy network, here the CPU suites' option `backbone="suite"`, the same small
CNN as the target) and applying the chosen ops on the device, for one batch of 128
CIFAR-shaped images (3 x 32 x 32, channels_last, as the engine holds them), against one
PGD-10 AT training step of the engine (small CNN, the same batch size), CPU, measured in
the same run. The policy update (every K batches) is not part of this measurement.

Run: `python -m pytest tests/benchmarks/test_bench_aroid.py -s` (threads:
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

from defenses._aroid_policy import sample_actions
from defenses._aroid_space import apply_actions
from defenses.aroid import AROID

TARGET = 0.15
CASES = {"small_cnn": ENGINE_CASES["small_cnn"]}  # (model config, batch size, images)


@pytest.mark.parametrize("case", sorted(CASES))
def test_aroid_augmentation_vs_pgd10_step(benchmark, case, tmp_path):
    torch.set_num_threads(int(os.environ.get("ROBENCH_BENCH_THREADS", "2")))
    model_cfg, batch, n = CASES[case]
    trainer, state = _trainer(model_cfg, batch, n, tmp_path)
    aroid = AROID(backbone="suite", lambdas=0.0)
    aroid.bind_random_stream(0, state.device)
    aroid.setup(state)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = aroid.policy(x)

    def augment() -> None:
        aroid.augment(state, x)

    def ops_only() -> None:
        apply_actions(x, sample_actions(logits, aroid.generator), aroid.generator)

    t_step = best_time(engine_stepper(trainer, state), repeats=3)
    t_aug = min(best_time(augment, repeats=10) for _ in range(3))
    t_ops = best_time(ops_only, repeats=10)
    ratio = t_aug / t_step
    print(f"\n{case} aroid: policy sampling + ops {t_aug * 1000:.1f} ms per batch of {batch} "
          f"(ops alone {t_ops * 1000:.1f} ms), PGD-10 AT step {t_step * 1000:.0f} ms, "
          f"ratio {100 * ratio:.2f}%")
    benchmark.extra_info.update({"augment_s": t_aug, "ops_s": t_ops, "step_s": t_step,
                                 "ratio": ratio})
    benchmark.pedantic(augment, rounds=10, iterations=1)
    assert ratio < TARGET, f"{case} aroid: augmentation costs {100 * ratio:.1f}% of a step"
