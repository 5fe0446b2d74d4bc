"""The operations of CURE (Gowda, Zonooz & Arani, "Conserve-Update-Revise to Cure
Generalization and Robustness Trade-off in Adversarial Training", ICLR 2024), as plain
functions on tensors and modules: the objectives, the consistency with the revision
model, the gradient-prominence masks ("conserve") and the stochastic revision update.
`defenses/cure.py` wires them to the engine's hooks; docs/defenses/cure.md describes them.

Masks index parameters in their logical (row-major) order, so they do not depend on the
memory format (channels_last) of the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities: sum_k p_k (log p_k - log q_k). The same
    operations as the engine's TRADES loss, so that CURE at zero strength is TRADES bit for
    bit."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def trades_kl(logits_clean: torch.Tensor, logits_adv: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p(x) || p(x_adv)), differentiable through both sides (TRADES)."""
    return kl_rows(F.log_softmax(logits_clean, dim=1), F.log_softmax(logits_adv, dim=1))


def trades_objective(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                     beta: float) -> torch.Tensor:
    """Per-sample CE(f(x), y) + beta * KL(p(x) || p(x_adv)) (L_adv: beta 5 in the released
    code's default, 1 in the paper's Eq. 4)."""
    ce = F.cross_entropy(logits_clean, y, reduction="none")
    return ce + beta * trades_kl(logits_clean, logits_adv)


def rgp_objective(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                  alpha_c: float) -> torch.Tensor:
    """Per-sample alpha_c CE(f(x), y) + (1 - alpha_c) CE(f(x_adv), y) (reference `rgp`)."""
    return (alpha_c * F.cross_entropy(logits_clean, y, reduction="none")
            + (1 - alpha_c) * F.cross_entropy(logits_adv, y, reduction="none"))


def consistency(logits_clean: torch.Tensor, logits_adv: torch.Tensor,
                revision_clean: torch.Tensor, revision_adv: torch.Tensor) -> torch.Tensor:
    """L_CR = KL(p_rev(x) || p(x)) + KL(p_rev(x_adv) || p(x_adv)), batch means, the
    revision model's outputs detached (the targets)."""
    total = logits_clean.new_zeros(())
    for student, target in ((logits_clean, revision_clean), (logits_adv, revision_adv)):
        log_target = F.log_softmax(target.detach().float(), dim=1)
        total = total + kl_rows(log_target, F.log_softmax(student.float(), dim=1)).mean()
    return total


def conserved_count(percent: float, n: int) -> int:
    """Entries of a layer of n that are conserved: round(percent / 100 * n), halves up."""
    return min(n, math.floor(percent * n / 100 + 0.5))


def update_mask(score: torch.Tensor, percent: float) -> torch.Tensor:
    """Boolean mask of `score`'s shape, False ("conserve") at exactly
    `conserved_count(percent, n)` entries with the lowest score (ties: the lower flat
    index first), True ("update") elsewhere."""
    flat = score.reshape(-1)
    n = flat.numel()
    k = conserved_count(percent, n)
    if k == 0:
        return torch.ones(score.shape, dtype=torch.bool, device=score.device)
    if k >= n:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    # Selection instead of a full sort (a stable argsort of every layer took half of a
    # training step): the k-th smallest score, everything below it, then the first
    # (by flat index) of the entries tied with it until k are conserved. No host sync.
    kth = torch.kthvalue(flat, k).values
    below = flat < kth
    ties = flat == kth
    conserve = below | (ties & (torch.cumsum(ties, 0) <= k - below.sum()))
    return (~conserve).view(score.shape)


def prominence(grad_clean: torch.Tensor, grad_adv: torch.Tensor, alpha_c: float) -> torch.Tensor:
    """The paper's revision gradient prominence per weight (mode `paper`):
    alpha_c |dCE(x)/dw| + (1 - alpha_c) |dCE(x_adv)/dw|."""
    return alpha_c * grad_clean.float().abs() + (1 - alpha_c) * grad_adv.float().abs()


def signed_prominence(grad_ce: torch.Tensor, grad_kl: torch.Tensor,
                      alpha_c: float) -> torch.Tensor:
    """The released code's score (mode `rgp_soft`), signed, no absolute value:
    alpha_c dCE(x)/dw + (1 - alpha_c) dKL(p(x) || p(x_adv))/dw. The weights conserved are
    those with the lowest signed score."""
    return alpha_c * grad_ce.float() + (1 - alpha_c) * grad_kl.float()


def block_first_convs(model: nn.Module) -> list[int]:
    """Positions, in `[p for p in model.parameters() if p.requires_grad]`, of the parameters
    that the released `rgp_soft` mode masks: those of a module named `conv1` (the first
    convolution of each residual block in the ResNets), except the network's first
    parameter (the stem convolution, also named `conv1`). None in a plain CNN."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [i for i, n in enumerate(names) if i > 0 and "conv1" in n.split(".")[:-1]]


def clean_epochs(fraction: float, epochs: int) -> int:
    """Epochs of clean training before CURE: round(fraction * epochs), halves up."""
    return math.floor(fraction * epochs + 0.5)


def conserve_(params: list[torch.Tensor], scores: list[torch.Tensor], percent: float) -> None:
    """Zero, in each parameter's `.grad`, the entries whose score is among the lowest
    `percent` of that parameter (layer); parameters without a gradient are skipped."""
    if percent <= 0:
        return
    for p, score in zip(params, scores, strict=True):
        if p.grad is not None:
            p.grad.masked_fill_(~update_mask(score, percent), 0.0)


def last_linear_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the last `nn.Linear` module (the classifier), which the
    reference's `rgp` mode never masks."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return list(linears[-1].parameters()) if linears else []


def revision_decay(mode: str, decay: float, step: int) -> float:
    """The revision model's EMA decay: d (`paper`); min(1 - 1/(t + 1), d) with t the number
    of CURE steps taken so far, this one included (the released code, `rgp_soft`, `rgp`)."""
    if mode == "paper":
        return decay
    return min(1 - 1 / (step + 1), decay)


def revise_(revision: nn.Module, model: nn.Module, decay: float, gate: torch.Tensor) -> None:
    """theta_rev <- decay * theta_rev + (1 - decay) * theta for the parameters (buffers are
    left alone) where the boolean scalar `gate` is True; exactly unchanged where False
    (a tensor gate: no host synchronisation)."""
    with torch.no_grad():
        for r, p in zip(revision.parameters(), model.parameters(), strict=True):
            blended = r * decay + p.detach() * (1 - decay)
            r.copy_(torch.where(gate, blended, r))
