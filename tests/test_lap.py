"""LAP (defenses/lap.py): layer coefficients, the tentative optimizer step that leaves no
trace, the layer-aware perturbation, the variants, and the shared invariants."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import with_train
from invariants import (
    assert_equal_nested,
    check_resume_equals_uninterrupted,
    check_weights_clean_outside_update,
    check_zero_strength_is_plain,
    model_state,
    states_differ,
    train,
)
from torch import nn

from bench.config import ConfigError, DefenseSpec, RunSpec
from bench.engine import Trainer
from bench.models import PreActResNet18
from bench.records import read_history
from bench.state import kernel_parameters
from defenses.lap import (
    LAP,
    layer_aware_perturbation,
    layer_coefficients,
    published_beta,
    tentative_update,
)
from defenses.registry import build_defenses

REAL = 0.05  # a beta that visibly changes training on the smoke suite


def lap_spec(**params) -> DefenseSpec:
    return DefenseSpec("lap", tuple(sorted(params.items())))


def make_lap(**changes) -> LAP:
    return LAP(**{**LAP.params, "beta": REAL, **changes})


# ---- coefficients and perturbation ----------------------------------------------
def test_coefficients_for_preact_resnet18_match_the_spec():
    model = PreActResNet18(width=4)
    assert len(kernel_parameters(model)) == 21  # 17 3x3 convs, 3 1x1 shortcuts, 1 linear
    lam = layer_coefficients(21, 0.3)
    spec = {1: 1.0, 2: 0.36, 3: 0.26, 5: 0.17, 10: 0.08, 20: 0.005}  # "about", 2 decimals
    for layer, value in spec.items():
        assert lam[layer - 1] == pytest.approx(value, abs=0.005), layer
    assert lam[0] == 1.0 and lam[-1] == 0.0  # the classifier is never perturbed
    assert all(a > b for a, b in zip(lam, lam[1:]))


def test_coefficients_refuse_one_layer_and_non_positive_gamma():
    with pytest.raises(ValueError, match="at least 2 kernels"):
        layer_coefficients(1, 0.3)
    with pytest.raises(ValueError, match="gamma_lap must be > 0"):
        layer_coefficients(21, 0.0)


def test_perturbation_follows_the_update_with_layer_aware_norms():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(8, 4, 3, 3, generator=gen), torch.randn(6, 8, generator=gen),
               torch.randn(3, 6, generator=gen), torch.randn(2, 3, generator=gen)]
    updates = [torch.randn_like(w) * 1e-3 for w in weights]
    updates[2] = torch.zeros_like(weights[2])
    lam = [1.0, 0.4, 0.2, 0.0]
    v = layer_aware_perturbation(weights, updates, lam, beta=0.1)
    for i in (0, 1):
        torch.testing.assert_close(v[i].norm(), 0.1 * lam[i] * weights[i].norm(), rtol=1e-5,
                                   atol=0)
        cosine = nn.functional.cosine_similarity(v[i].flatten(), updates[i].flatten(), dim=0)
        assert cosine > 0.9999  # along the optimizer's update (descent), not against it
    assert torch.count_nonzero(v[2]) == 0  # zero update: no perturbation, no NaN
    assert torch.count_nonzero(v[3]) == 0  # zero coefficient
    zero = layer_aware_perturbation(weights, updates, lam, beta=0.0)
    assert all(torch.count_nonzero(z) == 0 for z in zero)


# ---- the tentative optimizer step -------------------------------------------------
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 10))


def backward(model: nn.Module, gen: torch.Generator) -> None:
    x, y = torch.rand(8, 3, 6, 6, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    nn.functional.cross_entropy(model(x), y).backward()


def real_step(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    opt.zero_grad(set_to_none=True)
    backward(model, gen)
    opt.step()


OPTIMIZERS = {  # the engine uses fused SGD on CUDA, foreach SGD on the CPU
    "sgd-momentum-fused": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9,
                                                     weight_decay=5e-4, fused=True),
    "sgd-momentum-foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9,
                                                       weight_decay=5e-4, foreach=True),
    "sgd-nesterov-loop": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                                    weight_decay=5e-4, foreach=False),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=5e-4),
}


@pytest.mark.parametrize("warm_steps", [0, 2], ids=["fresh", "warm"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_tentative_step_leaves_optimizer_state_bit_for_bit(name, warm_steps):
    gen = torch.Generator().manual_seed(1)
    model = tiny_model()
    opt = OPTIMIZERS[name](model.parameters())
    for _ in range(warm_steps):
        real_step(model, opt, gen)
    opt.zero_grad(set_to_none=True)
    backward(model, gen)  # stale .grad on every parameter: the tentative step must ignore it
    state_before = copy.deepcopy(opt.state_dict())
    buffers_before = {id(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)}
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads_before = {n: p.grad for n, p in model.named_parameters()}
    kernels = [p for _, p in kernel_parameters(model)]
    grads = [torch.randn(p.shape, generator=gen) for p in kernels]

    updates = tentative_update(opt, kernels, grads)

    assert_equal_nested(opt.state_dict(), state_before, "optimizer")  # buffers, step counts
    assert {id(v) for s in opt.state.values() for v in s.values()
            if torch.is_tensor(v)} == buffers_before  # same tensor objects, values put back
    if not warm_steps:
        assert len(opt.state) == 0  # the first real step must still start its buffers
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]), n
        assert p.grad is grads_before[n], n
    # the update is the optimizer's own: a real step with the same gradients moves the
    # kernels by exactly that much
    for p in model.parameters():
        p.grad = None
    for p, g in zip(kernels, grads):
        p.grad = g
    before = [p.detach().clone() for p in kernels]
    opt.step()
    for p, b, u in zip(kernels, before, updates):
        assert torch.equal(p.detach() - b, u)
        assert u.abs().sum() > 0


# ---- around_update on the engine's state ----------------------------------------
def built_state(tmp_path, suite, splits, method="fgsm_rs"):
    trainer = Trainer(RunSpec(suite.name, method, (), 0), suite, splits, tmp_path,
                      progress=False)
    state = trainer.build()
    x, y, _ = next(iter(trainer.loader))
    state.x, state.y, state.eps = x, y, suite.train.eps
    state.x_adv = trainer.method.attack(state)
    return trainer, state


@pytest.mark.parametrize("restore", [False, True])
def test_around_update_accumulates_by_default_and_restore_removes(tmp_path, smoke_suite,
                                                                 smoke_splits, restore):
    trainer, state = built_state(tmp_path, smoke_suite, smoke_splits)
    lap = make_lap(restore=restore)
    lap.bind_random_stream(0, torch.device("cpu"))
    lap.setup(state)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    opt_before = copy.deepcopy(trainer.optimizer.state_dict())
    with lap.around_update(state):
        inside = {n: p.detach().clone() for n, p in model.named_parameters()}
    kernels = kernel_parameters(model)
    first, last = kernels[0][0], kernels[-1][0]
    moved = (inside[first] - before[first]).norm()
    torch.testing.assert_close(moved, REAL * before[first].norm(), rtol=1e-4, atol=0)  # lambda_1=1
    assert torch.equal(inside[last], before[last])  # lambda_L = 0: the classifier is untouched
    for n, p in model.named_parameters():
        if n in dict(kernels) and restore:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
        elif n in dict(kernels):
            assert torch.equal(p, inside[n]), n  # the perturbation stays (accumulates)
        else:
            assert torch.equal(p, before[n]), n  # biases and BN affine never move
    for n, b in model.named_buffers():  # BN statistics untouched by the extra forward
        assert torch.equal(b, buffers[n]), n
    assert_equal_nested(trainer.optimizer.state_dict(), opt_before, "optimizer")
    assert lap.hparams["variant"] == "R" and lap.hparams["restore"] is restore


def hand_sgd_update(grad, weight, buffer, lr, momentum, weight_decay):
    """torch.optim.SGD's step (dampening 0, no Nesterov) written out: d = g + wd * w,
    b' = momentum * b + d, w' - w = -lr * b'."""
    d = grad + weight_decay * weight
    return -lr * (momentum * buffer + d)


def test_perturbation_is_the_optimizers_own_next_update_with_momentum_and_weight_decay(
        tmp_path, smoke_suite, smoke_splits):
    """V-LAP (delta0 = 0, so L1 = CE(f(x), y)) on a warm optimizer: each kernel moves by
    beta * lambda_l * ||w_l|| along SGD's next update, re-derived by hand from L1's
    gradient, the momentum buffer and weight decay, at the group's current lr/momentum."""
    suite = with_train(smoke_suite, weight_decay=0.05)  # large enough to matter
    trainer, state = built_state(tmp_path, suite, smoke_splits, method="n_fgsm")
    model, opt = trainer.model, trainer.optimizer
    lr, momentum = 0.07, 0.85  # what the schedule set for this iteration
    for group in opt.param_groups:
        group["lr"], group["momentum"] = lr, momentum
    names = [n for n, _ in kernel_parameters(model)]
    kernels = [p for _, p in kernel_parameters(model)]
    # L1's weight gradient, computed here on a copy (BatchNorm in train mode, as LAP does)
    twin = copy.deepcopy(model)
    loss = nn.functional.cross_entropy(twin(state.x.float()), state.y)
    grads = torch.autograd.grad(loss, [dict(twin.named_parameters())[n] for n in names])
    gen = torch.Generator().manual_seed(5)
    buffers = []
    for p, g in zip(kernels, grads):  # a momentum buffer as large as the gradient
        buf = torch.randn(p.shape, generator=gen) * g.abs().mean()
        opt.state[p]["momentum_buffer"] = buf.clone()
        buffers.append(buf)
    lap = make_lap(variant="V", beta=REAL)
    lap.bind_random_stream(0, torch.device("cpu"))
    lap.setup(state)
    lam = layer_coefficients(len(kernels), 0.3)
    before = [p.detach().clone() for p in kernels]
    with lap.around_update(state):
        moved = [p.detach() - b for p, b in zip(kernels, before)]
    checked = 0
    for i, (w, g, buf) in enumerate(zip(before, grads, buffers)):
        u = hand_sgd_update(g, w, buf, lr, momentum, 0.05)
        expected = REAL * lam[i] * w.norm() * u / u.norm()
        if lam[i] == 0:
            assert torch.count_nonzero(moved[i]) == 0
            continue
        torch.testing.assert_close(moved[i], expected, rtol=1e-4, atol=1e-7)
        # the check can tell: plain gradient descent, or the update without momentum or
        # without weight decay, points elsewhere
        for other in (-g, hand_sgd_update(g, w, buf, lr, 0.0, 0.05),
                      hand_sgd_update(g, w, buf, lr, momentum, 0.0)):
            cosine = nn.functional.cosine_similarity(other.flatten(), u.flatten(), dim=0)
            assert cosine < 0.9999, names[i]
        checked += 1
    assert checked == len(kernels) - 1


# ---- variants, cost, invariants -----------------------------------------------------
def passes(run_dir) -> tuple[int, int]:
    (row,) = read_history(run_dir / "history.jsonl")
    return row["forward_passes"], row["backward_passes"]


@pytest.mark.parametrize(("variant", "method", "extra"), [
    ("V", "n_fgsm", 2), ("R", "fgsm_rs", 1), ("N", "n_fgsm", 1)])
def test_each_variant_trains_and_costs_what_it_should(tmp_path, smoke_suite, smoke_splits,
                                                      variant, method, extra):
    suite = with_train(smoke_suite, epochs=1)
    plain = train(tmp_path / "plain", suite, smoke_splits, method=method)
    lap = train(tmp_path / "lap", suite, smoke_splits, method=method,
                defenses=[lap_spec(beta=REAL, variant=variant)])
    saved = model_state(lap.run_dir)
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
    assert states_differ(model_state(plain.run_dir), saved)
    batches = len(lap.loader)
    (pf, pb), (lf, lb) = passes(plain.run_dir), passes(lap.run_dir)
    assert (lf - pf, lb - pb) == (extra * batches, extra * batches)
    assert lap.defenses[0].hparams["variant"] == variant


@pytest.mark.parametrize("method", ["fgsm_rs", "n_fgsm"])
def test_zero_strength_lap_is_plain_method_bit_for_bit(tmp_path, smoke_suite, smoke_splits,
                                                      method):
    check_zero_strength_is_plain(tmp_path, smoke_suite, smoke_splits, method,
                                 zero=lap_spec(beta=0.0), real=lap_spec(beta=REAL))


def test_restore_option_keeps_weights_clean_outside_update(tmp_path, smoke_suite,
                                                           smoke_splits):
    check_weights_clean_outside_update(tmp_path, smoke_suite, smoke_splits,
                                       make_lap(restore=True), method="fgsm_rs")


def test_resume_equals_uninterrupted(tmp_path, smoke_suite, smoke_splits):
    check_resume_equals_uninterrupted(tmp_path, with_train(smoke_suite, epochs=3), smoke_splits,
                                      "fgsm_rs", (lap_spec(beta=REAL),))


def test_gpu_code_path_bf16_channels_last_on_cpu(tmp_path, smoke_suite, smoke_splits):
    spec = RunSpec(smoke_suite.name, "fgsm_rs", (lap_spec(beta=REAL),), 0)
    trainer = Trainer(spec, smoke_suite, smoke_splits, tmp_path, progress=False,
                      mixed_precision=True, channels_last=True)
    trainer.train()
    saved = model_state(tmp_path)
    assert all(torch.isfinite(v).all() for v in saved.values() if v.is_floating_point())
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


# ---- parameters ---------------------------------------------------------------------
def test_published_beta_is_resolved_from_the_suite_eps(tmp_path, smoke_suite, smoke_splits):
    assert published_beta("R", 8 / 255) == 0.002
    assert published_beta("N", 16 / 255) == 0.005
    assert published_beta("V", 32 / 255) == 0.48
    suite = with_train(smoke_suite, eps=8 / 255)
    _, state = built_state(tmp_path, suite, smoke_splits, method="n_fgsm")
    (lap,) = build_defenses((lap_spec(),), "n_fgsm", suite)
    lap.setup(state)
    assert lap.hparams == {"beta": 0.001, "gamma_lap": 0.3, "variant": "N", "restore": False}


@pytest.mark.parametrize(("params", "match"), [
    ({"beta": -0.1}, "beta must be >= 0"),
    ({"beta": "big"}, "beta must be a finite number"),
    ({"beta": float("nan")}, "beta must be a finite number"),
    ({"gamma_lap": 0.0}, "gamma_lap must be > 0"),
    ({"variant": "X"}, "variant must be 'auto' or one of"),
    ({"restore": "yes"}, "restore must be true or false"),
])
def test_bad_parameters_are_refused(params, match):
    with pytest.raises(ValueError, match=match):
        make_lap(**params)


@pytest.mark.parametrize(("method", "params", "match"), [
    ("n_fgsm", {"beta": REAL, "variant": "R"}, "variant R trains with method 'fgsm_rs'"),
    ("fgsm_rs", {"beta": REAL, "variant": "N"}, "variant N trains with method 'n_fgsm'"),
    ("fgsm_rs", {"beta": REAL, "variant": "V"}, "variant V trains with method 'n_fgsm'"),
    ("fgsm_rs", {}, r"beta is published only for eps in .*set beta"),
])
def test_settings_that_do_not_fit_the_run_are_refused(tmp_path, smoke_suite, smoke_splits,
                                                      method, params, match):
    with pytest.raises(ConfigError, match=match):  # when the run is planned, before data
        build_defenses((lap_spec(**params),), method, smoke_suite)
    _, state = built_state(tmp_path, smoke_suite, smoke_splits, method=method)
    with pytest.raises(ConfigError, match=match):  # and again if a run gets that far
        LAP(**{**LAP.params, **params}).setup(state)


def test_registry_refuses_other_methods_and_unknown_parameters(smoke_suite):
    with pytest.raises(ConfigError, match="does not compose with method 'at'"):
        build_defenses((lap_spec(),), "at", smoke_suite)
    with pytest.raises(ConfigError, match=r"no parameter\(s\) \['gamma'\]"):
        build_defenses((lap_spec(gamma=0.3),), "fgsm_rs", smoke_suite)
    assert LAP.slots == ("update",)
