"""RWP: Robust Weight Perturbation (Yu, Han, Gong, Shen, Ge, Du & Liu, "Robust Weight
Perturbation for Adversarial Training", IJCAI 2022).

The Loss Stationary Condition (LSC): only adversarial examples whose loss is below a
threshold c_min should drive the weight perturbation; perturbing the weights on
high-loss examples is unnecessary and hurts robustness. After the engine has built
x_adv with the clean weights, RWP runs K2 ascent steps on the conv/linear kernels:

    a = 0, v = 0
    repeat K2 times:
        l_i = per-example loss at w + v          (train mode)
        m_i = 1[l_i < c_min]                      (recomputed at every step)
        a  += grad_w (1/B) sum_i m_i l_i          (masked examples count as zero)
        v   = gamma * ||W|| / ||a|| * a           (norms over all kernels together)

then trains at w + v (momentum and weight decay act there) and removes v afterwards,
as AWP does. If no example passes the mask, a = 0 and so v = 0: the step is the plain
method. With `trades` the thresholded loss is the method's per-example loss,
CE(clean) + beta * KL(clean || adv) summed over classes.

Engine-specific choices: the gradients come from
`torch.autograd.grad` on the live model instead of the reference's two proxy copies
(same values: the reference's proxy learning rate cancels in the normalisation), and
the ascent forwards do not update BatchNorm running statistics (the reference's proxies
do, but their statistics are discarded).

TRADES-RWP is a repair: the released TRADES script adds the per-example CE, shape (N,),
to the unreduced KL, shape (N, C), which fails for N != C; here the KL is summed over
classes first, so the threshold applies per example to CE + beta * KL (see the doc).
Documentation (algorithm, hyperparameters, differences from the released code, published
numbers and their protocol): docs/defenses/rwp.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from bench.state import TrainState, kernel_parameters, preserved_bn_stats, shifted_weights
from defenses.base import Defense, DefenseCard, register_defense


def lsc_mask(losses: torch.Tensor, c_min: float) -> torch.Tensor:
    """The Loss Stationary Condition: True where an example's loss is strictly below c_min."""
    return losses.detach() < c_min


def masked_mean(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i m_i l_i: the mean over the whole batch, masked examples counting as zero."""
    return torch.where(mask, losses, torch.zeros_like(losses)).sum() / losses.numel()


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Frobenius norm of all tensors concatenated into one vector (fp32): the norm of the
    per-tensor norms (`_foreach_norm`; on the CPU bit for bit a per-tensor loop's, on a GPU
    possibly another last float32 bit: another reduction order)."""
    return torch.stack(torch._foreach_norm([t.detach().float() for t in tensors])).norm()


def global_perturbation(direction: list[torch.Tensor], weight_norm: torch.Tensor,
                        gamma: float) -> list[torch.Tensor]:
    """v = gamma * ||W|| * a / ||a||, both norms over all kernels together (not per layer,
    unlike AWP); a zero direction gives v = 0."""
    a_norm = global_norm(direction)
    scale = torch.where(a_norm > 0, gamma * weight_norm / a_norm.clamp_min(1e-30),
                        torch.zeros_like(a_norm))
    return torch._foreach_mul([a.float() for a in direction], scale)


def ascend(loss_fn: Callable[[], torch.Tensor], kernels: list[torch.nn.Parameter],
           gamma: float, c_min: float, steps: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run the K2 ascent steps; returns v (in the kernels' dtypes) and the fraction of
    examples passing the LSC at each step, and leaves the kernels clean (also on an
    exception). `loss_fn` returns the per-example loss at the current weights. Each step
    sets the kernels to w + v from a clean copy, so nothing accumulates rounding. Copies,
    sums and norms run over all kernels at once (`torch._foreach_*`)."""
    clean = [torch.empty_like(p) for p in kernels]
    accumulated = [torch.empty_like(p, dtype=torch.float32) for p in kernels]
    with torch.no_grad():
        torch._foreach_copy_(clean, [p.detach() for p in kernels])
        torch._foreach_zero_(accumulated)
    weight_norm = global_norm(clean)
    perturbation = [torch.zeros_like(p) for p in kernels]
    passed = []
    try:
        for _ in range(steps):
            losses = loss_fn().float()
            mask = lsc_mask(losses, c_min)
            passed.append(mask.float().mean())
            grads = torch.autograd.grad(masked_mean(losses, mask), kernels, allow_unused=True)
            present = [(a, g.float()) for a, g in zip(accumulated, grads, strict=True)
                       if g is not None]
            if present:
                torch._foreach_add_([a for a, _ in present], [g for _, g in present])
            perturbation = [v if v.dtype == p.dtype else v.to(p.dtype) for v, p in zip(
                global_perturbation(accumulated, weight_norm, gamma), kernels, strict=True)]
            with torch.no_grad():
                torch._foreach_copy_(kernels, torch._foreach_add(clean, perturbation))
    finally:
        with torch.no_grad():
            torch._foreach_copy_(kernels, clean)
    return perturbation, torch.stack(passed)


def _check(gamma: float, c_min: float, ascent_steps: int, warmup: float) -> int:
    if not (isinstance(gamma, int | float) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"rwp: gamma must be a finite number >= 0, got {gamma!r}")
    if not (isinstance(c_min, int | float) and not math.isnan(c_min) and c_min >= 0):
        raise ValueError(f"rwp: c_min (the loss threshold) must be a number >= 0, got {c_min!r}")
    integral = isinstance(ascent_steps, int) or (
        isinstance(ascent_steps, float) and ascent_steps.is_integer())
    if isinstance(ascent_steps, bool) or not integral or ascent_steps < 1:
        raise ValueError(f"rwp: ascent_steps must be an integer >= 1, got {ascent_steps!r}")
    if not (isinstance(warmup, int | float) and 0 <= warmup <= 1):
        raise ValueError(f"rwp: warmup is a fraction of training in [0, 1], got {warmup!r}")
    return int(ascent_steps)


@register_defense("rwp")
class RWP(Defense):
    card = DefenseCard(
        name="RWP",
        paper=("Yu, Han, Gong, Shen, Ge, Du & Liu. Robust Weight Perturbation for "
               "Adversarial Training"),
        venue="IJCAI 2022",
        link="https://arxiv.org/abs/2205.14826",
        reference_code="https://github.com/ChaojianYu/Robust-Weight-Perturbation",
        hyperparameters={"gamma": 0.01, "c_min": 1.7, "ascent_steps": 10, "warmup": 0.0,
                         "trades": {"gamma": 0.005, "warmup": 0.05}},
        published=(),  # not yet verified against the paper's CIFAR-10 PRN-18 table
        published_notes={"CIFAR-10 PRN-18 (clean, PGD-20, AA; best and last)":
                         "see the paper's main table; not verified here"},
        extra_data="none",
        notes=("Overhead about 10 extra forward/backward passes per batch (K2 = 10 ascent "
               "steps; TRADES: two forwards per step). Published numbers still to be "
               "copied from the paper's main CIFAR-10 PreActResNet-18 table once verified. "
               "TRADES-RWP is a repaired objective: the released TRADES-RWP code crashes "
               "(it adds the per-example CE, shape (N,), to the unreduced KL, shape (N, C)); "
               "ours sums the KL over classes first, so c_min thresholds each example's "
               "CE + beta * KL, whose masked batch mean is the TRADES training loss over "
               "the passing examples. Gradients by autograd on the live model instead of "
               "the reference's two proxies (lr cancels); BatchNorm statistics untouched "
               "by the ascent. docs/defenses/rwp.md."),
    )
    params = {"gamma": 0.01, "c_min": 1.7, "ascent_steps": 10, "warmup": 0.0}
    methods = ("at", "trades")

    @classmethod
    def method_defaults(cls, method: str) -> dict:
        return {"gamma": 0.005, "warmup": 0.05} if method == "trades" else {}

    def __init__(self, gamma: float, c_min: float, ascent_steps: int, warmup: float) -> None:
        steps = _check(gamma, c_min, ascent_steps, warmup)
        super().__init__(gamma=gamma, c_min=c_min, ascent_steps=steps, warmup=warmup)
        self.gamma = float(gamma)
        self.c_min = float(c_min)
        self.ascent_steps = steps
        self.warmup = float(warmup)

    def active(self, state: TrainState) -> bool:
        return state.epoch >= self.warmup * state.epochs

    @contextlib.contextmanager
    def around_update(self, state: TrainState) -> Iterator[None]:
        if not self.active(state):
            yield
            return
        kernels = [p for _, p in kernel_parameters(state.model)]
        with preserved_bn_stats(state.model):
            perturbation, passed = ascend(state.method_loss, kernels, self.gamma,
                                          self.c_min, self.ascent_steps)
        state.counter.add(bwd=self.ascent_steps)  # forwards are counted by method_loss
        state.log("rwp.lsc_pass_first", passed[0])
        state.log("rwp.lsc_pass_last", passed[-1])
        with shifted_weights(kernels, perturbation):
            yield
