"""Cost of CURE on top of TRADES, and of its conserve masks and revision update before and
after they were batched. In ONE process, CPU, the same model, data and batch size, one
training step of each side in turn (alternating, best of several):

  - TRADES (the engine's `trades` method, PGD-10 attack), no defense;
  - TRADES + CURE as it is (all masked tensors in one sort, the revision update as three
    foreach operations with the gate folded in);
  - TRADES + CURE with the per-tensor masks (`kthvalue` and the tie pass on each masked
    tensor) and the per-parameter revision update it had before, written out again here.

Every step is a CURE step (`clean_fraction = 0`: no clean phase), so the per-epoch ratio
is the per-step ratio (with the default clean phase, 40% of the epochs cost what standard
training costs). Printed and stored in `benchmark.extra_info`: seconds per step of each
side, the ratios CURE / TRADES (new and old), the ratio that the passes predict (from
`state.counter.work()`: a forward 1, an input-gradient backward 1, a weight-gradient
backward 2, as `robench cost`), their quotient (the issue's target:
<= 1.5), and the seconds of the conserve + revise hooks alone (new and old).

Run: `python -m pytest tests/benchmarks/test_bench_cure.py -s` (threads:
`ROBENCH_BENCH_THREADS`, default 2); `-k tiny` for a quick check that it runs.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace

import pytest
import torch
from test_bench_engine import _split

from bench.config import ModelConfig, RunSpec, load_suite
from bench.data import DatasetInfo, Splits
from bench.engine import Trainer
from defenses._cure_ops import conserved_count, last_linear_parameters
from defenses.cure import CURE

TARGET = 1.5
CASES = {
    # name: (model config, batch size, images, CURE mode)
    "preact_resnet18-rgp_soft": (ModelConfig("preact_resnet18", {}), 16, 64, "rgp_soft"),
    "preact_resnet18-paper": (ModelConfig("preact_resnet18", {}), 16, 64, "paper"),
    "tiny-rgp_soft": (ModelConfig("preact_resnet18", {"width": 4}), 8, 16, "rgp_soft"),
    "tiny-paper": (ModelConfig("preact_resnet18", {"width": 4}), 8, 16, "paper"),
}


def old_update_mask(score: torch.Tensor, percent: float) -> torch.Tensor:
    """The per-tensor selection before batching (True = update)."""
    flat = score.reshape(-1)
    n = flat.numel()
    k = conserved_count(percent, n)
    if k == 0:
        return torch.ones(score.shape, dtype=torch.bool, device=score.device)
    if k >= n:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    kth = torch.kthvalue(flat, k).values
    below = flat < kth
    ties = flat == kth
    conserve = below | (ties & (torch.cumsum(ties, 0) <= k - below.sum()))
    return (~conserve).view(score.shape)


class OldCURE(CURE):
    """CURE with the per-tensor masks and the per-parameter revision update."""

    def after_backward(self, state) -> None:
        if self.percent == 0 or self._clean(state):
            return
        params = [p for p in state.model.parameters() if p.requires_grad]
        a = self.alpha_c
        if self.mode == "rgp_soft":
            ce, kl = state.term_grads["cure.ce_clean"], state.term_grads["cure.kl"]
            masked = [params[i] for i in self.masked]
            scores = [a * ce[i].float() + (1 - a) * kl[i].float() for i in self.masked]
        elif self.mode == "paper":
            masked = params
            scores = [a * gc.float().abs() + (1 - a) * ga.float().abs()
                      for gc, ga in zip(state.term_grads["cure.ce_clean"],
                                        state.term_grads["cure.ce_adv"])]
        else:
            classifier = {id(p) for p in last_linear_parameters(state.model)}
            masked = [p for p in params if id(p) not in classifier and p.grad is not None]
            scores = [p.grad.abs() for p in masked]
        for p, score in zip(masked, scores, strict=True):
            if p.grad is not None:
                p.grad.masked_fill_(~old_update_mask(score, self.percent), 0.0)

    def after_step(self, state) -> None:
        if self._clean(state):
            return
        u = torch.rand((), generator=self.generator, device=self.generator.device)
        gate = (u < self.revision_rate).to(state.device)
        t = state.step + 1 - self.clean_epochs * state.batches_per_epoch
        decay = min(1 - 1 / (t + 1), self.revision_decay)
        with torch.no_grad():
            for r, p in zip(self._revision().parameters(), state.model.parameters()):
                r.copy_(torch.where(gate, r * decay + p.detach() * (1 - decay), r))
        state.log("cure.revised", gate.float())
        self._logits = None


def _trainer(model_cfg: ModelConfig, batch: int, n: int, tmp_path, defense: CURE | None):
    suite = load_suite("cifar10-linf")
    suite = replace(suite, model=model_cfg, train=replace(suite.train, batch_size=batch))
    split = _split(n)
    info = DatasetInfo("random-cifar", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    splits = Splits(info, split, split, split, split, split)
    trainer = Trainer(RunSpec(suite.name, "trades", (), 0), suite, splits, tmp_path,
                      device=torch.device("cpu"), progress=False)
    state = trainer.build()
    if defense is not None:
        trainer.defenses = [defense]
        defense.bind_random_stream(0, state.device)
        trainer._bind_defenses()
        defense.setup(state)
        defense.on_epoch_start(state)
    return trainer, state


def _stepper(trainer: Trainer, state):
    """One training step on the next batch (cycling); returns the passes it counted."""
    batches = iter(trainer.loader)

    def step() -> tuple[int, int, float]:
        nonlocal batches
        try:
            x, y, index = next(batches)
        except StopIteration:
            batches = iter(trainer.loader)
            x, y, index = next(batches)
        c = state.counter
        fwd, bwd, work = c.forward, c.backward, c.work()
        trainer.train_step(state, x, y, index)
        state.step += 1
        return c.forward - fwd, c.backward - bwd, c.work() - work

    return step


def _time_alternating(fns: list, repeats: int) -> list[float]:
    """Best-of-`repeats` seconds of each function, called in turn (a, b, c, a, b, c, ...)
    after one warm-up call each, so that a load change hits every side alike."""
    for fn in fns:
        fn()
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@pytest.mark.parametrize("case", sorted(CASES))
def test_trades_cure_step_vs_trades(benchmark, case, tmp_path):
    torch.set_num_threads(int(os.environ.get("ROBENCH_BENCH_THREADS", "2")))
    model_cfg, batch, n, mode = CASES[case]
    params = {"mode": mode, "clean_fraction": 0.0}
    plain = _trainer(model_cfg, batch, n, tmp_path / "trades", None)
    new = _trainer(model_cfg, batch, n, tmp_path / "new", CURE(**params))
    old = _trainer(model_cfg, batch, n, tmp_path / "old", OldCURE(**params))
    steps = [_stepper(*plain), _stepper(*new), _stepper(*old)]
    fwd_t, bwd_t, work_t = steps[0]()
    fwd_c, bwd_c, work_c = steps[1]()
    assert steps[2]() == (fwd_c, bwd_c, work_c)
    predicted = work_c / work_t  # forward units, as `robench cost` (PassCounter.work)

    repeats = 3 if "tiny" not in case else 2
    t_trades, t_new, t_old = _time_alternating(steps, repeats)

    # the two hooks alone, on a state that has just taken a step (gradients, term_grads)
    def hooks(trainer, state):
        def run() -> None:
            trainer.defenses[0].after_backward(state)
            trainer.defenses[0].after_step(state)
        return run
    h_new, h_old = _time_alternating([hooks(*new), hooks(*old)], 3 * repeats)

    ratio_new, ratio_old = t_new / t_trades, t_old / t_trades
    print(f"\n{case}: TRADES {t_trades * 1000:.0f} ms/step; +CURE {t_new * 1000:.0f} ms "
          f"({ratio_new:.2f}x), +CURE per-tensor {t_old * 1000:.0f} ms ({ratio_old:.2f}x); "
          f"passes predict {predicted:.2f}x (fwd/bwd {fwd_c}/{bwd_c} vs {fwd_t}/{bwd_t}); "
          f"measured/predicted {ratio_new / predicted:.2f}; conserve + revise "
          f"{h_new * 1000:.1f} ms vs {h_old * 1000:.1f} ms per-tensor")
    benchmark.extra_info.update({
        "trades_s": t_trades, "cure_s": t_new, "cure_old_s": t_old, "ratio": ratio_new,
        "ratio_old": ratio_old, "predicted_ratio": predicted,
        "ratio_over_predicted": ratio_new / predicted, "hooks_s": h_new, "hooks_old_s": h_old,
        "passes": {"trades": [fwd_t, bwd_t], "cure": [fwd_c, bwd_c]}})
    benchmark.pedantic(steps[1], rounds=1, iterations=1)
    if "tiny" not in case:
        assert ratio_new / predicted <= TARGET, (
            f"{case}: CURE costs {ratio_new:.2f}x TRADES, passes predict {predicted:.2f}x")
