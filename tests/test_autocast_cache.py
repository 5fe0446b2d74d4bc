"""One autocast context per attack (attacks/pgd.py `_ascend`): autocast's weight-cast cache
then lives across the attack's iterations, so each fp32 weight is cast to bf16 once per
attack instead of once per iteration, with bit-for-bit the same adversarial examples as
the per-iteration version (written out below as the independent reference). The engine
never holds an autocast context across a weight update (the cache has no version check)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from attacks.pgd import fgsm_rs, n_fgsm, pgd
from bench.config import DefenseSpec, RunSpec
from bench.engine import Trainer

BF16 = torch.bfloat16
EPS, STEP = 8 / 255, 2 / 255


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10))  # fmt: skip


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


class _WeightCasts(TorchDispatchMode):
    """Counts fp32 -> bf16 copies of the given parameters (what autocast does to the
    weights of conv and linear layers; the cache makes it skip repeats)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.ptrs = {p.data_ptr() for p in params}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == BF16
                and args[0].data_ptr() in self.ptrs):
            self.count += 1
        return func(*args, **kwargs)


# ---- the per-iteration version, as it was: autocast entered for each forward only ----

def _reference_ascend(model, x_adv, loss_fn, lo, hi, step_size, steps):
    x_adv = x_adv.detach()
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.autocast("cpu", dtype=BF16):
                logits = model(x_adv)
            (grad,) = torch.autograd.grad(loss_fn(logits), x_adv)
            x_adv = x_adv.detach()
            x_adv.add_(grad.sign_(), alpha=step_size).clamp_(lo, hi)
    return x_adv


def _reference_loss(loss, logits, y, target):
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    if loss == "cw":
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.masked_fill(F.one_hot(y, 10).bool(), float("-inf"))
        return (others.amax(1) - z_y).sum()
    return F.kl_div(F.log_softmax(logits, 1), target, reduction="sum")


def _reference_pgd(model, x, y, loss, steps, gen):
    lo, hi = (x - EPS).clamp(min=0.0), (x + EPS).clamp(max=1.0)
    target = None
    if loss == "kl":
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
            target = model(x).float().softmax(1)
        start = torch.clamp(x + 0.001 * torch.randn(x.shape, generator=gen), lo, hi)
    else:
        u = torch.rand(x.shape, generator=gen) * (2 * EPS) - EPS
        start = torch.clamp(x + u, lo, hi)
    return _reference_ascend(model, start, lambda z: _reference_loss(loss, z, y, target),
                             lo, hi, STEP, steps)


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_pgd_bf16_is_bit_for_bit_the_per_iteration_version(loss):
    """Train mode (BatchNorm statistics move with every forward): same x_adv and the same
    running statistics afterwards."""
    x, y = _batch()
    ours_model, ref_model = _model().train(), _model().train()
    ours = pgd(ours_model, x, y, eps=EPS, step_size=STEP, steps=4, loss=loss,
               generator=torch.Generator().manual_seed(5), autocast_dtype=BF16)
    ref = _reference_pgd(ref_model, x, y, loss, 4, torch.Generator().manual_seed(5))
    assert torch.equal(ours, ref)
    for a, b in zip(ours_model.state_dict().values(), ref_model.state_dict().values()):
        assert torch.equal(a, b)


def test_single_step_attacks_bf16_are_bit_for_bit_the_per_iteration_version():
    x, y = _batch()
    model = _model().eval()
    lo, hi = (x - EPS).clamp(min=0.0), (x + EPS).clamp(max=1.0)
    ce = lambda z: F.cross_entropy(z.float(), y, reduction="sum")  # noqa: E731

    ours = fgsm_rs(model, x, y, eps=EPS, step_size=1.25 * EPS,
                   generator=torch.Generator().manual_seed(3), autocast_dtype=BF16)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * (2 * EPS) - EPS
    ref = _reference_ascend(model, torch.clamp(x + u, lo, hi), ce, lo, hi, 1.25 * EPS, 1)
    assert torch.equal(ours, ref)

    ours = n_fgsm(model, x, y, eps=EPS, generator=torch.Generator().manual_seed(4),
                  autocast_dtype=BF16)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) * (4 * EPS) - 2 * EPS
    ref = _reference_ascend(model, (x + u).clamp(0, 1), ce, 0.0, 1.0, EPS, 1)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("steps", [1, 5])
def test_each_weight_is_cast_once_per_attack(steps):
    """The conv and linear weights and biases (the tensors autocast casts to bf16) are cast
    once per attack, not once per iteration as the reference does (steps times)."""
    x, y = _batch()
    model = _model().eval()
    cast = [p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            for p in m.parameters()]
    with _WeightCasts(cast) as ours:
        pgd(model, x, y, eps=EPS, step_size=STEP, steps=steps, autocast_dtype=BF16)
    with _WeightCasts(cast) as ref:
        _reference_pgd(model, x, y, "ce", steps, torch.Generator().manual_seed(0))
    assert ref.count == steps * len(cast)  # the counter sees the casts at all
    assert ours.count == len(cast)


def test_no_autocast_context_is_open_at_a_weight_update(tmp_path, smoke_suite, smoke_splits):
    """Autocast's cache has no version check: a context open across an optimizer step or a
    weight perturbation would feed stale bf16 weights to the next forward. Through the
    engine (bf16 on the CPU; TRADES, whose attack also makes clean logits, with AWP, which
    perturbs and restores weights around the update): no autocast context, enabled or not,
    is open when an attack returns, nor at the optimizer step."""
    def depth() -> int:  # how many autocast contexts are open
        n = torch.autocast_increment_nesting()
        torch.autocast_decrement_nesting()
        return n - 1

    spec = RunSpec(smoke_suite.name, "trades", (DefenseSpec("awp"),), 0)
    trainer = Trainer(spec, smoke_suite, smoke_splits, tmp_path, progress=False,
                      mixed_precision=True)
    seen = {"attack": [], "step": []}
    build = trainer.build

    def wrapped_build():
        state = build()
        attack, step = trainer.method.attack, trainer.optimizer.step

        def checked_attack(*args, **kwargs):
            out = attack(*args, **kwargs)
            seen["attack"].append(depth())
            return out

        def checked_step(*args, **kwargs):
            seen["step"].append(depth())
            return step(*args, **kwargs)

        trainer.method.attack, trainer.optimizer.step = checked_attack, checked_step
        return state

    trainer.build = wrapped_build  # type: ignore[method-assign]
    trainer.train(stop_after_epochs=1)
    batches = len(trainer.loader)
    assert seen == {"attack": [0] * batches, "step": [0] * batches}


def test_weights_changed_between_attacks_are_seen():
    """The cache does not outlive an attack: after an in-place weight change the next
    attack equals an attack on a fresh copy holding the changed weights."""
    x, y = _batch()
    model = _model().eval()
    pgd(model, x, y, eps=EPS, step_size=STEP, steps=3, autocast_dtype=BF16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-0.5)
    fresh = copy.deepcopy(model)
    a = pgd(model, x, y, eps=EPS, step_size=STEP, steps=3, autocast_dtype=BF16,
            generator=torch.Generator().manual_seed(2))
    b = pgd(fresh, x, y, eps=EPS, step_size=STEP, steps=3, autocast_dtype=BF16,
            generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
