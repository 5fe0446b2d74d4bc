"""AROID's costs on CPU, each side measured in the same run (small CNN target, batches of
128 CIFAR-shaped images, 3 x 32 x 32, channels_last as the engine holds them; the policy
network is the CPU suites' option `backbone="suite"`, the same small CNN):

1. `test_aroid_augmentation_vs_pgd10_step`: the per-batch augmentation (one policy forward,
   sampling, the ops) against one PGD-10 AT step. Target: < 15% of the step
   (`extra_info["ratio"]`).
2. `test_aroid_policy_update_batched_vs_sequential`: one policy update (T = 8), the
   sequential way it was done before (trajectory by trajectory, every op evaluated on every
   image then selected; written out here) against the batched one (one augmentation, attack
   and reward forward on the T x N batch, fused op families), alternating. Target: the
   batched update is not slower (`extra_info["speedup"]`, old / new; also `ops_speedup`,
   `apply_ops` alone on the T x N batch). On a GPU the gain is larger: T times fewer kernel
   launches for everything but the draws.
3. `test_aroid_step_cost_vs_at_passes`: AT+AROID against AT, blocks of K = 5 engine steps
   (one policy update each), alternating; the measured ratio against what the passes
   predict (their work in forward units over AT's, `state.counter.work()`, as `robench
   cost` counts them). Target: measured / predicted <= 1.5 (`extra_info["over_passes"]`).

Run: `python -m pytest tests/benchmarks/test_bench_aroid.py -s` (threads:
`ROBENCH_BENCH_THREADS`, default 2; `ROBENCH_BENCH_AROID_BATCH` shrinks the batch for a quick
check that the benchmark runs).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from test_bench_engine import CASES as ENGINE_CASES
from test_bench_engine import _split, _time_pair, _trainer, best_time, engine_stepper

import defenses._aroid_space as space
from bench.config import DefenseSpec, RunSpec, load_suite
from bench.data import DatasetInfo, Splits
from bench.engine import Trainer
from defenses import augment_ops as A
from defenses._aroid_policy import diversity_penalty, log_prob, sample_actions
from defenses._aroid_space import apply_actions, repeat_batch
from defenses.aroid import AROID

TARGET = 0.15
UPDATE_TARGET, OVER_PASSES_TARGET = 1.0, 1.5
CASES = {"small_cnn": ENGINE_CASES["small_cnn"]}  # (model config, batch size, images)
AROID_PARAMS = {"backbone": "suite", "warmup_epochs": 0, "lambdas": 0.4}


def _batch(default: int) -> int:
    return int(os.environ.get("ROBENCH_BENCH_AROID_BATCH", default))


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


# --------------------------------------------------------------------------- the update


def _aroid_trainer(model_cfg, batch: int, n: int, tmp_path) -> tuple[Trainer, object, AROID]:
    """An AT+AROID engine (T = 8, K = 5, lambda 0.4), set up; the affinity model is a copy of
    the target (the clean-model service is not run: same cost, no pretraining)."""
    suite = load_suite("cifar10-linf")
    suite = replace(suite, model=model_cfg, train=replace(suite.train, batch_size=batch))
    split = _split(n)
    info = DatasetInfo("random-cifar", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    splits = Splits(info, split, split, split, split, split)
    spec = RunSpec(suite.name, "at", (DefenseSpec("aroid", tuple(AROID_PARAMS.items())),), 0)
    trainer = Trainer(spec, suite, splits, tmp_path, device=torch.device("cpu"),
                      progress=False)
    state = trainer.build()
    (aroid,) = trainer.defenses
    aroid.setup(state)
    aroid.affinity_is_clean = True
    return trainer, state, aroid


def all_ops_then_select(x, names, choice, magnitude):
    """`apply_ops` before the fused families: every op on every image, then select."""
    out = x
    for k, name in enumerate(names):
        out = torch.where((choice == k).view(-1, 1, 1, 1), A.OPS[name](x, magnitude), out)
    return A._keep_format(out, x)


def sequential_update(aroid: AROID, state) -> None:
    """The policy update before batching: T trajectories one after another (augmentation
    with every op on every image, attack, reward forwards per trajectory)."""
    policy, g, lam, model = aroid.policy.train(), aroid.generator, aroid.lam(state), state.model
    x, y, _ = state.draw_batch(augment=False)
    logits = policy(x)
    with torch.no_grad():
        ce_clean = F.cross_entropy(aroid.affinity(x), y, reduction="none")
    logprobs, rewards = [], []
    fused, space.apply_ops = space.apply_ops, all_ops_then_select
    try:
        for _ in range(aroid.trajectories):
            a = sample_actions(logits, g)
            x_aug = apply_actions(x, a, g)
            logprobs.append(log_prob(logits, a))
            model.eval()
            with torch.no_grad():
                ce_aug = F.cross_entropy(model(x_aug), y, reduction="none")
            x_adv = state.attack(x_aug, y, steps=2, step_size=state.eps / 4,
                                 random_start=False, attack_bn="eval")
            with torch.no_grad():
                vul = F.cross_entropy(model(x_adv), y, reduction="none") - ce_aug
                aff = (F.cross_entropy(aroid.affinity(x_aug), y, reduction="none")
                       - ce_clean).clamp_min(0)
            model.train()
            rewards.append(vul - lam * aff)
    finally:
        space.apply_ops = fused
    r = torch.stack(rewards, 1)
    loss = -(torch.stack(logprobs, 1) * (r - r.mean(1, keepdim=True))).mean()
    loss = loss + aroid.beta_div * diversity_penalty(logits, aroid.div_lower, aroid.div_upper)
    aroid.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    aroid.optimizer.step()


@pytest.mark.parametrize("case", sorted(CASES))
def test_aroid_policy_update_batched_vs_sequential(benchmark, case, tmp_path):
    torch.set_num_threads(int(os.environ.get("ROBENCH_BENCH_THREADS", "2")))
    model_cfg, batch, n = CASES[case]
    batch = _batch(batch)
    trainer, state, aroid = _aroid_trainer(model_cfg, batch, n, tmp_path)
    state.eps = trainer.suite.train.eps

    def old() -> None:
        sequential_update(aroid, state)

    def new() -> None:
        aroid.update_policy(state)

    t_old, t_new = _time_pair(old, new, repeats=3)
    x = repeat_batch(state.draw_batch(augment=False)[0], aroid.trajectories)
    g = torch.Generator().manual_seed(0)
    choice = torch.randint(0, len(space.COLOUR.ops), (len(x),), generator=g)
    magnitude = torch.rand(len(x), generator=g)
    t_ops_old, t_ops_new = _time_pair(
        lambda: all_ops_then_select(x, space.COLOUR.ops, choice, magnitude),
        lambda: A.apply_ops(x, space.COLOUR.ops, choice, magnitude), repeats=5)
    speedup, ops_speedup = t_old / t_new, t_ops_old / t_ops_new
    print(f"\n{case} aroid policy update (T = {aroid.trajectories}, N = {batch}): sequential "
          f"{t_old * 1000:.0f} ms, batched {t_new * 1000:.0f} ms, speedup {speedup:.2f}x; "
          f"apply_ops on {len(x)} images: every op {t_ops_old * 1000:.1f} ms, fused "
          f"{t_ops_new * 1000:.1f} ms, {ops_speedup:.2f}x")
    benchmark.extra_info.update({"sequential_s": t_old, "batched_s": t_new, "speedup": speedup,
                                 "ops_every_s": t_ops_old, "ops_fused_s": t_ops_new,
                                 "ops_speedup": ops_speedup})
    benchmark.pedantic(new, rounds=2, iterations=1)
    assert speedup >= UPDATE_TARGET, f"{case}: the batched update is {speedup:.2f}x the old"


@pytest.mark.parametrize("case", sorted(CASES))
def test_aroid_step_cost_vs_at_passes(benchmark, case, tmp_path):
    torch.set_num_threads(int(os.environ.get("ROBENCH_BENCH_THREADS", "2")))
    model_cfg, batch, n = CASES[case]
    batch = _batch(batch)
    at, at_state = _trainer(model_cfg, batch, n, tmp_path / "at")
    with_aroid, aroid_state, aroid = _aroid_trainer(model_cfg, batch, n, tmp_path / "aroid")
    k = aroid.update_every
    passes = {}

    def block(trainer: Trainer, state, name: str):
        step = engine_stepper(trainer, state)

        def run() -> None:  # K steps from a multiple of K: exactly one policy update
            state.step -= state.step % k
            before = state.counter.work()
            for _ in range(k):
                step()
                state.step += 1
            passes[name] = state.counter.work() - before
        return run

    t_at, t_aroid = _time_pair(block(at, at_state, "at"),
                               block(with_aroid, aroid_state, "aroid"), repeats=3)
    assert aroid.updates > 0
    ratio, predicted = t_aroid / t_at, passes["aroid"] / passes["at"]
    over = ratio / predicted
    print(f"\n{case} AT+AROID vs AT over {k} steps (batch {batch}): {t_aroid * 1000:.0f} vs "
          f"{t_at * 1000:.0f} ms, ratio {ratio:.2f}x, passes predict {predicted:.2f}x "
          f"({passes['aroid']} vs {passes['at']}), measured / predicted {over:.2f}")
    benchmark.extra_info.update({"at_s": t_at, "aroid_s": t_aroid, "ratio": ratio,
                                 "passes_ratio": predicted, "over_passes": over})
    benchmark.pedantic(block(with_aroid, aroid_state, "aroid"), rounds=1, iterations=1)
    assert over <= OVER_PASSES_TARGET, f"{case}: AT+AROID costs {over:.2f}x its passes"
