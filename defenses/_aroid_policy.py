"""AROID's policy network, its sampling, the hierarchical diversity penalty (the
reference code's formula) and the REINFORCE objective with a per-image baseline.

Everything here runs on the device without host synchronisation: sampling is an inverse
CDF on uniforms from a given generator, the penalty's masks and counts stay tensors.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from defenses._aroid_space import COLOUR, HEADS

Tensor = torch.Tensor


def feature_extractor(net: nn.Module) -> tuple[nn.Module, int]:
    """`net` with its last linear layer (the classifier) replaced by the identity, so it
    returns the features that fed the classifier; and their dimension."""
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = name, module
    if last is None:
        raise ValueError(f"{type(net).__name__} has no linear classifier to strip")
    name, linear = last
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, nn.Identity())
    return net, linear.in_features


class PolicyNet(nn.Module):
    """A backbone's pooled features feeding one linear head per transform (`HEADS`).
    `forward` returns float32 logits per head."""

    def __init__(self, backbone: nn.Module, features: int,
                 heads: dict[str, int] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({name: nn.Linear(features, n)
                                    for name, n in (heads or HEADS).items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)
        return {name: head(features).float() for name, head in self.heads.items()}


# --------------------------------------------------------------------------- sampling


def sample_actions(logits: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """One class per row and head from softmax(logits), by inverse CDF on one uniform per
    row and head drawn from `generator` (heads in the dict's order)."""
    out = {}
    for name, logit in logits.items():
        cdf = logit.detach().float().softmax(1).cumsum(1)
        u = torch.rand(logit.shape[0], 1, generator=generator, device=logit.device)
        picked = (cdf <= u * cdf[:, -1:]).sum(1)
        out[name] = picked.clamp_(max=logit.shape[1] - 1)
    return out


def log_prob(logits: dict[str, Tensor], actions: dict[str, Tensor]) -> Tensor:
    """log pi(a | x) per row: the sum over heads of the chosen classes' log-probabilities.
    Actions of shape (N,) give (N,); of shape (N, T) (T choices per row) give N x T."""
    total = None
    for name, logit in logits.items():
        chosen = actions[name]
        index = chosen[:, None] if chosen.ndim == 1 else chosen
        lp = F.log_softmax(logit.float(), 1).gather(1, index)
        lp = lp[:, 0] if chosen.ndim == 1 else lp
        total = lp if total is None else total + lp
    assert total is not None
    return total


# --------------------------------------------------------------------------- REINFORCE


def advantages(rewards: Tensor) -> Tensor:
    """Rewards (N images x T trajectories) minus each image's mean over its T trajectories
    (the per-image baseline); detached."""
    rewards = rewards.detach()
    return rewards - rewards.mean(1, keepdim=True)


def reinforce_loss(logprob: Tensor, rewards: Tensor) -> Tensor:
    """-mean(log pi(a|x) * (R - baseline)) over N x T; its gradient is the REINFORCE
    estimate of -grad E[R]."""
    if logprob.shape != rewards.shape or logprob.ndim != 2:
        raise ValueError(f"logprob {tuple(logprob.shape)} and rewards {tuple(rewards.shape)} "
                         "must both be N x T")
    return -(logprob * advantages(rewards)).mean()


# --------------------------------------------------------------------------- diversity
#
# The reference's diversity term (the authors' released code, which the paper's prose
# summarises): per head, every probability outside the band [(1 - l)/N, (1 + u)/N]
# contributes its log-probability, + above the band and - below it, and the head's sum is
# divided by ONE count of the contributing entries (not a mean above plus a mean below).
# The colour/shape head does this at two levels with the JOINT log-probabilities of its
# 108 classes: an op whose total probability leaves the op band [(1 - l)/G, (1 + u)/G]
# contributes the log-probabilities of all its classes (counted once each), and within an
# op with more than one magnitude each class whose probability given the op leaves
# [(1 - l)/k, (1 + u)/k] contributes its joint log-probability once more; one pooled count
# over both levels. The count is a constant of the graph (no gradient flows through it);
# a head with nothing outside its band contributes 0.


def _signed_sum(logp: Tensor, above: Tensor, below: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of logp over `above` minus over `below`, number of entries in either)."""
    total = torch.where(above, logp, 0.0).sum() - torch.where(below, logp, 0.0).sum()
    return total, above.sum() + below.sum()


def band_penalty(logits: Tensor, lower: float, upper: float) -> Tensor:
    """The diversity penalty of one flat head (rows = images, N classes): the sum of log p
    over the entries above (1 + u)/N minus the sum over those below (1 - l)/N, divided by
    how many entries are outside the band (0 when none)."""
    n = logits.shape[1]
    logp = F.log_softmax(logits.float(), 1)
    p = logp.exp()
    total, count = _signed_sum(logp, p > (1 + upper) / n, p < (1 - lower) / n)
    return total / count.clamp_min(1)


@functools.lru_cache(maxsize=8)
def _group_tables(groups: tuple[tuple[int, int], ...],
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per class: its group's index and size; and the (G x classes) membership matrix
    (made once per device)."""
    of = torch.tensor([g for g, (_, k) in enumerate(groups) for _ in range(k)], device=device)
    size = torch.tensor([k for _, k in groups for _ in range(k)], device=device)
    member = F.one_hot(of, len(groups)).T.float()
    return of, size, member


def colour_penalty(logits: Tensor, lower: float, upper: float,
                   groups: tuple[tuple[int, int], ...] = COLOUR.groups) -> Tensor:
    """The hierarchical penalty of the colour/shape head (class c belongs to op g(c) of
    size k(c), G ops): with joint log-probabilities log p_c,
      + log p_c where p(op g(c)) > (1 + u)/G,  - log p_c where p(op g(c)) < (1 - l)/G,
      + log p_c where k(c) > 1 and p(c | op) > (1 + u)/k(c),  - log p_c where < (1 - l)/k(c),
    summed over images and classes and divided by the number of (image, class, level)
    terms that fired (0 when none)."""
    logp = F.log_softmax(logits.float(), 1)
    p = logp.exp()
    of, size, member = _group_tables(groups, logits.device)
    n_ops = len(groups)
    op_mass = (p @ member.T)[:, of]  # each class's op probability, N x classes
    op_sum, op_count = _signed_sum(logp, op_mass > (1 + upper) / n_ops,
                                   op_mass < (1 - lower) / n_ops)
    within = p / op_mass  # p(c | op)
    multi = size > 1
    in_sum, in_count = _signed_sum(logp, multi & (within > (1 + upper) / size),
                                   multi & (within < (1 - lower) / size))
    return (op_sum + in_sum) / (op_count + in_count).clamp_min(1)


def diversity_penalty(logits: dict[str, Tensor], lower: float, upper: float) -> Tensor:
    """The mean over heads of each head's penalty (hierarchical for `colour`)."""
    terms = [colour_penalty(logit, lower, upper) if name == "colour"
             else band_penalty(logit, lower, upper) for name, logit in logits.items()]
    return torch.stack(terms).mean()
