"""RWP: the Loss Stationary Condition mask, the global rescaling, the K2-step ascent
against an independent re-implementation of the spec, the pass count, and the shared
defense invariants (tests/invariants.py) with `at` and `trades`."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import with_train
from invariants import (
    assert_same_state,
    check_resume_equals_uninterrupted,
    check_weights_clean_outside_update,
    check_zero_strength_is_plain,
    model_state,
    train,
)
from torch import nn

from bench.config import ConfigError, DefenseSpec, RunSpec
from bench.engine import Trainer
from bench.records import load_checkpoint, read_history
from bench.state import kernel_parameters
from defenses.registry import build_defenses
from defenses.rwp import (
    RWP,
    ascend,
    global_norm,
    global_perturbation,
    lsc_mask,
    masked_mean,
)

# c_min = 2.5 lets part of the smoke suite's batch through (the default 1.7 lets none
# through in 2 epochs, so the defaults are the plain method there).
REAL = (("gamma", 0.05), ("c_min", 2.5), ("warmup", 0.0))
ZERO = (("gamma", 0.0), ("c_min", 2.5), ("warmup", 0.0))


# ---- the pure functions -------------------------------------------------------------
def test_mask_keeps_examples_strictly_below_the_threshold():
    losses = torch.tensor([0.5, 1.69, 1.7, 2.5, 0.0, float("nan")])
    assert lsc_mask(losses, 1.7).tolist() == [True, True, False, False, True, False]
    assert not lsc_mask(losses, 0.0).any()  # a CE loss is never below 0


def test_masked_mean_runs_over_the_whole_batch():
    losses = torch.tensor([1.0, 3.0, 0.5, 4.0], requires_grad=True)
    mask = lsc_mask(losses, 2.0)
    value = masked_mean(losses, mask)
    assert value.item() == pytest.approx((1.0 + 0.5) / 4)  # not / 2
    (grad,) = torch.autograd.grad(value, losses)
    assert grad.tolist() == [0.25, 0.0, 0.25, 0.0]  # masked examples contribute nothing


def test_perturbation_norm_is_gamma_times_the_norm_of_all_kernels_together():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(8, 4, 3, 3, generator=gen), 10 * torch.randn(10, 32, generator=gen)]
    direction = [torch.randn(8, 4, 3, 3, generator=gen), 1e-3 * torch.randn(10, 32, generator=gen)]
    v = global_perturbation(direction, global_norm(weights), gamma=0.01)
    flat_w = torch.cat([w.flatten() for w in weights])
    flat_a = torch.cat([a.flatten() for a in direction])
    flat_v = torch.cat([t.flatten() for t in v])
    torch.testing.assert_close(flat_v.norm(), 0.01 * flat_w.norm(), rtol=1e-5, atol=0)
    assert F.cosine_similarity(flat_v, flat_a, dim=0) > 0.9999  # along a, one common scale
    # not per layer: the layers' relative norms are far from gamma (AWP would give 0.01 each)
    relative = [(vl.norm() / w.norm()).item() for vl, w in zip(v, weights)]
    assert relative[0] > 0.1 and relative[1] < 1e-3


def test_zero_direction_or_zero_gamma_gives_zero_perturbation():
    weights = [torch.ones(3, 3), torch.ones(2, 2)]
    v = global_perturbation([torch.zeros(3, 3), torch.zeros(2, 2)], global_norm(weights), 0.1)
    assert all(torch.count_nonzero(t) == 0 and torch.isfinite(t).all() for t in v)
    v = global_perturbation([torch.ones(3, 3), torch.ones(2, 2)], global_norm(weights), 0.0)
    assert all(torch.count_nonzero(t) == 0 for t in v)


# ---- the ascent ---------------------------------------------------------------------
def _tiny_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    return model, torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _spec_rwp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gamma: float, c_min: float,
              steps: int) -> dict[str, torch.Tensor]:
    """The spec's algorithm written independently, with a functional forward."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = [n for n, _ in kernel_parameters(model)]
    w_norm = torch.cat([params[n].flatten() for n in names]).norm()
    a = {n: torch.zeros_like(params[n]) for n in names}
    v = {n: torch.zeros_like(params[n]) for n in names}
    for _ in range(steps):
        current = {n: (p + v[n] if n in v else p).requires_grad_() for n, p in params.items()}
        losses = F.cross_entropy(torch.func.functional_call(model, current, (x,)), y,
                                 reduction="none")
        m = (losses.detach() < c_min).float()
        grads = torch.autograd.grad((losses * m).mean(), [current[n] for n in names])
        for n, g in zip(names, grads):
            a[n] = a[n] + g
        a_norm = torch.cat([a[n].flatten() for n in names]).norm()
        v = {n: gamma * w_norm / a_norm * a[n] for n in names}
    return v


def test_ascent_matches_the_spec_and_recomputes_the_mask_at_every_step():
    model, x, y = _tiny_problem()
    with torch.no_grad():
        c_min = F.cross_entropy(model(x), y, reduction="none").median().item() + 1e-3
    expected = _spec_rwp(model, x, y, gamma=0.3, c_min=c_min, steps=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks: list[torch.Tensor] = []

    def loss_fn() -> torch.Tensor:
        losses = F.cross_entropy(model(x), y, reduction="none")
        masks.append(lsc_mask(losses, c_min))
        return losses

    kernels = [p for _, p in kernel_parameters(model)]
    v, passed = ascend(loss_fn, kernels, gamma=0.3, c_min=c_min, steps=10)
    assert len(masks) == 10 and passed.shape == (10,)
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # the mask moved with v
    torch.testing.assert_close(passed, torch.stack([m.float().mean() for m in masks]))
    names = [n for n, _ in kernel_parameters(model)]
    for name, vl in zip(names, v, strict=True):
        torch.testing.assert_close(vl, expected[name], rtol=1e-4, atol=1e-7)
    for name, p in model.named_parameters():  # every parameter left clean, bit for bit
        assert torch.equal(p, before[name]), name


def _per_kernel_ascend(loss_fn, kernels, gamma, c_min, steps):
    """The per-kernel loops the batched `ascend` replaced (norms, sums, copies one by one)."""
    def norm_of_all(tensors):
        return torch.stack([t.detach().float().norm() for t in tensors]).norm()

    clean = [p.detach().clone() for p in kernels]
    weight_norm = norm_of_all(clean)
    accumulated = [torch.zeros_like(p, dtype=torch.float32) for p in kernels]
    perturbation, passed = [], []
    try:
        for _ in range(steps):
            losses = loss_fn().float()
            mask = lsc_mask(losses, c_min)
            passed.append(mask.float().mean())
            grads = torch.autograd.grad(masked_mean(losses, mask), kernels, allow_unused=True)
            for a, g in zip(accumulated, grads, strict=True):
                if g is not None:
                    a.add_(g.float())
            a_norm = norm_of_all(accumulated)
            scale = torch.where(a_norm > 0, gamma * weight_norm / a_norm.clamp_min(1e-30),
                                torch.zeros_like(a_norm))
            perturbation = [(a.float() * scale).to(p.dtype) for a, p in zip(accumulated, kernels)]
            with torch.no_grad():
                for p, w, v in zip(kernels, clean, perturbation, strict=True):
                    p.copy_(w + v)
    finally:
        with torch.no_grad():
            for p, w in zip(kernels, clean, strict=True):
                p.copy_(w)
    return perturbation, torch.stack(passed)


def test_batched_ascent_is_the_per_kernel_loop_bit_for_bit():
    runs = []
    for implementation in (ascend, _per_kernel_ascend):
        torch.manual_seed(11)
        model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.Flatten(),
                              nn.Linear(8 * 4 * 4, 5), nn.Linear(5, 4, bias=False))
        model = model.to(memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(4)
        x, y = torch.randn(24, 3, 8, 8, generator=gen), torch.randint(0, 4, (24,), generator=gen)
        kernels = [p for _, p in kernel_parameters(model)]
        with torch.no_grad():
            c_min = F.cross_entropy(model(x), y, reduction="none").median().item() + 1e-3
        trace = []  # the kernels each step's forward saw

        def loss_fn(model=model, kernels=kernels, trace=trace, x=x, y=y):
            trace.append([p.detach().clone() for p in kernels])
            return F.cross_entropy(model(x), y, reduction="none")

        v, passed = implementation(loss_fn, kernels, 0.2, c_min, 6)
        runs.append((v, passed, trace, [p.detach().clone() for p in model.parameters()]))
    (v1, passed1, trace1, after1), (v2, passed2, trace2, after2) = runs
    assert torch.equal(passed1, passed2) and 0 < passed1[0] < 1
    for a, b in zip([*v1, *after1], [*v2, *after2], strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for step1, step2 in zip(trace1, trace2, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(step1, step2, strict=True))


def test_no_example_passing_gives_zero_perturbation_and_clean_kernels():
    model, x, y = _tiny_problem()
    before = [p.detach().clone() for _, p in kernel_parameters(model)]
    kernels = [p for _, p in kernel_parameters(model)]
    v, passed = ascend(lambda: F.cross_entropy(model(x), y, reduction="none"), kernels,
                       gamma=0.5, c_min=0.0, steps=4)
    assert passed.sum() == 0
    assert all(torch.count_nonzero(t) == 0 for t in v)
    assert all(torch.equal(p, b) for p, b in zip(kernels, before))


# ---- in the engine ------------------------------------------------------------------
def _state_after_attack(smoke_suite, smoke_splits, tmp_path, method: str):
    trainer = Trainer(RunSpec("smoke", method, (), 0), smoke_suite, smoke_splits, tmp_path,
                      progress=False)
    state = trainer.build()
    x, y, _ = next(iter(trainer.loader))
    state.x, state.y, state.eps = x, y, smoke_suite.train.eps  # eps 0 would give x_adv = x
    state.x_adv = trainer.method.attack(state)
    trainer.model.train()
    return trainer, state


@pytest.mark.parametrize(("method", "forwards_per_step"), [("at", 1), ("trades", 2)])
def test_passes_per_batch_and_restoration_without_a_step(smoke_suite, smoke_splits, tmp_path,
                                                         method, forwards_per_step):
    trainer, state = _state_after_attack(smoke_suite, smoke_splits, tmp_path, method)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    buffers = {n: b.clone() for n, b in trainer.model.named_buffers()}
    fwd, bwd = state.counter.forward, state.counter.backward
    with RWP(gamma=0.05, c_min=10.0, ascent_steps=10, warmup=0.0).around_update(state):
        assert all(not torch.equal(before[n], p) for n, p in kernel_parameters(trainer.model))
        for name, p in trainer.model.named_parameters():
            if p.ndim <= 1:  # biases and BN affine parameters are not perturbed
                assert torch.equal(p, before[name]), name
    assert state.counter.forward - fwd == 10 * forwards_per_step
    assert state.counter.backward - bwd == 10
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)
    for name, b in trainer.model.named_buffers():  # BN statistics untouched by the ascent
        assert torch.equal(b, buffers[name]), name


@pytest.mark.parametrize("method", ["at", "trades"])
def test_zero_strength_rwp_is_plain_method_bit_for_bit(tmp_path, smoke_suite, smoke_splits,
                                                      method):
    check_zero_strength_is_plain(tmp_path, smoke_suite, smoke_splits, method,
                                 zero=DefenseSpec("rwp", ZERO), real=DefenseSpec("rwp", REAL))


def test_nothing_passing_the_mask_is_plain_at(tmp_path, smoke_suite, smoke_splits):
    plain = train(tmp_path / "plain", smoke_suite, smoke_splits)
    masked = train(tmp_path / "masked", smoke_suite, smoke_splits,
                   defenses=[DefenseSpec("rwp", (("gamma", 0.05), ("c_min", 0.0)))])
    assert_same_state(model_state(plain.run_dir), model_state(masked.run_dir))


@pytest.mark.parametrize("method", ["at", "trades"])
def test_rwp_resume_equals_uninterrupted(tmp_path, smoke_suite, smoke_splits, method):
    check_resume_equals_uninterrupted(tmp_path, with_train(smoke_suite, epochs=3), smoke_splits,
                                      method, (DefenseSpec("rwp", REAL),))


@pytest.mark.parametrize("method", ["at", "trades"])
def test_rwp_weights_clean_outside_around_update(tmp_path, smoke_suite, smoke_splits, method):
    check_weights_clean_outside_update(tmp_path, smoke_suite, smoke_splits,
                                       RWP(gamma=0.05, c_min=10.0, ascent_steps=10, warmup=0.0),
                                       method=method)


def test_bf16_channels_last_code_path_on_cpu(tmp_path, smoke_suite, smoke_splits):
    """The CUDA configuration (bf16 autocast, channels_last) with TRADES-RWP on the CPU:
    it trains, the mask lets examples through, weights stay fp32 and finite."""
    spec = RunSpec(smoke_suite.name, "trades", (DefenseSpec("rwp", REAL),), 0)
    trainer = Trainer(spec, smoke_suite, smoke_splits, tmp_path, progress=False,
                      mixed_precision=True, channels_last=True)
    trainer.train()
    rows = read_history(tmp_path / "history.jsonl")
    assert len(rows) == 2 and all(0 < r["rwp.lsc_pass_first"] <= 1 for r in rows)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ---- parameters ---------------------------------------------------------------------
def test_defaults_and_trades_method_defaults(smoke_suite):
    (at,) = build_defenses((DefenseSpec("rwp"),), "at", smoke_suite)
    assert (at.gamma, at.c_min, at.ascent_steps, at.warmup) == (0.01, 1.7, 10, 0.0)
    (tr,) = build_defenses((DefenseSpec("rwp"),), "trades", smoke_suite)
    assert (tr.gamma, tr.c_min, tr.ascent_steps, tr.warmup) == (0.005, 1.7, 10, 0.05)
    (tr,) = build_defenses((DefenseSpec("rwp", (("gamma", 0.02),)),), "trades", smoke_suite)
    assert tr.gamma == 0.02 and tr.warmup == 0.05


class _Progress:
    def __init__(self, epoch: int, epochs: int) -> None:
        self.epoch, self.epochs = epoch, epochs


def test_warmup_is_a_fraction_of_training():
    rwp = RWP(gamma=0.005, c_min=1.7, ascent_steps=10, warmup=0.05)
    assert not rwp.active(_Progress(9, 200)) and rwp.active(_Progress(10, 200))
    assert not RWP(gamma=0.01, c_min=1.7, ascent_steps=10, warmup=1.0).active(_Progress(1, 2))


@pytest.mark.parametrize(("params", "message"), [
    ({"gamma": -0.01}, "gamma must be"),
    ({"gamma": math.nan}, "gamma must be"),
    ({"gamma": math.inf}, "gamma must be"),
    ({"c_min": -1.0}, "c_min"),
    ({"c_min": math.nan}, "c_min"),
    ({"ascent_steps": 0}, "ascent_steps must be an integer >= 1"),
    ({"ascent_steps": 2.5}, "ascent_steps must be an integer >= 1"),
    ({"ascent_steps": True}, "ascent_steps must be an integer >= 1"),
    ({"warmup": 5}, "fraction of training"),
    ({"warmup": -0.1}, "fraction of training"),
])
def test_bad_parameters_are_refused(params, message):
    values = {"gamma": 0.01, "c_min": 1.7, "ascent_steps": 10, "warmup": 0.0} | params
    with pytest.raises(ValueError, match=message):
        RWP(**values)


def test_integral_float_steps_accepted_and_bad_combinations_refused(smoke_suite):
    assert RWP(gamma=0.01, c_min=1.7, ascent_steps=10.0, warmup=0.0).ascent_steps == 10
    with pytest.raises(ConfigError, match=r"no parameter\(s\) \['K2'\]"):
        build_defenses((DefenseSpec("rwp", (("K2", 5),)),), "at", smoke_suite)
    with pytest.raises(ConfigError, match="does not compose with method 'fgsm_rs'"):
        build_defenses((DefenseSpec("rwp"),), "fgsm_rs", smoke_suite)


def test_trades_rwp_thresholds_the_per_example_trades_loss(smoke_suite, smoke_splits, tmp_path):
    """TRADES-RWP's repaired objective (docs/defenses/rwp.md): the released code adds a
    per-example CE of shape (N,) to an unreduced KL of shape (N, C) and crashes; ours sums
    the KL over classes first. Re-derived here: l_i = CE(f(x_i), y_i) + beta * sum_c
    p_c(x_i) log(p_c(x_i) / p_c(x_adv_i)); one step with v = 0 masks l_i < c_min and moves
    the kernels by gamma * ||W|| * a / ||a||, a the gradient of (1/B) sum_i m_i l_i."""
    trainer, state = _state_after_attack(smoke_suite, smoke_splits, tmp_path, "trades")
    with torch.no_grad():  # sharper logits: at initialisation the KL term is negligible
        kernel_parameters(trainer.model)[-1][1].mul_(5.0)
    state.x_adv = trainer.method.attack(state)
    trainer.model.train()
    beta = smoke_suite.train.trades_beta
    twin = copy.deepcopy(trainer.model).train()
    log_p = F.log_softmax(twin(state.x), dim=1)
    log_q = F.log_softmax(twin(state.x_adv), dim=1)
    losses = F.nll_loss(log_p, state.y, reduction="none") + beta * (
        log_p.exp() * (log_p - log_q)).sum(dim=1)
    assert losses.shape == state.y.shape
    ce = F.nll_loss(log_p, state.y, reduction="none")
    assert (losses - ce).mean() > 0.2 * ce.mean()  # the KL term matters here
    c_min = losses.median().item() + 1e-4
    mask = (losses < c_min).float()
    assert 0 < mask.mean() < 1
    names = [n for n, _ in kernel_parameters(twin)]
    params = dict(twin.named_parameters())
    a = torch.autograd.grad((losses * mask).sum() / len(losses), [params[n] for n in names])
    a_norm = torch.cat([g.flatten() for g in a]).norm()
    w_norm = torch.cat([params[n].detach().flatten() for n in names]).norm()
    kernels = dict(kernel_parameters(trainer.model))
    before = {n: p.detach().clone() for n, p in kernels.items()}
    with RWP(gamma=0.05, c_min=c_min, ascent_steps=1, warmup=0.0).around_update(state):
        moved = {n: p.detach() - before[n] for n, p in kernels.items()}
    assert float(state.logs["rwp.lsc_pass_first"][-1]) == pytest.approx(mask.mean().item())
    for n, g in zip(names, a):
        torch.testing.assert_close(moved[n], 0.05 * w_norm * g / a_norm, rtol=1e-4, atol=1e-7)
