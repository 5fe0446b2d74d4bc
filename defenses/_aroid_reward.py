"""AROID's rewards (Li, Qiu & Spratling, "AROID: Improving Adversarial Robustness Through
Online Instance-Wise Data Augmentation", IJCV 2024): the vulnerability of the target model
to a short PGD on the augmented images, and the affinity model's loss on them, for T
trajectories of N images scored as one batch of T N (rows trajectory-major), in chunks of
trajectories per call (all at once on a GPU, one at a time on the CPU, or
ROBENCH_AROID_REWARD_CHUNK). Everything runs in eval mode, so the chunking changes no
result (on the CPU, bit for bit); passes are counted per batch of N. See
docs/defenses/aroid.md.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ConfigError
from bench.state import TrainState

REWARD_CHUNK_VARIABLE = "ROBENCH_AROID_REWARD_CHUNK"


def reward_chunk_from_environment() -> int | None:
    """Trajectories per reward attack call, from ROBENCH_AROID_REWARD_CHUNK: 0 = all T at
    once; unset = the device's default (`reward_chunk_for`). It changes no result (on the
    CPU, bit for bit), only memory and speed."""
    raw = os.environ.get(REWARD_CHUNK_VARIABLE, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ConfigError(f"aroid: {REWARD_CHUNK_VARIABLE} must be an integer >= 0 (trajectories "
                          f"per reward attack call; 0 = all at once), got {raw!r}")
    return int(raw)


def reward_chunk_for(device: torch.device, setting: int | None, trajectories: int) -> int:
    """Trajectories per reward attack call: the setting, else all at once on a GPU (T times
    fewer kernel launches) and one at a time on the CPU (measured there: one batch of
    8 x 128 images took 1.7x the time of eight batches of 128)."""
    if setting is None:
        return trajectories if device.type == "cuda" else 1
    return setting or trajectories


def vulnerability(state: TrainState, x_aug: torch.Tensor, y: torch.Tensor, trajectories: int,
                  chunk: int | None, steps: int) -> torch.Tensor:
    """CE of the target on a `steps`-step PGD of x^ minus its CE on x^, in eval mode, for
    `trajectories` whole trajectories (rows trajectory-major), `reward_chunk_for` of them
    per attack call."""
    per = reward_chunk_for(x_aug.device, chunk, trajectories)
    n = x_aug.shape[0] // trajectories
    parts = []
    for first in range(0, trajectories, per):
        k = min(per, trajectories - first)
        rows = slice(first * n, (first + k) * n)
        parts.append(_vulnerability_chunk(state, x_aug[rows], y[rows], k, steps))
    return torch.cat(parts)


def _vulnerability_chunk(state: TrainState, x_aug: torch.Tensor, y: torch.Tensor,
                         batches: int, steps: int) -> torch.Tensor:
    """r_vul on `batches` policy batches' worth of images; passes counted per batch (one
    forward of k batches counts k, as k separate forwards would)."""
    model = state.model
    was_training = model.training
    model.eval()
    before = state.counter.forward, state.counter.input_backward
    try:
        with torch.no_grad(), state.autocast():
            ce_aug = F.cross_entropy(model(x_aug).float(), y, reduction="none")
        step = state.eps if steps == 1 else state.eps / 4
        x_adv = state.attack(x_aug, y, steps=steps, step_size=step, random_start=False,
                             attack_bn="eval")
        with torch.no_grad(), state.autocast():
            ce_adv = F.cross_entropy(model(x_adv).float(), y, reduction="none")
    finally:
        model.train(was_training)
    fwd, bwd = state.counter.forward - before[0], state.counter.input_backward - before[1]
    state.counter.add(fwd=(batches - 1) * fwd + 2 * batches, input_bwd=(batches - 1) * bwd)
    return ce_adv - ce_aug


def affinity_loss(state: TrainState, affinity: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  batches: int, chunk: int | None) -> torch.Tensor:
    """CE of the affinity model (eval mode) per image, in the reward's chunks; counts
    `batches` forwards."""
    per = reward_chunk_for(x.device, chunk, batches) * (x.shape[0] // batches)
    with torch.no_grad(), state.autocast():
        ce = torch.cat([F.cross_entropy(affinity.eval()(part).float(), labels, reduction="none")
                        for part, labels in zip(x.split(per), y.split(per), strict=True)])
    state.counter.add(fwd=batches)
    return ce
