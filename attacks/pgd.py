"""L-inf gradient attacks: PGD, FGSM-RS, N-FGSM, and the losses they ascend.

- PGD: Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models
  Resistant to Adversarial Attacks", ICLR 2018.
- FGSM-RS: Wong, Rice & Kolter, "Fast is better than free: Revisiting
  adversarial training", ICLR 2020.
- N-FGSM: de Jorge, Bibi, Volpi, Sanyal, Torr, Rogez & Dokania, "Make Some
  Noise: Reliable and Efficient Single-Step Adversarial Training", NeurIPS 2022.

Conventions shared by every function here:

- images are float tensors in [0, 1] of shape (N, C, H, W), labels int64;
- the iterate is kept in fp32 and gradients are input gradients only
  (``torch.autograd.grad`` with respect to the iterate; parameters' ``.grad``
  is never touched and no weight gradient is computed);
- the loss is *summed* over the batch, so low-precision autocast cannot flush
  per-sample gradients to zero (the sign of the gradient is the same as for
  the mean);
- with ``autocast_dtype``, the forward passes of one attack share one autocast context,
  so each weight is cast to low precision once per attack (autocast's cast cache), not
  once per iteration; the loss and the backward run with autocast off. Callers must not
  change the weights while an autocast context of theirs is open (the cache would serve
  the old casts);
- the model's train/eval mode is left as the caller set it;
- randomness comes only from ``generator`` (the global RNG when it is None);
- ``counter``, when given, gets ``counter["fwd"] += 1`` per forward pass over a
  batch and ``counter["bwd"] += 1`` per backward pass (``autograd.grad`` call).

Since the perturbation set {delta : |delta|_inf <= eps, 0 <= x + delta <= 1} is a
box, the projection Pi onto it is an element-wise clamp of x + delta to
[max(0, x - eps), min(1, x + eps)]; the attacks iterate on x_adv = x + delta
directly, which gives the same gradients and steps as iterating on delta.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("ce", "cw", "kl")

__all__ = [
    "LOSSES",
    "attack_loss",
    "clean_accuracy",
    "cw_margin",
    "fgsm_rs",
    "n_fgsm",
    "pgd",
    "robust_accuracy",
]


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample CW margin ``max_{j != y} z_j - z_y`` (positive = misclassified)."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - z_y


def attack_loss(
    loss: str, logits: torch.Tensor, y: torch.Tensor, target_probs: torch.Tensor | None = None
) -> torch.Tensor:
    """The attack objective, summed over the batch, computed in fp32.

    ``ce``: cross-entropy; ``cw``: CW margin (:func:`cw_margin`, as in CW-inf);
    ``kl``: KL(p || softmax(logits)) with ``p = target_probs`` (TRADES).
    """
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    if loss == "cw":
        return cw_margin(logits, y).sum()
    if loss == "kl":
        if target_probs is None:
            raise ValueError("the kl loss needs target_probs")
        return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="sum")
    raise ValueError(f"unknown attack loss {loss!r}; expected one of {LOSSES}")


def _autocast(x: torch.Tensor, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=dtype)


def _fp32(x: torch.Tensor, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast off inside an enclosing :func:`_autocast` (a no-op without one). Nested,
    it leaves the enclosing context's weight-cast cache alive: the cache is emptied only
    when the outermost autocast context exits."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


def _count(counter: dict | None, key: str) -> None:
    if counter is not None:
        counter[key] = counter.get(key, 0) + 1


def _uniform(x: torch.Tensor, bound: float, generator: torch.Generator | None) -> torch.Tensor:
    """U(-bound, bound) noise shaped like ``x`` (fp32, on x's device)."""
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return u.mul_(2 * bound).sub_(bound)


def _ascend(
    model: nn.Module,
    x_adv: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    lo: torch.Tensor | float,
    hi: torch.Tensor | float,
    step_size: float,
    steps: int,
    autocast_dtype: torch.dtype | None,
    counter: dict | None,
) -> torch.Tensor:
    """``steps`` signed-gradient ascent steps on ``loss_fn(model(x_adv))``, clamped to [lo, hi].

    One autocast context spans all the steps, so its cache keeps the low-precision copy
    of each weight (autocast caches casts of leaf tensors that require grad) and every
    forward after the first reuses it instead of casting the weights again. The weights
    do not change during the attack, so the cached casts are exact; the cache is emptied
    when the context exits, before the caller can step an optimizer. The loss and the
    backward run with autocast off, as they would outside the context.
    """
    x_adv = x_adv.detach()
    with torch.enable_grad(), _autocast(x_adv, autocast_dtype):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            _count(counter, "fwd")
            with _fp32(x_adv, autocast_dtype):
                (grad,) = torch.autograd.grad(loss_fn(logits), x_adv)
            _count(counter, "bwd")
            # The graph is freed, so updating the storage in place is safe.
            x_adv = x_adv.detach()
            x_adv.add_(grad.sign_(), alpha=step_size).clamp_(lo, hi)
    return x_adv


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss: str = "ce",
    random_start: bool = True,
    clean_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    kl_init_std: float = 0.001,
    counter: dict | None = None,
) -> torch.Tensor:
    """L-inf PGD (Madry et al. 2018); returns x_adv, detached, fp32, in the eps-ball and [0, 1].

    Start: ``ce``/``cw``: delta ~ U(-eps, eps), then x + delta clipped to [0, 1];
    ``kl``: the TRADES start x + kl_init_std * N(0, I), clipped to the eps-ball and
    [0, 1]; ``random_start=False``: x itself. Then ``steps`` times
    delta <- Pi(delta + step_size * sign(grad_delta loss)).

    Losses: ``ce`` cross-entropy, ``cw`` the CW margin max_{j != y} z_j - z_y, ``kl``
    KL(p(x) || p(x + delta)) with p(x) = softmax(clean_logits) (detached; computed
    once under no_grad when None). ``autocast_dtype`` runs the forward passes under
    ``torch.autocast`` with that dtype; the loss and the iterate stay fp32.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; expected one of {LOSSES}")
    x = x.detach().float()
    lo = (x - eps).clamp_(min=0.0)
    hi = (x + eps).clamp_(max=1.0)

    target_probs = None
    if loss == "kl":
        if clean_logits is None:
            with torch.no_grad(), _autocast(x, autocast_dtype):
                clean_logits = model(x)
            _count(counter, "fwd")
        target_probs = clean_logits.detach().float().softmax(dim=1)

    if not random_start:
        x_adv = x.clone()
    elif loss == "kl":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        x_adv = torch.clamp(x + kl_init_std * noise, lo, hi)
    else:
        x_adv = torch.clamp(x + _uniform(x, eps, generator), lo, hi)

    return _ascend(
        model,
        x_adv,
        lambda logits: attack_loss(loss, logits, y, target_probs),
        lo=lo,
        hi=hi,
        step_size=step_size,
        steps=steps,
        autocast_dtype=autocast_dtype,
        counter=counter,
    )


def fgsm_rs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    counter: dict | None = None,
) -> torch.Tensor:
    """FGSM with random start (Wong, Rice & Kolter 2020).

    delta ~ U(-eps, eps) clipped to the box, one signed-gradient CE step of
    ``step_size`` (1.25 eps in the paper), projected onto the eps-ball and [0, 1].
    """
    return pgd(
        model,
        x,
        y,
        eps=eps,
        step_size=step_size,
        steps=1,
        loss="ce",
        random_start=True,
        generator=generator,
        autocast_dtype=autocast_dtype,
        counter=counter,
    )


def n_fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    noise_mag: float | None = None,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    counter: dict | None = None,
) -> torch.Tensor:
    """N-FGSM (de Jorge et al. 2022): noise U(-noise_mag, noise_mag) (default 2 eps),
    one signed-gradient CE step of ``step_size`` (default eps), **no** projection onto
    the eps-ball: only the image box [0, 1] is enforced (the start is clipped to it
    too), so the perturbation can reach noise_mag + step_size (3 eps by default).
    """
    noise_mag = 2 * eps if noise_mag is None else noise_mag
    step_size = eps if step_size is None else step_size
    x = x.detach().float()
    x_adv = (x + _uniform(x, noise_mag, generator)).clamp_(0.0, 1.0)
    return _ascend(
        model,
        x_adv,
        lambda logits: attack_loss("ce", logits, y),
        lo=0.0,
        hi=1.0,
        step_size=step_size,
        steps=1,
        autocast_dtype=autocast_dtype,
        counter=counter,
    )


def _device_of(model: nn.Module, default: torch.device) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return default


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss: str = "ce",
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    progress: str | None = None,
) -> float:
    """Fraction of ``x`` still classified correctly under random-start PGD.

    Runs :func:`pgd` batch by batch (batches moved to the model's device) with the
    model left in whatever mode the caller set; ``steps == 0`` gives the clean
    accuracy. ``progress``: show a tqdm bar with that description. For ``kl`` the
    clean logits are computed per batch. One host synchronisation at the end.
    """
    device = _device_of(model, x.device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    starts = range(0, x.shape[0], batch_size)
    if progress is not None:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, leave=False)
    for i in starts:
        xb = x[i : i + batch_size].to(device, non_blocking=True)
        yb = y[i : i + batch_size].to(device, non_blocking=True)
        if steps > 0:
            xb = pgd(
                model,
                xb,
                yb,
                eps=eps,
                step_size=step_size,
                steps=steps,
                loss=loss,
                generator=generator,
            )
        with torch.no_grad():
            correct += (model(xb).argmax(dim=1) == yb).sum()
    return correct.item() / max(x.shape[0], 1)


def clean_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
) -> float:
    """Fraction of ``x`` classified correctly (model mode left as-is, no gradients)."""
    return robust_accuracy(model, x, y, eps=0.0, step_size=0.0, steps=0, batch_size=batch_size)
