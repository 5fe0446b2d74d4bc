"""Batched region augmentations on the device, with per-image parameters: horizontal
flips, CropShift (Li & Spratling, "Data Augmentation Alone Can Improve Adversarial
Training", ICLR 2023) and random erasing (Zhong, Zheng, Kang, Li & Yang, "Random Erasing
Data Augmentation", AAAI 2020), with the samplers of their parameters.

The conventions of `defenses/augment_ops.py` hold: float images in [0, 1], N x C x H x W,
memory format kept, per-image parameters as (N,) tensors, no loop over images, no host
sync. The samplers (`sample_crop_shift`, `sample_erase_boxes`) draw only from the
generator they are given, a fixed number of values per call, so a recipe is reproducible.
"""

from __future__ import annotations

import math

import torch

from defenses.augment_ops import _keep_format, uniform_int

Tensor = torch.Tensor


def hflip(x: Tensor, flip: Tensor) -> Tensor:
    """Mirror the images where `flip` (N, bool) is set."""
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def _box_mask(x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """N x 1 x H x W, True inside each image's box (per-image long tensors, N)."""
    n, _, h, w = x.shape
    r = torch.arange(h, device=x.device).expand(n, h) - top[:, None]
    q = torch.arange(w, device=x.device).expand(n, w) - left[:, None]
    in_r = (r >= 0) & (r < height[:, None])
    in_q = (q >= 0) & (q < width[:, None])
    return (in_r[:, :, None] & in_q[:, None, :])[:, None]


def crop_shift(x: Tensor, shift_x: Tensor, shift_y: Tensor, crop_x: Tensor, crop_y: Tensor,
               place_x: Tensor, place_y: Tensor) -> Tensor:
    """CropShift with given per-image parameters (long, N): cut the (W - shift_x) x
    (H - shift_y) window whose top-left corner is (crop_x, crop_y) and paste it with its
    top-left corner at (place_x, place_y) on a zero canvas of W x H (offsets within
    0..shift along each axis)."""
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device) + (crop_y - place_y)[:, None]).clamp(0, h - 1)
    cols = (torch.arange(w, device=x.device) + (crop_x - place_x)[:, None]).clamp(0, w - 1)
    out = x.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    keep = _box_mask(x, place_y, place_x, h - shift_y, w - shift_x)
    return _keep_format(torch.where(keep, out, 0.0), x)


def sample_crop_shift(total: Tensor, generator: torch.Generator) -> tuple[Tensor, ...]:
    """CropShift parameters for per-image total shifts s (long, N): s_x ~ U{0..s},
    s_y = s - s_x, then crop and place offsets uniform on 0..s_x (x) and 0..s_y (y).
    Returns (shift_x, shift_y, crop_x, crop_y, place_x, place_y) for `crop_shift`."""
    zero = torch.zeros_like(total)
    sx = uniform_int(zero, total, generator)
    sy = total - sx
    corners = [uniform_int(zero, s, generator) for s in (sx, sy, sx, sy)]
    return (sx, sy, *corners)


def sample_erase_boxes(n: int, h: int, w: int, generator: torch.Generator,
                       scale: tuple[Tensor | float, Tensor | float] = (0.02, 0.33),
                       ratio: tuple[float, float] = (0.3, 3.3),
                       attempts: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random-erasing boxes as torchvision's RandomErasing draws them, per image: up to
    `attempts` tries of area ~ U(scale) * H * W and log-uniform aspect ratio; the first
    box that fits (height < H and width < W) is placed uniformly; no fit -> empty box.
    `scale` bounds may be (N,) tensors. Returns (top, left, height, width), long (N)."""
    dev = generator.device
    lo, hi = (s.float().expand(n) if isinstance(s, Tensor)
              else torch.full((n,), float(s), device=dev) for s in scale)
    u = torch.rand(n, attempts, 4, generator=generator, device=dev)
    area = h * w * (lo[:, None] + (hi - lo)[:, None] * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    bh = torch.round(torch.sqrt(area * aspect)).long()
    bw = torch.round(torch.sqrt(area / aspect)).long()
    fits = (bh < h) & (bw < w)
    first = fits.int().argmax(1, keepdim=True)  # first fitting attempt (0 if none)
    found = fits.any(1)
    bh, bw = bh.gather(1, first)[:, 0], bw.gather(1, first)[:, 0]
    top = (u[..., 2].gather(1, first)[:, 0] * (h - bh + 1)).long().clamp(max=h - bh)
    left = (u[..., 3].gather(1, first)[:, 0] * (w - bw + 1)).long().clamp(max=w - bw)
    zero = torch.zeros_like(bh)
    return top, left, torch.where(found, bh, zero), torch.where(found, bw, zero)


def erase(x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor,
          value: float = 0.0) -> Tensor:
    """Set each image's box (per-image long tensors, N) to `value` in every channel."""
    return torch.where(_box_mask(x, top, left, height, width), value, x)
