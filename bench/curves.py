"""Per-epoch curve points and the shared seeding helpers.

Light on purpose: imports no defense code, so both the engine (which draws the curves
each epoch) and the evaluator (which re-checks the curve values of the checkpoints it
scores) use the same functions.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from attacks.pgd import pgd
from bench.config import Suite


def derive_seed(seed: int | str, stream: str) -> int:
    """A 63-bit seed for a named random stream of a run (sha256 of seed and name)."""
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def make_generator(seed: int | str, stream: str, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, stream))
    return gen


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` with `dtype` on `device`, or nothing when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_float(x_uint8: torch.Tensor, channels_last: bool) -> torch.Tensor:
    x = x_uint8.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class CurvePoint:
    robust: float
    clean: float
    fgsm: float | None = None  # FGSM accuracy (zero start, step eps) when asked for


def fgsm_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                 autocast_dtype: torch.dtype | None) -> int:
    """Images still correct after FGSM from a zero start with step eps (the convention
    of the catastrophic-overfitting literature); uses no randomness."""
    x_adv = pgd(model, x, y, eps=eps, step_size=eps, steps=1, random_start=False,
                autocast_dtype=autocast_dtype)
    with torch.no_grad(), autocast(x.device, autocast_dtype):
        return int((model(x_adv).argmax(1) == y).sum().item())


def curve_point(model: nn.Module, x: torch.Tensor, y: torch.Tensor, suite: Suite,
                seed: int, autocast_dtype: torch.dtype | None, batch: int = 500,
                fgsm: bool = False) -> CurvePoint:
    """PGD (the suite's curve attack) and clean accuracy, eval mode, fixed seed; with
    `fgsm`, also FGSM accuracy (which draws no random numbers, so PGD is unchanged)."""
    c, eps = suite.curves, suite.train.eps
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    robust = clean = fgsm_hits = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            x_adv = pgd(model, xb, yb, eps=eps, step_size=c.step_ratio * eps,
                        steps=c.attack_steps, generator=gen, autocast_dtype=autocast_dtype)
            with torch.no_grad(), autocast(x.device, autocast_dtype):
                robust += (model(x_adv).argmax(1) == yb).sum().item()
                clean += (model(xb).argmax(1) == yb).sum().item()
            if fgsm:
                fgsm_hits += fgsm_correct(model, xb, yb, eps, autocast_dtype)
    finally:
        model.train(was_training)
    n = max(1, len(x))
    return CurvePoint(robust / n, clean / n, fgsm_hits / n if fgsm else None)
