"""AROID's search space and its batched, per-image application on the device.

Four categorical heads, applied in this order (as the paper's policy space):

  flip    2 classes    0 = none, 1 = horizontal flip
  crop   16 classes    CropShift with total shift k = 0..15 pixels (0 = none)
  colour 108 classes   (op, magnitude): identity, autocontrast, equalize (one class each);
                       rotate, solarize, colour (saturation), posterize, contrast,
                       brightness, sharpness, shear x/y, translate x/y, 10 magnitudes each on
                       a uniform grid (posterize: 5 distinct bit depths); rotate, shear and
                       translate get a random sign
  erase  11 classes    0 = none; k = random erasing of area fraction U(0.05k, 0.05k + 0.01),
                       aspect ratio 0.3-3.3, value 0

The magnitude grids follow the reference implementation (TreeLLi/AROID, its RandAugment
ranges at granularity 10): magnitude_i = low + (high - low) * i / 10 for i = 1..10, cut to
an integer (and repeated values dropped) for the discrete ops; the solarize threshold is
the integer level / 256. The policy chooses the class of every head; what is left random
within a class (CropShift's split and offsets, the sign, the erased box) is drawn from the
generator passed in, a fixed count of numbers per call. The ops are those of
`defenses/augment_ops.py`: batched, no loop over images, no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from defenses.augment_ops import apply_ops
from defenses.augment_regions import (
    crop_shift,
    erase,
    hflip,
    sample_crop_shift,
    sample_erase_boxes,
)

Tensor = torch.Tensor

#: head -> number of classes, in the order the transforms are applied
HEADS: dict[str, int] = {"flip": 2, "crop": 16, "colour": 108, "erase": 11}
GRANULARITY = 10
ERASE_STEP, ERASE_WIDTH, ERASE_RATIO = 0.05, 0.01, (0.3, 3.3)

#: colour/shape ops: (augment_ops name, low, high, discrete, signed); None = no magnitude
_OP_RANGES: tuple[tuple[str, tuple[float, float, bool, bool] | None], ...] = (
    ("identity", None), ("autocontrast", None), ("equalize", None),
    ("rotate", (0, 30, True, True)), ("solarize", (0, 256, True, False)),
    ("saturation", (0.1, 1.9, False, False)), ("posterize", (4, 8, True, False)),
    ("contrast", (0.1, 1.9, False, False)), ("brightness", (0.1, 1.9, False, False)),
    ("sharpness", (0.1, 1.9, False, False)), ("shear_x", (0, 0.3, False, True)),
    ("shear_y", (0, 0.3, False, True)), ("translate_x", (0, 10, True, True)),
    ("translate_y", (0, 10, True, True)),
)


def magnitude_grid(low: float, high: float, discrete: bool,
                   granularity: int = GRANULARITY) -> tuple[float, ...]:
    """low + (high - low) * i / granularity for i = 1..granularity; integers (floor) for a
    discrete op, with consecutive repeats dropped."""
    out: list[float] = []
    for i in range(1, granularity + 1):
        value = low + (high - low) * i / granularity
        value = float(int(value)) if discrete else value
        if not out or value != out[-1]:
            out.append(value)
    return tuple(out)


@dataclass(frozen=True)
class ColourSpace:
    """The flattened colour/shape head: class c applies op `ops[op_of[c]]` with magnitude
    `magnitude[c]` (a random sign where `signed[c]`); op k owns the classes
    `groups[k] = (start, size)`."""

    ops: tuple[str, ...]
    op_of: tuple[int, ...]
    magnitude: tuple[float, ...]
    signed: tuple[bool, ...]
    groups: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.op_of)


def build_colour_space(granularity: int = GRANULARITY) -> ColourSpace:
    ops, op_of, magnitude, signed, groups = [], [], [], [], []
    for k, (name, spec) in enumerate(_OP_RANGES):
        values: tuple[float, ...] = (0.0,)
        sign = False
        if spec is not None:
            low, high, discrete, sign = spec
            values = magnitude_grid(low, high, discrete, granularity)
            if name == "solarize":
                values = tuple(v / 256 for v in values)
        groups.append((len(op_of), len(values)))
        ops.append(name)
        op_of += [k] * len(values)
        magnitude += list(values)
        signed += [sign] * len(values)
    return ColourSpace(tuple(ops), tuple(op_of), tuple(magnitude), tuple(signed), tuple(groups))


COLOUR = build_colour_space()
assert len(COLOUR) == HEADS["colour"], len(COLOUR)


class _Tables:
    """The colour space as tensors on one device (copied there once)."""

    def __init__(self, device: torch.device) -> None:
        self.op_of = torch.tensor(COLOUR.op_of, dtype=torch.long, device=device)
        self.magnitude = torch.tensor(COLOUR.magnitude, dtype=torch.float32, device=device)
        self.signed = torch.tensor(COLOUR.signed, dtype=torch.bool, device=device)


_TABLES: dict[str, _Tables] = {}


def _tables(device: torch.device) -> _Tables:
    key = str(device)
    if key not in _TABLES:
        _TABLES[key] = _Tables(device)
    return _TABLES[key]


def max_crop_shift() -> int:
    return HEADS["crop"] - 1


class Residual(NamedTuple):
    """What a class leaves random, per image (N): the sign coins of the signed colour ops,
    CropShift's parameters (`sample_crop_shift`) and the erasing boxes (0 x 0 where the
    erase class is 0)."""

    coins: Tensor
    crop: tuple[Tensor, ...]
    erase: tuple[Tensor, Tensor, Tensor, Tensor]


def sample_residual(actions: dict[str, Tensor], h: int, w: int,
                    generator: torch.Generator) -> Residual:
    """Draw the residual randomness of `actions` (long, N each) for h x w images from
    `generator`: N sign coins, CropShift's draws, the erasing boxes, in that order (a
    fixed count of numbers per call)."""
    n = actions["flip"].shape[0]
    coins = torch.rand(n, generator=generator, device=generator.device)
    crop = sample_crop_shift(actions["crop"], generator)
    k = actions["erase"]
    low = ERASE_STEP * k.float()
    top, left, bh, bw = sample_erase_boxes(n, h, w, generator, (low, low + ERASE_WIDTH),
                                           ERASE_RATIO)
    none = k == 0
    return Residual(coins, crop, (top, left, bh.masked_fill(none, 0), bw.masked_fill(none, 0)))


def concat_draws(drawn: Sequence[tuple[dict[str, Tensor], Residual]]
                 ) -> tuple[dict[str, Tensor], Residual]:
    """Several draws (actions, residual) as one, rows in the order given (draw-major)."""
    actions = {name: torch.cat([a[name] for a, _ in drawn]) for name in HEADS}
    residuals = [r for _, r in drawn]
    coins = torch.cat([r.coins for r in residuals])
    crop = tuple(torch.cat(parts) for parts in zip(*(r.crop for r in residuals)))
    top, left, bh, bw = (torch.cat(parts) for parts in zip(*(r.erase for r in residuals)))
    return actions, Residual(coins, crop, (top, left, bh, bw))


def repeat_batch(x: Tensor, times: int) -> Tensor:
    """`times` copies of the batch, one after another (trajectory-major: row t N + i is
    image i), in x's memory format."""
    out = torch.cat([x] * times)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out


def by_image(values: Tensor, times: int) -> Tensor:
    """Per-row values of a trajectory-major batch (T N rows) as N images x T."""
    return values.view(times, -1).T


def check_image_size(h: int, w: int) -> None:
    if max_crop_shift() >= min(h, w):
        raise ValueError(f"aroid: CropShift up to {max_crop_shift()} px needs images larger "
                         f"than {h} x {w}")


def apply_drawn(x: Tensor, actions: dict[str, Tensor], residual: Residual) -> Tensor:
    """Augment float images in [0, 1] (N x C x H x W) with per-image head classes (`actions`,
    long, N each) and their residual draws: flip, CropShift, the colour/shape op, erasing.
    Returns a tensor of x's shape, dtype and memory format."""
    check_image_size(*x.shape[2:])
    table = _tables(x.device)
    x = hflip(x, actions["flip"] == 1)
    x = crop_shift(x, *residual.crop)
    entry = actions["colour"]
    magnitude = table.magnitude[entry]
    magnitude = torch.where(table.signed[entry] & (residual.coins < 0.5), -magnitude, magnitude)
    x = apply_ops(x, COLOUR.ops, table.op_of[entry], magnitude)
    return erase(x, *residual.erase)


def apply_actions(x: Tensor, actions: dict[str, Tensor], generator: torch.Generator) -> Tensor:
    """`apply_drawn` with the residual randomness drawn now from `generator` (on x's
    device; `sample_residual`)."""
    check_image_size(*x.shape[2:])
    return apply_drawn(x, actions, sample_residual(actions, *x.shape[2:], generator))


def identity_actions(n: int, device: torch.device) -> dict[str, Tensor]:
    """The classes that leave every image unchanged (all heads at 0: identity is colour 0)."""
    return {name: torch.zeros(n, dtype=torch.long, device=device) for name in HEADS}
