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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


# --------------------------------------------------------------------------- codes


@dataclass
class CodeTable:
    """Every (operation, signed magnitude) a transform can apply, one row each (a "code"):
    its kind (on the host too, for the shared draw), blend factor, posterize mask, solarize
    threshold and sampling grid, on one device."""

    names: list[tuple[str, float]]
    kinds: list[str]
    kind: Tensor       # (K,) long index into KINDS
    blend_op: Tensor   # (K,) long index into BLENDS (0 where not a blend)
    factor: Tensor     # (K,) float32
    rest: Tensor       # (K,) float32: float32(1 - factor), computed in double
    mask: Tensor       # (K,) uint8
    threshold: Tensor  # (K,) float32
    grids: Tensor      # (K, H, W, 2) float32 (zeros where not geometric)
    index: dict[tuple[str, float], int]
    lookups: dict[tuple, Tensor]


def _signed_values(op: str, values: list[float], levels: list[int]) -> list[float]:
    out = []
    for level in levels:
        out += [values[level], -values[level]] if op in SIGNED else [values[level]]
    return out


def build_codes(transform: str, height: int, width: int, device: torch.device) -> CodeTable:
    """The code table of `transform` for H x W images on `device`. AugMix's table has an
    Identity too (a chain shorter than a layer)."""
    bins = magnitude_bins(transform, height, width)
    levels = [9] if transform == "randaugment" else [0, 1, 2]
    ops = RANDAUGMENT_OPS if transform == "randaugment" else ("Identity", *AUGMIX_OPS)
    names: list[tuple[str, float]] = []
    for op in ops:
        for value in _signed_values(op, bins[op], levels) if bins[op] else [0.0]:
            if (op, value) not in names:  # (-0.0 == 0.0: one code, the same output)
                names.append((op, value))
    kinds = ["geometric" if op in GEOMETRIC else "blend" if op in BLENDS else op
             for op, _ in names]
    zero_grid = torch.zeros(1, height, width, 2, device=device)
    grids = [affine_grid(geometric_matrix(op, m, height, width), height, width, device)
             if op in GEOMETRIC else zero_grid for op, m in names]

    def column(values: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return CodeTable(
        names, kinds,
        kind=column([KINDS.index(k) for k in kinds], torch.long),
        blend_op=column([BLENDS.index(op) if op in BLENDS else 0 for op, _ in names],
                        torch.long),
        factor=column([1.0 + m if op in BLENDS else 1.0 for op, m in names], torch.float32),
        rest=column([1.0 - (1.0 + m) if op in BLENDS else 0.0 for op, m in names],
                    torch.float32),
        mask=column([(-int(2 ** (8 - int(m)))) & 0xFF if op == "Posterize" else 0xFF
                     for op, m in names], torch.uint8),
        threshold=column([m if op == "Solarize" else 256.0 for op, m in names], torch.float32),
        grids=torch.cat(grids), index={name: i for i, name in enumerate(names)}, lookups={})


def _sample(img: Tensor, grid: Tensor, mode: str) -> Tensor:
    """torchvision's grid transform without fill: sample as float32, round, uint8."""
    out = F.grid_sample(img.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return torch.round(out).to(img.dtype)


def apply_code(img: Tensor, table: CodeTable, code: int, mode: str) -> Tensor:
    """One operation (a host-known code) on the whole batch: the shared draw."""
    op, kind = table.names[code][0], table.kinds[code]
    if kind == "Identity" or (op == "Color" and img.shape[-3] == 1):  # (as torchvision)
        return img
    if kind == "geometric":
        return _sample(img, table.grids[code:code + 1].expand(img.shape[0], -1, -1, -1), mode)
    if kind == "blend":
        return blend(img, degenerate(img, op), table.factor[code], table.rest[code])
    if kind == "Posterize":
        return posterize(img, table.mask[code])
    if kind == "Solarize":
        return solarize(img, table.threshold[code])
    return autocontrast(img) if kind == "AutoContrast" else equalize(img)


def apply_codes(img: Tensor, table: CodeTable, codes: Tensor, mode: str) -> Tensor:
    """Each image its own operation (codes: (N,) long on the device): every kind is
    computed on the batch and each image gathers its own (no host sync)."""
    n = img.shape[0]

    def per_image(values: Tensor) -> Tensor:
        return values[codes].view(n, 1, 1, 1)

    which = per_image(table.blend_op)
    deg = degenerate(img, BLENDS[0]).expand_as(img)
    for i, op in enumerate(BLENDS[1:], start=1):
        deg = torch.where(which == i, degenerate(img, op).expand_as(img), deg)
    candidates = torch.stack([
        img,
        _sample(img, table.grids[codes], mode),
        blend(img, deg, per_image(table.factor), per_image(table.rest)),
        posterize(img, per_image(table.mask)),
        solarize(img, per_image(table.threshold)),
        autocontrast(img),
        equalize(img),
    ])
    kind = table.kind[codes]
    if img.shape[-3] == 1:  # Color leaves a one-channel image as it is (as torchvision)
        colour = (kind == KINDS.index("blend")) & (table.blend_op[codes] == BLENDS.index("Color"))
        kind = torch.where(colour, 0, kind)
    return candidates[kind, torch.arange(n, device=img.device)]


# --------------------------------------------------------------------------- transforms


class BatchedAugment:
    """torchvision's RandAugment() (2 operations, magnitude 9 of 31 bins, nearest) or
    AugMix() (severity 3, 3 chains of depth 1..3, alpha 1, all operations, bilinear), on
    uint8 N x C x H x W batches: `shared` (one draw, torchvision's output bit for bit) or
    `per_image` (one draw per image)."""

    def __init__(self, transform: str) -> None:
        if transform not in ("randaugment", "augmix"):
            raise ValueError(f"unknown transform {transform!r}")
        self.transform = transform
        self.mode = "nearest" if transform == "randaugment" else "bilinear"
        self.ops = RANDAUGMENT_OPS if transform == "randaugment" else AUGMIX_OPS
        self.levels = 1 if transform == "randaugment" else 3  # magnitude levels drawn from
        self._tables: dict[tuple, CodeTable] = {}

    def table(self, img: Tensor) -> CodeTable:
        key = (img.shape[-2], img.shape[-1], img.device)
        if key not in self._tables:
            self._tables[key] = build_codes(self.transform, *key)
        return self._tables[key]

    def _value(self, op: str, level: int, height: int, width: int) -> float:
        values = magnitude_bins(self.transform, height, width)[op]
        return values[9 if self.transform == "randaugment" else level] if values else 0.0

    # ---- one draw for the batch: torchvision's calls, in its order --------------------
    def _draw(self, table: CodeTable, height: int, width: int) -> int:
        op = self.ops[int(torch.randint(len(self.ops), (1,)).item())]
        if op in ("Identity", "AutoContrast", "Equalize"):  # no magnitude, no sign
            return table.index[(op, 0.0)]
        level = 9
        if self.transform == "augmix":
            level = int(torch.randint(self.levels, (1,), dtype=torch.long).item())
        value = self._value(op, level, height, width)
        if op in SIGNED and torch.randint(2, (1,)):
            value *= -1.0
        return table.index[(op, value)]

    def shared(self, img: Tensor) -> Tensor:
        """torchvision's call on the batch: the same draws, the same output."""
        table, (h, w) = self.table(img), img.shape[-2:]
        if self.transform == "randaugment":
            for _ in range(2):
                img = apply_code(img, table, self._draw(table, h, w), self.mode)
            return img
        n = img.shape[0]
        m = torch._sample_dirichlet(torch.full((n, 2), 1.0, device=img.device))
        weights = torch._sample_dirichlet(
            torch.full((n, 3), 1.0, device=img.device)) * m[:, 1].view(n, -1)
        mix = m[:, 0].view(n, 1, 1, 1) * img
        for i in range(3):
            aug = img
            for _ in range(int(torch.randint(low=1, high=4, size=(1,)).item())):
                aug = apply_code(aug, table, self._draw(table, h, w), self.mode)
            mix.add_(weights[:, i].view(n, 1, 1, 1) * aug)
        return mix.to(img.dtype)

    # ---- one draw per image: the same distributions, drawn on the device ---------------
    def _lookup(self, table: CodeTable, height: int, width: int, device: torch.device) -> Tensor:
        """ops x levels x signs -> code, on the device (built once)."""
        key = (height, width, device)
        if key not in table.lookups:
            codes = [[[table.index[(op, -v if sign and op in SIGNED else v)]
                       for sign in (0, 1)]
                      for v in (self._value(op, level, height, width)
                                for level in range(self.levels))]
                     for op in self.ops]
            table.lookups[key] = torch.tensor(codes, dtype=torch.long, device=device)
        return table.lookups[key]

    def _codes(self, lookup: Tensor, n: int, device: torch.device,
               generator: torch.Generator | None) -> Tensor:
        """(N,) codes: an operation, a magnitude level and a sign, each uniform (the sign
        is ignored by unsigned operations, as torchvision never draws it for them)."""
        op = torch.randint(len(self.ops), (n,), device=device, generator=generator)
        level = torch.randint(self.levels, (n,), device=device, generator=generator)
        sign = torch.randint(2, (n,), device=device, generator=generator)
        return lookup[op, level, sign]

    def per_image(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Every image its own draw, as torchvision called on each image alone; drawn on
        the images' device from `generator` (default: the device's default generator)."""
        table, (h, w) = self.table(img), img.shape[-2:]
        n, device = img.shape[0], img.device
        lookup = self._lookup(table, h, w, device)
        if self.transform == "randaugment":
            for _ in range(2):
                img = apply_codes(img, table, self._codes(lookup, n, device, generator),
                                  self.mode)
            return img
        m = torch._sample_dirichlet(torch.ones(n, 2, device=device), generator=generator)
        weights = torch._sample_dirichlet(torch.ones(n, 3, device=device),
                                          generator=generator) * m[:, 1:]
        mix = m[:, 0].view(n, 1, 1, 1) * img
        identity = table.index[("Identity", 0.0)]
        for i in range(3):
            depth = torch.randint(1, 4, (n,), device=device, generator=generator)
            aug = img
            for layer in range(3):  # layers past an image's depth are the identity
                codes = self._codes(lookup, n, device, generator)
                aug = apply_codes(aug, table, torch.where(depth > layer, codes, identity),
                                  self.mode)
            mix.add_(weights[:, i].view(n, 1, 1, 1) * aug)
        return mix.to(img.dtype)
