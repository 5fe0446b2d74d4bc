"""AWP: the layer-wise normalised weight perturbation, and AWP inside the engine (the
adversarial loss rises under the perturbation, the step is the perturbed gradient applied
to the clean weights, BatchNorm statistics see only the training forward)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import with_train
from invariants import (
    check_resume_equals_uninterrupted,
    check_weights_clean_outside_update,
    check_zero_strength_is_plain,
)

from bench.config import DefenseSpec, RunSpec
from bench.engine import Trainer
from bench.state import kernel_parameters
from defenses.awp import AWP, layerwise_perturbation


def test_perturbation_has_relative_norm_gamma_per_layer():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(8, 4, 3, 3, generator=gen), torch.randn(10, 32, generator=gen)]
    grads = [torch.randn(8, 4, 3, 3, generator=gen) * 1e-3, torch.randn(10, 32, generator=gen)]
    v = layerwise_perturbation(weights, grads, gamma=0.01)
    for w, g, vl in zip(weights, grads, v):
        torch.testing.assert_close(vl.norm(), 0.01 * w.norm(), rtol=1e-5, atol=0)
        cosine = torch.nn.functional.cosine_similarity(vl.flatten(), g.flatten(), dim=0)
        assert cosine > 0.9999  # along the gradient (ascent)


def test_zero_gradient_layer_gets_no_perturbation():
    weights = [torch.ones(3, 3), torch.ones(2, 2)]
    grads = [torch.zeros(3, 3), torch.ones(2, 2)]
    v = layerwise_perturbation(weights, grads, gamma=0.1)
    assert torch.equal(v[0], torch.zeros(3, 3))
    assert torch.isfinite(v[1]).all() and v[1].norm() > 0


def _per_layer_loop(weights, grads, gamma):
    """The per-layer loop the batched version replaced (one norm, scale and product each)."""
    out = []
    for w, g in zip(weights, grads, strict=True):
        g = g.float()
        g_norm = g.norm()
        scale = torch.where(g_norm > 0, gamma * w.detach().float().norm() / g_norm.clamp_min(1e-30),
                            torch.zeros_like(g_norm))
        out.append((g * scale).to(w.dtype))
    return out


def test_batched_perturbation_is_the_per_layer_loop_bit_for_bit():
    gen = torch.Generator().manual_seed(5)
    shapes = [(16, 3, 3, 3), (32, 16, 3, 3), (32, 16, 1, 1), (10, 64), (7, 7)]
    for trial in range(10):
        weights = [torch.randn(s, generator=gen) * (trial + 1) for s in shapes]
        grads = [torch.randn(s, generator=gen) * 10.0 ** (-2 * i) for i, s in enumerate(shapes)]
        weights[1] = weights[1].to(memory_format=torch.channels_last)
        grads[1] = grads[1].to(memory_format=torch.channels_last)
        grads[trial % len(shapes)].zero_()  # a layer with no gradient, somewhere
        got = layerwise_perturbation(weights, grads, gamma=0.01)
        want = _per_layer_loop(weights, grads, 0.01)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert a.dtype == b.dtype and torch.equal(a, b), (trial, i)


def test_gamma_zero_is_exactly_zero():
    v = layerwise_perturbation([torch.randn(4, 4)], [torch.randn(4, 4)], gamma=0.0)
    assert torch.count_nonzero(v[0]) == 0


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        AWP(gamma=-1.0, warmup=0.0)
    with pytest.raises(ValueError, match="fraction of training"):
        AWP(gamma=0.01, warmup=5)


# ---- AWP inside the engine ---------------------------------------------------------------
# One real training step (bench.engine.Trainer.train_step, method `at`) on the smoke suite's
# tiny CNN with BatchNorm, recorded from outside: the model right after the attack, x_adv,
# and the weights the optimizer steps from. The expectations are re-derived here by hand.
GAMMA = 0.01


def awp_step(tmp_path, suite, splits, gamma=GAMMA) -> tuple[Trainer, dict]:
    spec = RunSpec(suite.name, "at", (DefenseSpec("awp", (("gamma", gamma), ("warmup", 0.0))),),
                   0)
    trainer = Trainer(spec, suite, splits, tmp_path, device=torch.device("cpu"), progress=False)
    state = trainer.build()
    batches = iter(trainer.loader)
    trainer.train_step(state, *next(batches))  # a first step: momentum buffers exist
    state.step += 1
    model, opt = trainer.model, trainer.optimizer
    seen: dict = {}
    attack, step = trainer.method.attack, opt.step

    def recording_attack(st, **kw):
        x_adv = attack(st, **kw)
        seen["model"] = copy.deepcopy(model)  # weights and BatchNorm statistics before AWP
        seen["x_adv"], seen["y"] = x_adv.detach().clone(), st.y.clone()
        seen["buffers"] = {n: opt.state[p]["momentum_buffer"].clone()
                           for n, p in model.named_parameters()}
        return x_adv

    def recording_step(*args, **kwargs):
        seen["stepped_from"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        group = opt.param_groups[0]
        seen["sgd"] = (group["lr"], group["momentum"], group["weight_decay"])
        return step(*args, **kwargs)

    trainer.method.attack, opt.step = recording_attack, recording_step
    trainer.train_step(state, *next(batches))
    assert {"model", "stepped_from"} <= set(seen)
    return trainer, seen


def adv_loss(model: torch.nn.Module, seen: dict, weights: dict | None = None) -> torch.Tensor:
    """Mean CE on x_adv in train mode (batch statistics), on a copy: nothing is touched."""
    twin = copy.deepcopy(model).train()
    if weights is not None:
        with torch.no_grad():
            for n, p in twin.named_parameters():
                p.copy_(weights[n])
    return F.cross_entropy(twin(seen["x_adv"]), seen["y"]), twin


def hand_perturbation(seen: dict) -> dict[str, torch.Tensor]:
    """AWP's v by hand: one ascent step on the adversarial CE at the clean weights,
    v_l = gamma * ||w_l|| * g_l / ||g_l|| on each conv/linear kernel, 0 elsewhere."""
    loss, twin = adv_loss(seen["model"], seen)
    params = dict(twin.named_parameters())
    kernels = [n for n, _ in kernel_parameters(twin)]
    grads = dict(zip(kernels, torch.autograd.grad(loss, [params[n] for n in kernels])))
    return {n: (GAMMA * p.detach().norm() * grads[n] / grads[n].norm() if n in grads
                else torch.zeros_like(p)) for n, p in params.items()}


def test_awp_in_the_engine_trains_where_the_adversarial_loss_is_higher(
        tmp_path, smoke_suite, smoke_splits):
    _, seen = awp_step(tmp_path, smoke_suite, smoke_splits)
    clean, _ = adv_loss(seen["model"], seen)
    perturbed, _ = adv_loss(seen["model"], seen, seen["stepped_from"])
    assert perturbed.item() > clean.item() + 1e-4  # an ascent step, not a descent step
    v = hand_perturbation(seen)  # and it is AWP's perturbation, to the value
    for n, p in seen["model"].named_parameters():
        torch.testing.assert_close(seen["stepped_from"][n] - p.detach(), v[n], rtol=1e-4,
                                   atol=1e-7)


def test_awp_step_is_the_perturbed_gradient_applied_to_the_clean_weights(
        tmp_path, smoke_suite, smoke_splits):
    """w1 = (w + v) - lr * b' - v = w - lr * b', with b' = momentum * b + g(w + v) +
    wd * (w + v): SGD written out by hand; the weights end clean (v removed)."""
    trainer, seen = awp_step(tmp_path, smoke_suite, smoke_splits)
    lr, momentum, wd = seen["sgd"]
    v = hand_perturbation(seen)
    clean = {n: p.detach() for n, p in seen["model"].named_parameters()}
    perturbed = {n: clean[n] + v[n] for n in clean}
    loss, twin = adv_loss(seen["model"], seen, perturbed)
    names = [n for n, _ in twin.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(twin.parameters()))))
    for n, p in trainer.model.named_parameters():
        buf = momentum * seen["buffers"][n] + grads[n] + wd * perturbed[n]
        torch.testing.assert_close(p.detach(), clean[n] - lr * buf, rtol=1e-5, atol=1e-6)


def test_awp_forwards_leave_batchnorm_statistics_to_the_training_forward(
        tmp_path, smoke_suite, smoke_splits):
    """BatchNorm running statistics after the step are those of exactly one train-mode
    forward on x_adv at the perturbed weights (the training forward); AWP's own ascent
    forward leaves them alone, as the reference's proxy model does."""
    trainer, seen = awp_step(tmp_path, smoke_suite, smoke_splits)
    _, twin = adv_loss(seen["model"], seen, seen["stepped_from"])  # one forward, train mode
    expected = dict(twin.named_buffers())
    found = dict(trainer.model.named_buffers())
    assert any(n.endswith("running_mean") for n in found)
    for n, b in found.items():
        torch.testing.assert_close(b, expected[n], rtol=1e-5, atol=1e-7)
    before = dict(seen["model"].named_buffers())
    tracked = [n for n in found if n.endswith("num_batches_tracked")]
    assert tracked and all(found[n] == before[n] + 1 for n in tracked)


# ---- the shared invariants ------------------------------------------------------------
def awp_spec(gamma: float) -> DefenseSpec:
    return DefenseSpec("awp", (("gamma", gamma), ("warmup", 0.0)))


@pytest.mark.parametrize("method", ["at", "trades"])
def test_zero_strength_awp_is_plain_method_bit_for_bit(tmp_path, smoke_suite, smoke_splits,
                                                      method):
    check_zero_strength_is_plain(tmp_path, smoke_suite, smoke_splits, method,
                                 zero=awp_spec(0.0), real=awp_spec(GAMMA))


def test_awp_weights_clean_outside_update(tmp_path, smoke_suite, smoke_splits):
    check_weights_clean_outside_update(tmp_path, smoke_suite, smoke_splits,
                                       AWP(gamma=GAMMA, warmup=0.0), method="at")


def test_awp_resume_equals_uninterrupted(tmp_path, smoke_suite, smoke_splits):
    check_resume_equals_uninterrupted(tmp_path, with_train(smoke_suite, epochs=3), smoke_splits,
                                      "at", (awp_spec(GAMMA),))
