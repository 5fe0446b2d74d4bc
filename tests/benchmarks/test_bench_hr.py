"""Cost of HR's exact per-batch solver: one solve on a batch of 128 losses against one
PGD-10 AT training step of the engine (small CNN, CIFAR-shaped batch of 128), CPU, same run.

Run: `python -m pytest tests/benchmarks/test_bench_hr.py -s` (threads:
`ROBENCH_BENCH_THREADS`, default 2)
Target: solver < 5% of the training step. The measured ratio is printed and stored in
`benchmark.extra_info["ratio"]`.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_bench_engine import CASES as ENGINE_CASES
from test_bench_engine import _trainer, best_time, engine_stepper

from defenses.hr import worst_case_weights

TARGET = 0.05
SETTINGS = {"alpha=0.05,r=0.1": (0.05, 0.1), "alpha=0,r=0.2": (0.0, 0.2)}
CASES = {"small_cnn": ENGINE_CASES["small_cnn"]}  # (model config, batch size, images)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_solver_vs_pgd10_step(benchmark, case, setting, tmp_path):
    torch.set_num_threads(int(os.environ.get("ROBENCH_BENCH_THREADS", "2")))
    model_cfg, batch, n = CASES[case]
    alpha, r = SETTINGS[setting]
    trainer, state = _trainer(model_cfg, batch, n, tmp_path)
    losses = torch.rand(batch, generator=torch.Generator().manual_seed(0)) * 4

    def solve() -> None:
        worst_case_weights(losses, alpha, r)

    t_step = best_time(engine_stepper(trainer, state), repeats=3)
    t_solver = min(best_time(solve, repeats=50) for _ in range(3))
    ratio = t_solver / t_step
    print(f"\n{case} {setting}: solver {t_solver * 1000:.2f} ms per batch of {batch}, "
          f"PGD-10 AT step {t_step * 1000:.0f} ms, ratio {100 * ratio:.2f}%")
    benchmark.extra_info.update({"solver_s": t_solver, "step_s": t_step, "ratio": ratio})
    benchmark.pedantic(solve, rounds=20, iterations=5)
    assert ratio < TARGET, f"{case} {setting}: the solver costs {100 * ratio:.1f}% of a step"
