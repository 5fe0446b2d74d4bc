"""Stochastic weight averaging (Izmailov et al., "Averaging Weights Leads to Wider Optima
and Better Generalization", UAI 2018) as the adversarial-training codes use it (Chen et
al., "Robust Overfitting may be Mitigated by Properly Learned Smoothening", ICLR 2021;
IDBH's WRN recipe reuses their code): a reusable piece that any defense can hold.

The average (a copy of the model, of the suite's architecture) follows the trained
weights after the optimizer steps:
  - the first update copies the whole model, parameters and buffers;
  - later updates average the *parameters* only: with `decay` = alpha,
    avg <- (1 - alpha) avg + alpha w (an exponential average; the published WRN recipe
    uses alpha = 0.001), or with `decay = "equal"`, avg <- avg + (w - avg) / (n + 1)
    (the plain mean of the n + 1 weights seen);
  - updates happen from epoch `start * E` on (0-based epochs; `start` is a fraction of
    training), after every `every`-th batch of an epoch (1-based batch count);
  - BatchNorm buffers are not averaged: at the end of each epoch in which the average
    exists, its running statistics are reset and re-estimated on one epoch's worth of
    training batches in training mode, each batch weighted by its size (a cumulative
    mean: momentum b / (n + b)), as the reference's `bn_update`.

A defense uses it by delegating hooks: `setup` -> `build(state)`, `after_step` ->
`after_step(state)`, `on_epoch_end` -> `on_epoch_end(state, batch)` with a function that
returns one training batch as the defense trains on it, and `eval_models` ->
`models(name)`, the name listed in the defense's `extra_models` (the evaluator then
scores the average as a sub-row). It never changes the trained model: a run with SWA
trains the same weights as without it. Documented with IDBH: docs/defenses/idbh.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.config import ConfigError
from bench.curves import make_generator
from bench.state import TrainState

EQUAL = "equal"


def check_settings(owner: str, start: Any, decay: Any, every: Any,
                   prefix: str = "") -> tuple[float, float | None, int]:
    """Validated (start, decay or None for the equal average, every); one-line errors."""
    if isinstance(start, bool) or not isinstance(start, int | float) or not (
            math.isfinite(start) and 0 <= start < 1):
        raise ConfigError(f"{owner}: {prefix}start must be a fraction of training in [0, 1), "
                          f"got {start!r}")
    if decay == EQUAL:
        alpha = None
    elif isinstance(decay, bool) or not isinstance(decay, int | float) or not (
            math.isfinite(decay) and 0 < decay <= 1):
        raise ConfigError(f"{owner}: {prefix}decay must be a number in (0, 1] (the weight of "
                          f"the new weights) or {EQUAL!r}, got {decay!r}")
    else:
        alpha = float(decay)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"{owner}: {prefix}every must be an integer >= 1 (batches between "
                          f"updates), got {every!r}")
    return float(start), alpha, every


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: list[torch.Tensor] | Any,
                        autocast: Callable[[], Any] | None = None) -> int:
    """Reset the BatchNorm running statistics of `model` and re-estimate them as the
    size-weighted mean of the batch statistics over `batches` (training mode); the
    momenta are restored and the model is left in eval mode. Returns the batch count."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
    model.train()
    seen = count = 0
    try:
        for x in batches:
            b = x.shape[0]
            for m in layers:
                m.momentum = b / (seen + b)
            if autocast is None:
                model(x)
            else:
                with autocast():
                    model(x)
            seen += b
            count += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return count


class WeightAverage(nn.Module):
    """The averaged model and its update rule (see the module docstring)."""

    def __init__(self, model: nn.Module, decay: float | None) -> None:
        super().__init__()
        self.average = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.count = 0  # updates so far

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.count == 0:
            self.average.load_state_dict(model.state_dict())
        else:
            alpha = self.decay if self.decay is not None else 1.0 / (self.count + 1)
            mine = [p.data for p in self.average.parameters()]
            theirs = [p.detach() for p in model.parameters()]
            torch._foreach_mul_(mine, 1.0 - alpha)
            torch._foreach_add_(mine, theirs, alpha=alpha)
        self.count += 1

    def get_extra_state(self) -> Any:
        return {"count": self.count}

    def set_extra_state(self, extra: Any) -> None:
        self.count = int(extra["count"])


class SWA(nn.Module):
    """Settings, schedule and the average, driven from a defense's hooks. Randomness of the
    BatchNorm pass comes from `generator` (bound by the owner), never from the training's."""

    def __init__(self, owner: str, start: float, decay: float | None, every: int) -> None:
        super().__init__()
        self.owner, self.start, self.decay, self.every = owner, start, decay, every
        self.averaged: WeightAverage | None = None
        self.generator: torch.Generator | None = None

    def bind_random_stream(self, seed_text: str, device: torch.device) -> None:
        self.generator = make_generator(seed_text, "swa", device)

    def build(self, state: TrainState) -> None:
        self.averaged = WeightAverage(state.model, self.decay)

    def started(self, state: TrainState) -> bool:
        return state.epoch >= self.start * state.epochs

    def after_step(self, state: TrainState) -> None:
        assert self.averaged is not None, f"{self.owner}: SWA build() not called"
        if self.started(state) and (state.step_in_epoch + 1) % self.every == 0:
            self.averaged.update(state.model)

    def on_epoch_end(self, state: TrainState, batch: Callable[[], torch.Tensor]) -> None:
        """Re-estimate the average's BatchNorm statistics on `batches_per_epoch` batches
        from `batch()` (counted as forwards)."""
        assert self.averaged is not None, f"{self.owner}: SWA build() not called"
        if self.averaged.count == 0 or not batchnorm_layers(self.averaged.average):
            return
        batches = (batch() for _ in range(state.batches_per_epoch))
        n = recompute_batchnorm(self.averaged.average, batches, state.autocast)
        state.counter.add(fwd=n)

    def models(self, name: str) -> dict[str, nn.Module]:
        if self.averaged is None or self.averaged.count == 0:
            return {}
        return {name: self.averaged.average}

    def get_extra_state(self) -> Any:
        return {"generator": self.generator.get_state() if self.generator else None}

    def set_extra_state(self, extra: Any) -> None:
        if extra and extra.get("generator") is not None and self.generator is not None:
            self.generator.set_state(extra["generator"])
