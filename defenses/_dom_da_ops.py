"""RandAugment (Cubuk, Zoph, Shlens & Le, "RandAugment: Practical automated data
augmentation with a reduced search space", CVPR workshops 2020) and AugMix (Hendrycks, Mu,
Cubuk, Zoph, Gilmer & Lakshminarayanan, "AugMix: A Simple Data Processing Method to Improve
Robustness and Uncertainty", ICLR 2020) as torchvision's `RandAugment()` / `AugMix()`
(default settings) apply them to uint8 N x C x H x W tensors, batched and without host
synchronisation: DOM-DA's transforms (see docs/defenses/dom_da.md).

Two ways to draw:
- `shared` (DOM-DA's default, as the DOM reference): one draw of operations and
  magnitudes for the whole batch, taken from torch's global CPU generator with exactly
  the calls, in the order, that torchvision's `forward` makes (AugMix's Dirichlet mixing
  weights from the images' device generator, as torchvision). The output equals
  torchvision's bit for bit; what changes is how the operations run: torchvision's
  tensor `equalize` loops over images and channels with two host syncs each
  (`hist[hist != 0]`, `if step == 0`), here one histogram for the batch
  (`scatter_add_`), one look-up table, and `torch.where` for the degenerate channels;
  `autocontrast` uses `torch.where` instead of boolean-mask assignment.
- `per_image`: every image draws its own operations, magnitudes, signs (and AugMix chain
  depths), from the same distributions as a torchvision call on that image alone, as
  (N,) tensors on the images' device, from a given generator (no host round trip). Each
  layer computes every kind of operation on the batch and gathers each image's own.
  The draws come in another order than a loop of torchvision calls, so the images differ
  from such a loop; the distribution is the same (tested).

The operations are torchvision's tensor operations re-derived: geometric ones sample a
grid built with the same formula and calls as torchvision's (one grid per operation and
signed magnitude, cached per image size and device, then gathered per image); the colour
ones are torchvision's blends `(f * img + (1 - f) * degenerate).clamp(0, 255)` truncated
to uint8, with float32 factors as torchvision's Python-scalar arithmetic uses.

This module holds the operations and their tables; `defenses/_dom_da_batched.py` the
per-code dispatch and the transforms (`BatchedAugment`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")
SIGNED = frozenset(GEOMETRIC + BLENDS)
#: torchvision's operation lists, in its dictionary order (the drawn index maps into it).
RANDAUGMENT_OPS = ("Identity", *GEOMETRIC, *BLENDS, "Posterize", "Solarize", "AutoContrast",
                   "Equalize")
AUGMIX_OPS = (*GEOMETRIC, "Posterize", "Solarize", "AutoContrast", "Equalize", *BLENDS)
#: The kinds of computation one layer selects from, per image.
KINDS = ("Identity", "geometric", "blend", "Posterize", "Solarize", "AutoContrast",
         "Equalize")


@lru_cache(maxsize=16)
def magnitude_bins(transform: str, height: int, width: int) -> dict[str, list[float]]:
    """Each operation's magnitudes (unsigned), as torchvision's `_augmentation_space`
    computes them (float32 linspace, read back as Python floats); [] for none."""
    bins = 31 if transform == "randaugment" else 10
    lin = lambda end: [float(v) for v in torch.linspace(0.0, end, bins)]  # noqa: E731
    steps = torch.arange(bins) / ((bins - 1) / 4)
    top = 8 if transform == "randaugment" else 4
    translate = ((150.0 / 331.0 * width, 150.0 / 331.0 * height) if transform == "randaugment"
                 else (width / 3.0, height / 3.0))
    return {"Identity": [], "ShearX": lin(0.3), "ShearY": lin(0.3),
            "TranslateX": lin(translate[0]), "TranslateY": lin(translate[1]),
            "Rotate": lin(30.0), "Brightness": lin(0.9), "Color": lin(0.9),
            "Contrast": lin(0.9), "Sharpness": lin(0.9),
            "Posterize": [float(v) for v in (top - steps.round().int())],
            "Solarize": [float(v) for v in torch.linspace(255.0, 0.0, bins)],
            "AutoContrast": [], "Equalize": []}


def inverse_affine(center: tuple[float, float], angle: float, translate: tuple[float, float],
                   shear: tuple[float, float]) -> list[float]:
    """The output-to-input map of a rotation (degrees), shears (degrees) and translation
    about `center` (pixels from the image centre), scale 1, as torchvision's tensor affine
    builds it: [a, b, c, d, e, f] with input = [[a, b], [d, e]] @ output + [c, f]."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    # forward 2 x 2 part: rotation * y-shear * x-shear (determinant 1), then inverted
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    (cx, cy), (tx, ty) = center, translate
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return m


def geometric_matrix(op: str, magnitude: float, height: int, width: int) -> list[float]:
    """torchvision's matrix for a geometric RandAugment/AugMix operation."""
    if op in ("ShearX", "ShearY"):  # sheared about the top-left corner
        deg = math.degrees(math.atan(magnitude))
        return inverse_affine((-width * 0.5, -height * 0.5), 0.0, (0.0, 0.0),
                              (deg, 0.0) if op == "ShearX" else (0.0, deg))
    if op in ("TranslateX", "TranslateY"):  # whole pixels, truncated towards zero
        shift = (float(int(magnitude)), 0.0) if op == "TranslateX" else (0.0, float(int(magnitude)))
        return inverse_affine((0.0, 0.0), 0.0, shift, (0.0, 0.0))
    return inverse_affine((0.0, 0.0), -magnitude, (0.0, 0.0), (0.0, 0.0))  # Rotate


def affine_grid(matrix: list[float], height: int, width: int, device: torch.device) -> Tensor:
    """The 1 x H x W x 2 sampling grid of `matrix`, with the calls torchvision uses (pixel
    centres, one batched matrix product), so the same numbers on the same device."""
    theta = torch.tensor(matrix, dtype=torch.float32, device=device).reshape(1, 2, 3)
    base = torch.empty(1, height, width, 3, dtype=torch.float32, device=device)
    base[..., 0].copy_(torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, steps=width,
                                      device=device))
    base[..., 1].copy_(torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, steps=height,
                                      device=device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * width, 0.5 * height],
                                                  dtype=torch.float32, device=device)
    return base.view(1, height * width, 3).bmm(scaled).view(1, height, width, 2)


# --------------------------------------------------------------------------- the operations


def _grey_u8(img: Tensor) -> Tensor:
    """torchvision's rgb_to_grayscale on uint8 (truncated), N x 1 x H x W."""
    if img.shape[-3] == 1:
        return img
    r, g, b = img.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(img.dtype).unsqueeze(-3)


def _blurred(img: Tensor) -> Tensor:
    """torchvision's sharpness degenerate: a 3 x 3 smoothing (centre weight 5/13) of the
    interior, rounded; the border kept."""
    kernel = torch.ones((3, 3), dtype=torch.float32, device=img.device)
    kernel[1, 1] = 5.0
    kernel /= kernel.sum()
    kernel = kernel.expand(img.shape[-3], 1, 3, 3)
    inner = torch.round(F.conv2d(img.float(), kernel, groups=img.shape[-3])).to(img.dtype)
    out = img.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def degenerate(img: Tensor, op: str) -> Tensor:
    """What a blend operation moves the image towards (float32, broadcastable)."""
    if op == "Brightness":
        return torch.zeros_like(img).float()
    if op == "Color":
        return _grey_u8(img).float()
    if op == "Contrast":
        return torch.mean(_grey_u8(img).float(), dim=(-3, -2, -1), keepdim=True)
    return _blurred(img).float()  # Sharpness


def blend(img: Tensor, degenerate_: Tensor, factor: Tensor, rest: Tensor) -> Tensor:
    """(factor * img + rest * degenerate).clamp(0, 255) truncated to uint8; `factor` and
    `rest` = float32(1 - factor in double) are N x 1 x 1 x 1 float32."""
    return (factor * img.float() + rest * degenerate_).clamp(0, 255).to(torch.uint8)


def posterize(img: Tensor, mask: Tensor) -> Tensor:
    """img & mask, mask = the high `bits` bits (uint8, N x 1 x 1 x 1)."""
    return img & mask


def solarize(img: Tensor, threshold: Tensor) -> Tensor:
    """Pixels >= threshold (float32, N x 1 x 1 x 1) inverted."""
    return torch.where(img.float() >= threshold, 255 - img, img)


def autocontrast(img: Tensor) -> Tensor:
    """Each channel stretched to [0, 255]; a constant channel kept (torchvision's formula,
    `255 / range` computed as torchvision's reciprocal * 255)."""
    low = img.amin(dim=(-2, -1), keepdim=True).float()
    high = img.amax(dim=(-2, -1), keepdim=True).float()
    scale = (high - low).reciprocal() * 255
    flat = ~torch.isfinite(scale)
    low = torch.where(flat, torch.zeros_like(low), low)
    scale = torch.where(flat, torch.ones_like(scale), scale)
    return ((img - low) * scale).clamp(0, 255).to(torch.uint8)


def equalize(img: Tensor) -> Tensor:
    """torchvision's histogram equalisation of each channel of each image at once:
    step = (pixels - count of the channel's largest value) // 255; a channel with step 0
    is kept; otherwise lut[v] = (cumsum(hist)[v - 1] + step // 2) // step, clamped."""
    n, c, h, w = img.shape
    flat = img.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=img.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    step = (h * w - hist.gather(1, flat.amax(dim=1, keepdim=True))) // 255
    safe = step.clamp(min=1)
    lut = (hist.cumsum(1) + safe // 2) // safe
    lut = F.pad(lut, [1, 0])[:, :-1].clamp(0, 255)
    out = torch.where(step == 0, flat, lut.gather(1, flat))
    return out.to(torch.uint8).reshape(n, c, h, w)
