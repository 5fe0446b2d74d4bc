"""A tentative optimizer step: where would the optimizer move these parameters with these
gradients? The step is taken for real and then undone, so the parameters, their `.grad`
and the optimizer state (momentum buffers, step counts) end bit for bit as before (used by
LAP, whose perturbation follows the optimizer's own update)."""

from __future__ import annotations

import copy
from typing import Any

import torch

OptimizerSnapshot = dict[torch.Tensor, dict[str, tuple[Any, Any]]]


def snapshot_optimizer(optimizer: torch.optim.Optimizer) -> OptimizerSnapshot:
    """Every per-parameter state entry with a private copy of its value (tensors
    cloned: optimizers update momentum buffers and step counts in place)."""
    return {
        p: {key: (value, value.detach().clone() if torch.is_tensor(value) else copy.deepcopy(value))
            for key, value in entries.items()}
        for p, entries in optimizer.state.items()
    }


def restore_optimizer(optimizer: torch.optim.Optimizer, snapshot: OptimizerSnapshot) -> None:
    """Put back the snapshot's values into the original tensors and drop state
    created since (a first step creates momentum buffers: they must not survive)."""
    for p in [p for p in optimizer.state if p not in snapshot]:
        del optimizer.state[p]
    with torch.no_grad():
        for p, entries in snapshot.items():
            restored = {}
            for key, (original, saved) in entries.items():
                if torch.is_tensor(original):
                    restored[key] = original.copy_(saved)
                else:
                    restored[key] = saved
            state = optimizer.state[p]
            state.clear()
            state.update(restored)


def tentative_update(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                     grads: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The change `optimizer.step()` would make to `params` given `grads` (every
    other parameter without a gradient, so it is skipped), i.e. w' - w per param.
    Weights, `.grad` of every parameter and the optimizer state are restored."""
    all_params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_grads = [p.grad for p in all_params]
    snapshot = snapshot_optimizer(optimizer)
    before = [p.detach().clone() for p in params]
    try:
        for p in all_params:
            p.grad = None
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
        return [p.detach() - b for p, b in zip(params, before)]
    finally:
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        restore_optimizer(optimizer, snapshot)
        for p, g in zip(all_params, saved_grads):
            p.grad = g
