"""AWP: Adversarial Weight Perturbation (Wu, Xia & Wang, "Adversarial Weight
Perturbation Helps Robust Generalization", NeurIPS 2020).

After the engine has built x_adv with the clean weights, AWP takes one
layer-wise normalised ascent step on the training objective with respect to
the conv/linear kernels, v_l = gamma * ||w_l|| * g_l / ||g_l||, trains at w + v
(momentum and weight decay act there) and removes v afterwards.

Engine-specific choices: g is computed with
`torch.autograd.grad` on the live model instead of a proxy copy (same
direction, no copy), and the extra forward does not update BatchNorm running
statistics, matching the reference which updates them once per batch.

Documentation (algorithm, hyperparameters, differences from the released code, published
numbers and their protocol): docs/defenses/awp.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from bench.state import TrainState, kernel_parameters, preserved_bn_stats, shifted_weights
from defenses.base import Defense, DefenseCard, register_defense
from defenses.card import BEST_NOT_STATED, BEST_ON_TEST, FULL_TRAIN, entries


def layerwise_perturbation(weights: list[torch.Tensor], grads: list[torch.Tensor],
                           gamma: float) -> list[torch.Tensor]:
    """v_l = gamma * ||w_l|| * g_l / ||g_l|| per layer (Frobenius norms); a
    layer with a zero gradient gets v_l = 0. The norms and scales of all layers are
    computed together (`_foreach_norm`, one vector of scales): on the CPU bit for bit the
    per-layer loop's values (tests/test_awp.py); on a GPU the batched norm may differ from
    a per-tensor norm in the last float32 bit (another reduction order)."""
    if len(weights) != len(grads):
        raise ValueError(f"awp: {len(weights)} weights but {len(grads)} gradients")
    if not weights:
        return []
    grads = [g.float() for g in grads]  # no copies for fp32 gradients
    g_norm = torch.stack(torch._foreach_norm(grads))
    w_norm = torch.stack(torch._foreach_norm([w.detach().float() for w in weights]))
    scale = torch.where(g_norm > 0, gamma * w_norm / g_norm.clamp_min(1e-30),
                        torch.zeros_like(g_norm))
    out = torch._foreach_mul(grads, list(scale.unbind()))
    return [v if v.dtype == w.dtype else v.to(w.dtype)
            for v, w in zip(out, weights, strict=True)]


@register_defense("awp")
class AWP(Defense):
    card = DefenseCard(
        name="AWP",
        paper="Wu, Xia & Wang. Adversarial Weight Perturbation Helps Robust Generalization",
        venue="NeurIPS 2020",
        link="https://arxiv.org/abs/2004.05884",
        reference_code="https://github.com/csdongxian/AWP",
        hyperparameters={"gamma": 0.01, "ascent_steps": 1, "warmup": 0.0,
                         "trades": {"gamma": 0.005, "warmup": 0.05}},
        published=(
            *entries(
                {"method": "at", "defenses": ("awp",), "label": "AT-AWP", "epochs": 200,
                 "selection": "test",
                 "data_split": "50k train; best checkpoint picked on the test set",
                 "source": "the authors' training logs (AWP repository)",
                 "suite": "cifar10-linf", "differences": (FULL_TRAIN, BEST_ON_TEST)},
                ("pgd20", "best", 55.39, {"note": "epoch 159"}),
                ("pgd20", "last", 54.30, {"note": "the paper's table gives 54.73"}),
                ("clean", "best", 81.18, {"note": "epoch 159"}),
                ("pgd20", "best", 52.79, {"label": "AT", "defenses": ()}),
                ("pgd20", "last", 43.75, {"label": "AT", "defenses": (),
                                          "note": "the paper's table gives 44.44"})),
            *entries(
                {"method": "at", "defenses": ("awp",), "label": "AT-AWP", "epochs": 200,
                 "selection": "not stated", "data_split": "50k train",
                 "source": "quoted by later papers (e.g. CURE's robust-overfitting table)",
                 "suite": "cifar10-linf", "differences": (FULL_TRAIN, BEST_NOT_STATED)},
                ("autoattack", "best", 50.57), ("autoattack", "last", 49.95),
                ("clean", "best", 83.33), ("clean", "last", 84.39)),
            *entries(
                {"method": "at", "defenses": ("awp",), "label": "AT-AWP",
                 "architecture": "WRN-34-10", "selection": "not stated", "data_split": "50k train",
                 "source": "the paper (WRN-34-10 results)", "suite": "cifar10-linf-wrn",
                 "note": "which checkpoint is not recorded here; taken as best",
                 "differences": (FULL_TRAIN, BEST_NOT_STATED)},
                ("autoattack", "best", 53.97), ("clean", "best", 86.2)),
            *entries(
                {"method": "trades", "defenses": ("awp",), "label": "TRADES-AWP",
                 "architecture": "WRN-34-10", "selection": "not stated", "data_split": "50k train",
                 "source": "the paper (WRN-34-10 results)", "suite": "cifar10-linf-wrn",
                 "note": "which checkpoint is not recorded here; taken as best",
                 "differences": (FULL_TRAIN, BEST_NOT_STATED)},
                ("autoattack", "best", 56.17), ("clean", "best", 85.36)),
        ),
        extra_data="none",
        notes="Overhead about one extra forward/backward per batch. The ascent gradient comes "
              "from autograd on the live model instead of the reference's proxy SGD step "
              "(same direction: the proxy lr cancels in the normalisation); the ascent "
              "forward leaves BatchNorm statistics untouched, as the reference's discarded "
              "proxy does. The reference's 'best' is the best PGD-20 epoch on the test set; "
              "ours is selected on validation. docs/defenses/awp.md.",
    )
    params = {"gamma": 0.01, "warmup": 0.0}
    methods = ("at", "trades")

    @classmethod
    def method_defaults(cls, method: str) -> dict:
        return {"gamma": 0.005, "warmup": 0.05} if method == "trades" else {}

    def __init__(self, gamma: float, warmup: float) -> None:
        super().__init__(gamma=gamma, warmup=warmup)
        if gamma < 0:
            raise ValueError(f"awp: gamma must be >= 0, got {gamma}")
        if not 0 <= warmup <= 1:
            raise ValueError(f"awp: warmup is a fraction of training in [0, 1], got {warmup}")
        self.gamma = float(gamma)
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
            ascent = state.method_loss().float().mean()
            grads = torch.autograd.grad(ascent, kernels, allow_unused=True)
        state.counter.add(bwd=1)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(kernels, grads)]
        perturbation = layerwise_perturbation(kernels, grads, self.gamma)
        with shifted_weights(kernels, perturbation):
            yield
