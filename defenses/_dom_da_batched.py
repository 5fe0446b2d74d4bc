"""DOM-DA's batched transforms: every (operation, signed magnitude) of RandAugment
(Cubuk et al., CVPR workshops 2020) or AugMix (Hendrycks et al., ICLR 2020) as a row of a
code table, applied per image by code, and `BatchedAugment`, torchvision's `RandAugment()`
/ `AugMix()` on uint8 batches, shared draw (bit for bit torchvision's) or per image. The
operations themselves and the conventions: `defenses/_dom_da_ops.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defenses._dom_da_ops import (
    AUGMIX_OPS,
    BLENDS,
    GEOMETRIC,
    KINDS,
    RANDAUGMENT_OPS,
    SIGNED,
    affine_grid,
    autocontrast,
    blend,
    degenerate,
    equalize,
    geometric_matrix,
    magnitude_bins,
    posterize,
    solarize,
)

Tensor = torch.Tensor


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
