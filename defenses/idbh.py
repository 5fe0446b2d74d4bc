"""IDBH (Li & Spratling, "Data Augmentation Alone Can Improve Adversarial Training",
ICLR 2023): a fixed, diverse and moderately hard augmentation recipe that replaces the
usual pad-crop + flip of adversarial training and alone mitigates robust overfitting.

Per image, in order (every draw is per image, from the defense's own random stream):
  1. horizontal flip with p = 0.5;
  2. CropShift(0, 11): total shift s ~ U{0..10}, s_x ~ U{0..s}, s_y = s - s_x; a
     (W - s_x) x (H - s_y) window at a random offset is pasted at a random offset on a
     zero canvas of W x H;
  3. one colour/shape op, uniformly among 8 (no identity): saturation U[0.1, 1.9),
     brightness U[0.5, 1.9), contrast U[0.5, 1.9), sharpness U[0.1, 1.9), autocontrast,
     equalize, shear U[0.05, 0.15) rad (random sign and axis), rotate by 1..10 degrees
     (random sign); nearest interpolation, zero fill;
  4. random erasing (area 0.02-0.33 of the image, aspect ratio 0.3-3.3, value 0) with
     p = 1 (`variant = "strong"`) or p = 0.5 (`"weak"`).

Engine-specific choices:
- The defense asks for the unaugmented batch (`raw_batch`) and replaces `state.x` with
  its IDBH augmentation in `before_attack`. The loader still applies the suite's own
  augmentation to the batch it yields (its random draws keep the data order of the plain
  method), but that image is discarded; validation and curves are never augmented.
- The ops are batched tensor ops on the device (`defenses/augment_ops.py`) on float images;
  the reference applies them to PIL uint8 images, which rounds after every op (here only
  equalize quantises, to its 256 levels).
- The attack is the suite's (the engine owns the threat model); the reference's PGD has
  no random start.
- `max_shift` (default 10, the CIFAR recipe) is exposed so a suite with smaller images
  can scale CropShift; it must stay below the image side.
- `swa = true` adds the weight average of the published WRN-34-10 recipe (weak variant +
  SWA from the first iteration, decay 0.001 per iteration; `defenses/_swa.py`), scored as
  the sub-row `idbh.swa`; its BatchNorm statistics are re-estimated each epoch on
  IDBH-augmented training batches. The trained model is the same with or without it.
  `cifar10-linf-wrn` sets weak + SWA; the defaults (strong, no SWA) are the
  PreActResNet-18 recipe.

The project's documentation of IDBH, with every difference from the authors' code and the
published numbers: docs/defenses/idbh.md.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from bench.config import ConfigError
from bench.state import TrainState
from defenses._swa import SWA, check_settings
from defenses.augment_ops import (
    apply_ops,
    uniform_int,
)
from defenses.augment_regions import (
    crop_shift,
    erase,
    hflip,
    sample_crop_shift,
    sample_erase_boxes,
)
from defenses.base import Defense, DefenseCard, register_defense
from defenses.card import BEST_NOT_STATED, FULL_TRAIN, entries

#: Erasing probability of each published variant (CIFAR-10).
VARIANTS = {"strong": 1.0, "weak": 0.5}
#: The colour/shape ops (drawn uniformly) and their magnitude ranges: [low, high), but
#: rotate draws integer degrees low..high; shear and rotate get a random sign.
COLOUR_SHAPE = ("saturation", "brightness", "contrast", "sharpness", "autocontrast",
                "equalize", "shear", "rotate")
RANGES = {"saturation": (0.1, 1.9), "brightness": (0.5, 1.9), "contrast": (0.5, 1.9),
          "sharpness": (0.1, 1.9), "shear": (0.05, 0.15), "rotate": (1, 10)}
ERASE_SCALE, ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)
#: The ops as `apply_ops` names them: shear splits into its two axes.
_APPLIED = COLOUR_SHAPE[:6] + ("shear_x", "shear_y", "rotate")
_SHEAR, _ROTATE = COLOUR_SHAPE.index("shear"), COLOUR_SHAPE.index("rotate")


def _ranges_of(op: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image magnitude bounds of the drawn ops (filled on the device: no copies)."""
    lo, hi = torch.zeros(op.shape, device=op.device), torch.zeros(op.shape, device=op.device)
    for k, name in enumerate(COLOUR_SHAPE):
        if name in RANGES:
            lo = torch.where(op == k, float(RANGES[name][0]), lo)
            hi = torch.where(op == k, float(RANGES[name][1]), hi)
    return lo, hi


class IDBHDraw(NamedTuple):
    """One batch's IDBH parameters, per image (N): what `apply_idbh` applies."""

    flip: torch.Tensor  # bool
    crop_shift: tuple[torch.Tensor, ...]  # shift_x, shift_y, crop_x, crop_y, place_x, place_y
    op: torch.Tensor  # index into COLOUR_SHAPE
    choice: torch.Tensor  # index into the applied ops (shear split into its two axes)
    magnitude: torch.Tensor  # signed; factor, radians or degrees
    erase: tuple[torch.Tensor, ...]  # top, left, height, width (0 x 0 when not erased)


def sample_idbh(n: int, h: int, w: int, generator: torch.Generator, erase_p: float,
                max_shift: int = 10) -> IDBHDraw:
    """Draw the recipe's parameters for n images of h x w from `generator` (a fixed count
    of numbers per call, on the generator's device)."""
    if not 0 <= max_shift < min(h, w):
        raise ValueError(f"idbh: max_shift {max_shift} must be in [0, {min(h, w)}) for "
                         f"{h} x {w} images")
    dev = generator.device
    coins = torch.rand(n, 5, generator=generator, device=dev)  # flip, op, value, sign, axis
    total = uniform_int(torch.zeros(n, dtype=torch.long, device=dev),
                        torch.full((n,), max_shift, dtype=torch.long, device=dev), generator)
    shifts = sample_crop_shift(total, generator)
    op = (coins[:, 1] * len(COLOUR_SHAPE)).long().clamp_(max=len(COLOUR_SHAPE) - 1)
    lo, hi = _ranges_of(op)
    magnitude = lo + (hi - lo) * coins[:, 2]
    degrees = lo + ((hi - lo + 1) * coins[:, 2]).floor().minimum(hi - lo)
    magnitude = torch.where(op == _ROTATE, degrees, magnitude)
    signed = (op == _SHEAR) | (op == _ROTATE)
    magnitude = torch.where(signed & (coins[:, 3] < 0.5), -magnitude, magnitude)
    choice = op + (op > _SHEAR).long() + ((op == _SHEAR) & (coins[:, 4] < 0.5)).long()
    top, left, bh, bw = sample_erase_boxes(n, h, w, generator, ERASE_SCALE, ERASE_RATIO)
    hit = torch.rand(n, generator=generator, device=dev) < erase_p
    zero = torch.zeros_like(bh)
    erase_box = (top, left, torch.where(hit, bh, zero), torch.where(hit, bw, zero))
    return IDBHDraw(coins[:, 0] < 0.5, shifts, op, choice, magnitude, erase_box)


def apply_idbh(x: torch.Tensor, draw: IDBHDraw) -> torch.Tensor:
    """Flip, CropShift, the colour/shape op, erasing: float images in [0, 1], N x C x H x W."""
    x = hflip(x, draw.flip)
    x = crop_shift(x, *draw.crop_shift)
    x = apply_ops(x, _APPLIED, draw.choice, draw.magnitude)
    return erase(x, *draw.erase)


def idbh_augment(x: torch.Tensor, generator: torch.Generator, erase_p: float,
                 max_shift: int = 10) -> torch.Tensor:
    """The IDBH recipe on a batch, with per-image draws from `generator` (on x's device)."""
    n, _, h, w = x.shape
    return apply_idbh(x, sample_idbh(n, h, w, generator, erase_p, max_shift))


_PAPER = ("Li & Spratling. Data Augmentation Alone Can Improve Adversarial Training")


@register_defense("idbh")
class IDBH(Defense):
    """IDBH (Li & Spratling, ICLR 2023): the fixed recipe (see the module docstring) in
    place of the suite's augmentation of each training batch."""

    card = DefenseCard(
        name="IDBH",
        paper=_PAPER,
        venue="ICLR 2023",
        link="https://openreview.net/forum?id=y4uc4NtTWaq",
        reference_code="https://github.com/TreeLLi/DA-Alone-Improves-AT",
        hyperparameters={
            "flip": "horizontal, p 0.5",
            "CropShift": "total shift U{0..10}, split U{0..s}, random crop and place offsets, "
                         "zero fill",
            "colour/shape (one of 8, uniform)": {
                "saturation": [0.1, 1.9], "brightness": [0.5, 1.9], "contrast": [0.5, 1.9],
                "sharpness": [0.1, 1.9], "autocontrast": None, "equalize": None,
                "shear (rad, random sign and axis)": [0.05, 0.15],
                "rotate (integer degrees, random sign)": [1, 10]},
            "interpolation / fill": "nearest / 0",
            "random erasing": {"scale": list(ERASE_SCALE), "ratio": list(ERASE_RATIO),
                               "value": 0, "p (strong / weak)": [1.0, 0.5]},
            "training": "PGD-AT (the reference's PGD has no random start)",
            "WRN-34-10 recipe (authors' README)": {
                "variant": "weak", "SWA": "from epoch 0, decay 0.001, every iteration, BN "
                                          "statistics re-estimated on the training set "
                                          "each epoch"},
        },
        published=entries(
            {"method": "at", "epochs": 200, "runs": 3, "selection": "not stated",
             "data_split": "50k train", "source": "the paper (AutoAttack, 3 runs)",
             "suite": "cifar10-linf", "differences": (FULL_TRAIN, BEST_NOT_STATED)},
            ("autoattack", "best", 48.21, {"label": "AT (pad-crop)"}),
            ("autoattack", "last", 42.46, {"label": "AT (pad-crop)"}),
            ("autoattack", "best", 50.74, {"label": "AT+IDBH-strong", "defenses": ("idbh",),
                                           "params": {"idbh": {"variant": "strong"}}}),
            ("autoattack", "last", 49.99, {"label": "AT+IDBH-strong", "defenses": ("idbh",),
                                           "params": {"idbh": {"variant": "strong"}},
                                           "runs": 0, "source": "quoted by CURE"})),
        extra_data="none",
        notes=("Replaces the suite's augmentation of the training batch (raw_batch) with the "
               "recipe, as batched ops on the device; the suite's attack and threat model "
               "are kept. Extra cost: the augmentation only (no extra passes). swa = true "
               "(set by cifar10-linf-wrn with the weak variant, as the authors' WRN-34-10 "
               "command) adds the weight average as the sub-row idbh.swa: one extra forward "
               "per training batch for its BatchNorm pass each epoch, a second model in "
               "memory. Its 'best' row is the average at the trained model's best "
               "validation epoch (the reference keeps its own best-on-test SWA "
               "checkpoint); compare 'last'. See docs/defenses/idbh.md."),
    )
    params = {"variant": "strong", "max_shift": 10, "swa": False, "swa_start": 0.0,
              "swa_decay": 0.001, "swa_every": 1}
    methods = ("at",)
    slots = ("augmentation",)
    capabilities = ("raw_batch",)
    extra_models = ("swa",)

    def __init__(self, variant: str = "strong", max_shift: int = 10, swa: bool = False,
                 swa_start: float = 0.0, swa_decay: float | str = 0.001,
                 swa_every: int = 1) -> None:
        super().__init__(variant=variant, max_shift=max_shift, swa=swa, swa_start=swa_start,
                         swa_decay=swa_decay, swa_every=swa_every)
        if variant not in VARIANTS:
            raise ConfigError(f"idbh: variant must be one of {list(VARIANTS)}, got {variant!r}")
        if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
            raise ConfigError(f"idbh: max_shift must be an integer >= 0, got {max_shift!r}")
        if not isinstance(swa, bool):
            raise ConfigError(f"idbh: swa must be true or false, got {swa!r}")
        start, decay, every = check_settings("idbh", swa_start, swa_decay, swa_every, "swa_")
        self.variant = variant
        self.erase_p = VARIANTS[variant]
        self.max_shift = max_shift
        # the weight average (the published WRN-34-10 recipe), scored as the sub-row idbh.swa
        self.averaging = SWA("idbh", start, decay, every) if swa else None

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The recipe on float images in [0, 1], from the defense's own random stream."""
        if self.generator is None:
            raise RuntimeError("idbh: no random stream; call bind_random_stream first")
        return idbh_augment(x, self.generator, self.erase_p, self.max_shift)

    def before_attack(self, state: TrainState) -> None:
        assert state.raw_x is not None, "the engine did not provide the raw batch"
        state.x = self.augment(state.raw_x)

    # ---- SWA (off unless `swa = true`) -----------------------------------------
    def bind_random_stream(self, run_seed: int, device: torch.device) -> None:
        super().bind_random_stream(run_seed, device)
        if self.averaging is not None:  # its own stream: the training draws never shift
            self.averaging.bind_random_stream(f"{run_seed}:{self.name}", device)

    def setup(self, state: TrainState) -> None:
        if self.averaging is not None:
            self.averaging.build(state)

    def after_step(self, state: TrainState) -> None:
        if self.averaging is not None:
            self.averaging.after_step(state)

    def on_epoch_end(self, state: TrainState) -> None:
        if self.averaging is not None:
            self.averaging.on_epoch_end(state, lambda: self.bn_batch(state))

    def bn_batch(self, state: TrainState) -> torch.Tensor:
        """A training batch as IDBH trains on it (the reference re-estimates the average's
        BatchNorm statistics on its IDBH-augmented training loader), drawn from the
        engine's second stream and augmented from the SWA's own generator."""
        assert self.averaging is not None and self.averaging.generator is not None
        raw, _, _ = state.draw_batch(augment=False)
        return idbh_augment(raw, self.averaging.generator, self.erase_p, self.max_shift)

    def eval_models(self, state: TrainState) -> dict[str, torch.nn.Module]:
        return {} if self.averaging is None else self.averaging.models("swa")
