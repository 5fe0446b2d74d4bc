"""AROID's policy network, its sampling, the hierarchical diversity penalty and the
REINFORCE objective with a per-image baseline (as in the paper).

Everything here runs on the device without host synchronisation: sampling is an inverse
CDF on uniforms from a given generator, the penalty's masks and counts stay tensors.
"""

from __future__ import annotations

import math

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
    """log pi(a | x) per row: the sum over heads of the chosen classes' log-probabilities."""
    total = None
    for name, logit in logits.items():
        lp = F.log_softmax(logit.float(), 1).gather(1, actions[name][:, None])[:, 0]
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

_Parts = list[tuple[Tensor, Tensor, Tensor, Tensor]]


def _band_parts(logp: Tensor, n: int, lower: float, upper: float) -> tuple[Tensor, ...]:
    """Per entry of an n-class log-probability tensor: how far log p lies above the band's
    top log((1 + u)/n) and below its bottom log((1 - l)/n), and the masks of those
    entries (outside the band)."""
    top, bottom = math.log((1 + upper) / n), math.log((1 - lower) / n)
    above, below = logp > top, logp < bottom
    return (torch.where(above, logp - top, 0.0), above,
            torch.where(below, bottom - logp, 0.0), below)


def _reduce(parts: _Parts) -> Tensor:
    """mean over the above-band entries + mean over the below-band entries (each 0 when
    there are none)."""
    above = sum(p[0].sum() for p in parts)
    n_above = sum(p[1].sum() for p in parts)
    below = sum(p[2].sum() for p in parts)
    n_below = sum(p[3].sum() for p in parts)
    return above / n_above.clamp_min(1) + below / n_below.clamp_min(1)  # type: ignore[union-attr]


def band_penalty(logits: Tensor, lower: float, upper: float) -> Tensor:
    """The diversity penalty of one flat head (rows = images): mean of log p over the
    classes above [(1 - l)/N, (1 + u)/N] minus mean of log p over those below, shifted by
    the band's log-bounds so that it is >= 0 and exactly 0 when every probability is inside
    the band (the shift is a constant: the gradient is the spec's)."""
    n = logits.shape[1]
    return _reduce([_band_parts(F.log_softmax(logits.float(), 1), n, lower, upper)])


def colour_penalty(logits: Tensor, lower: float, upper: float,
                   groups: tuple[tuple[int, int], ...] = COLOUR.groups) -> Tensor:
    """The hierarchical penalty of the colour/shape head: the band penalty of the op
    distribution (each op's summed probability, N = number of ops) averaged with the band
    penalty of the magnitude distributions within each op (p(magnitude | op), N = that op's
    magnitudes, pooled over the ops that have more than one)."""
    logp = F.log_softmax(logits.float(), 1)
    op_logp = torch.stack([logp[:, s:s + k].logsumexp(1) for s, k in groups], 1)
    op_term = _reduce([_band_parts(op_logp, len(groups), lower, upper)])
    within = [_band_parts(F.log_softmax(logits[:, s:s + k].float(), 1), k, lower, upper)
              for s, k in groups if k > 1]
    if not within:
        return op_term
    return (op_term + _reduce(within)) / 2


def diversity_penalty(logits: dict[str, Tensor], lower: float, upper: float) -> Tensor:
    """The mean over heads of each head's penalty (hierarchical for `colour`)."""
    terms = [colour_penalty(logit, lower, upper) if name == "colour"
             else band_penalty(logit, lower, upper) for name, logit in logits.items()]
    return torch.stack(terms).mean()
