"""The operations of FOMO (Ramkumar, Zonooz & Arani, "The Effectiveness of Random
Forgetting for Robust Generalization", ICLR 2024), as plain functions on tensors and
modules: which kernels may be forgotten, which entries are forgotten, their
re-initialisation and momentum reset, the EMA of the stable model and the consistency
term. `defenses/fomo.py` wires them to the engine's hooks.

Every random draw takes an explicit `torch.Generator` (the defense's own stream); masks
index weights in their logical (row-major) order, so they do not depend on the memory
format (channels_last) of the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.state import kernel_parameters

SHORTCUT_NAMES = ("shortcut", "downsample")  # projection shortcuts (ROBench, torchvision)
INITS = ("default", "zeros")
CONSISTENCY_LOSSES = ("mse", "kl")


def eligible_kernels(model: nn.Module, fraction: float = 0.5,
                     skip_shortcuts: bool = True) -> list[tuple[str, nn.Parameter]]:
    """The later `fraction` of the conv/linear kernels in registration order (rounded up,
    so an odd count includes the middle one), projection shortcuts left out first when
    `skip_shortcuts`. Biases and BatchNorm parameters are never eligible. For
    PreActResNet-18 at 0.5: layer3 and layer4 convs and the final linear layer."""
    kernels = kernel_parameters(model)
    if skip_shortcuts:
        kernels = [(n, p) for n, p in kernels
                   if not any(part in SHORTCUT_NAMES for part in n.split("."))]
    count = math.ceil(fraction * len(kernels) - 1e-9)
    return kernels[len(kernels) - count:] if count > 0 else []


def forgotten_count(rho: float, n: int) -> int:
    """round(rho * n), halves rounded up."""
    return math.floor(rho * n + 0.5)


def forgetting_masks(shapes: list[torch.Size], rho: float, generator: torch.Generator,
                     per_layer: bool = True) -> list[torch.Tensor]:
    """Boolean masks (one per shape, on the generator's device) that mark a uniformly
    random set of exactly round(rho * n) entries: n the size of each layer (`per_layer`)
    or of all layers together (the chosen entries then fall where they fall)."""
    device = generator.device
    sizes = [math.prod(s) for s in shapes]

    def choose(n: int) -> torch.Tensor:
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        k = forgotten_count(rho, n)
        if k > 0:
            mask[torch.randperm(n, generator=generator, device=device)[:k]] = True
        return mask

    flat = [choose(n) for n in sizes] if per_layer else list(choose(sum(sizes)).split(sizes))
    return [m.view(s) for m, s in zip(flat, shapes, strict=True)]


def fan_in(weight: torch.Tensor) -> int:
    """Inputs per output unit: in_features, or in_channels / groups x kernel size."""
    return weight.shape[1] * math.prod(weight.shape[2:])


@torch.no_grad()
def reinitialise_(weight: torch.Tensor, mask: torch.Tensor, generator: torch.Generator,
                  init: str = "default") -> None:
    """Re-draw the masked entries of `weight` in place. `default` is PyTorch's default
    initialisation of conv and linear kernels, kaiming_uniform(a = sqrt(5)), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)); `zeros` sets them to 0. The draw covers the whole
    kernel (in logical order) so it does not depend on how many entries are masked."""
    if init == "zeros":
        fresh = torch.zeros_like(weight, memory_format=torch.contiguous_format)
    else:
        bound = 1.0 / math.sqrt(fan_in(weight))
        fresh = torch.rand(weight.shape, generator=generator, device=weight.device,
                           dtype=weight.dtype).mul_(2 * bound).sub_(bound)
    weight.copy_(torch.where(mask, fresh, weight))


@torch.no_grad()
def reset_optimizer_state_(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                           masks: list[torch.Tensor]) -> None:
    """Zero the masked entries of every per-parameter optimizer state tensor shaped like
    its parameter (SGD's momentum buffer; Adam's moments); other entries are untouched.
    A parameter without state yet (no step taken) is skipped."""
    for p, mask in zip(params, masks, strict=True):
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.shape == p.shape:
                value.masked_fill_(mask, 0)


@torch.no_grad()
def ema_update_(stable: nn.Module, working: nn.Module, decay: float,
                gate: torch.Tensor | None = None) -> None:
    """stable <- decay * stable + (1 - decay) * working for every parameter; every buffer
    (BatchNorm running statistics and counters) is copied. With a boolean 0-dim `gate`
    the update happens only where it is true (decided on the device: no host sync). A few
    foreach operations over all tensors, no per-tensor loop."""
    s_params, w_params = list(stable.parameters()), [p.detach() for p in working.parameters()]
    s_buffers, w_buffers = list(stable.buffers()), list(working.buffers())
    if len(s_params) != len(w_params) or len(s_buffers) != len(w_buffers):
        raise ValueError("fomo: the stable model does not match the working model")
    if gate is None:
        torch._foreach_mul_(s_params, decay)
        torch._foreach_add_(s_params, w_params, alpha=1 - decay)
        if s_buffers:
            torch._foreach_copy_(s_buffers, w_buffers)
        return
    keep = torch.where(gate, decay, 1.0)  # 1: the stable model stays as it is
    torch._foreach_mul_(s_params, keep)
    torch._foreach_add_(s_params, torch._foreach_mul(w_params, 1 - keep))
    # buffers: s * (1 - g) + w * g with g in {0, 1}, in each buffer's dtype (exact for
    # finite values: s or w), floats and integers (BatchNorm's counter) apart
    for is_float in (True, False):
        pairs = [(s, w) for s, w in zip(s_buffers, w_buffers, strict=True)
                 if s.is_floating_point() == is_float]
        if not pairs:
            continue
        s_list, w_list = [s for s, _ in pairs], [w for _, w in pairs]
        on = gate.to(s_list[0].dtype)
        torch._foreach_mul_(s_list, 1 - on)
        torch._foreach_add_(s_list, torch._foreach_mul(w_list, on))


def consistency_loss(logits: torch.Tensor, target_logits: torch.Tensor,
                     kind: str = "mse") -> torch.Tensor:
    """Distance of the working model's logits to the stable model's (a constant):
    `mse`, the mean over batch and classes of the squared difference; `kl`,
    KL(softmax(target) || softmax(logits)) averaged over the batch. Zero when they agree."""
    logits, target = logits.float(), target_logits.detach().float()
    if kind == "mse":
        return F.mse_loss(logits, target)
    if kind == "kl":
        return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(target, dim=1),
                        reduction="batchmean", log_target=True)
    raise ValueError(f"fomo: unknown consistency loss {kind!r}; valid: {list(CONSISTENCY_LOSSES)}")
