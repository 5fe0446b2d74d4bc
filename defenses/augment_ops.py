"""Batched image augmentations on the device, with per-image parameters.

Every op takes float images in [0, 1] of shape N x C x H x W (C = 1 or 3) and returns a
tensor of the same shape, dtype, device and memory format, with values in [0, 1]. The
parameters are per image: tensors of shape (N,) (magnitudes, flags, offsets), so a fixed
recipe (IDBH) draws them from a distribution and a learned policy (AROID) passes its own.
Nothing loops over images and nothing synchronises with the host. `apply_ops` gives each
image its own op in one pass per op family (one blend for the blend ops, one gather for the
geometric ops), not every op on every image.

Magnitude conventions (`OPS`, the colour/shape ops selected per image by `apply_ops`):
  saturation, brightness, contrast, sharpness  enhancement factor; 1 = identity, 0 = the
      degenerate image (grey, black, mean grey, smoothed), as PIL's ImageEnhance
  autocontrast, equalize                       no magnitude (ignored)
  shear_x, shear_y                             shear angle in radians (0 = identity)
  rotate                                       angle in degrees, counter-clockwise as shown
  translate_x, translate_y                     shift in pixels (right / down)
  solarize                                     threshold; pixels >= it invert; > 1 = identity
  posterize                                    bits kept, 1..8; 8 = identity
Geometric ops use nearest interpolation about the image centre and fill with zeros.
Flips, CropShift and erasing (regions of the image, with their samplers) are in
`defenses/augment_regions.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's "L" conversion


def _keep_format(out: Tensor, like: Tensor) -> Tensor:
    """`out` in the memory format of `like` (gathers return plain NCHW)."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


def _per_image(value: Tensor | float, x: Tensor) -> Tensor | float:
    """An (N,) magnitude as N x 1 x 1 x 1 in x's dtype; a Python number as it is (no
    host-to-device copy)."""
    if not isinstance(value, Tensor):
        return float(value)
    return value.to(x.dtype).reshape(-1, 1, 1, 1)


def _as_vector(value: Tensor | float, x: Tensor) -> Tensor:
    """An (N,) float32 magnitude (a Python number is filled in on the device)."""
    if not isinstance(value, Tensor):
        return torch.full((x.shape[0],), float(value), device=x.device)
    return value.float().expand(x.shape[0])


def uniform_int(low: Tensor, high: Tensor, generator: torch.Generator) -> Tensor:
    """One integer per entry, uniform on {low, ..., high} (inclusive, per entry)."""
    u = torch.rand(low.shape, generator=generator, device=low.device)
    return low + torch.minimum((u * (high - low + 1)).long(), high - low)


# --------------------------------------------------------------------------- colour


def _blend(x: Tensor, degenerate: Tensor | float, factor: Tensor | float) -> Tensor:
    f = _per_image(factor, x)
    return (f * x + (1 - f) * degenerate).clamp_(0, 1)


def grey(x: Tensor) -> Tensor:
    """N x 1 x H x W luma (the image itself when it has one channel)."""
    if x.shape[1] == 1:
        return x
    r, g, b = _GREY
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


def brightness(x: Tensor, factor: Tensor | float) -> Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def saturation(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with the grey image (identity on one-channel images, as torchvision)."""
    return x.clone() if x.shape[1] == 1 else _blend(x, grey(x), factor)


def contrast(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with the image's mean luma."""
    return _blend(x, grey(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def sharpness(x: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with PIL's SMOOTH filter (3x3, centre 5, others 1, / 13); borders kept."""
    return _blend(x, _smooth(x), factor)


def _smooth(x: Tensor) -> Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, others 1, / 13) inside the border; border kept."""
    c = x.shape[1]
    kernel = torch.full((3, 3), 1 / 13, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5 / 13
    kernel = kernel.expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=c)
    return smooth


def autocontrast(x: Tensor, magnitude: Tensor | float | None = None) -> Tensor:
    """Stretch each channel to [0, 1]; a constant channel is left unchanged."""
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, 1.0, 1 / (hi - lo).clamp_min(1e-12))
    lo = lo.masked_fill(flat, 0.0)
    return ((x - lo) * scale).clamp_(0, 1)


def equalize(x: Tensor, magnitude: Tensor | float | None = None) -> Tensor:
    """Histogram equalisation per channel on the 256 uint8 levels (PIL's algorithm);
    the output is quantised to multiples of 1/255."""
    n, c, h, w = x.shape
    q = (x * 255).round().clamp(0, 255).long().reshape(n * c, h * w)
    offsets = torch.arange(n * c, device=x.device)[:, None] * 256
    hist = torch.zeros(n * c * 256, dtype=torch.long, device=x.device)  # (bincount syncs)
    hist = hist.scatter_add_(0, (q + offsets).reshape(-1), torch.ones_like(q).reshape(-1))
    hist = hist.view(n * c, 256)
    last = hist.gather(1, q.amax(1, keepdim=True))  # count of the highest level present
    step = (h * w - last) // 255
    before = hist.cumsum(1) - hist
    lut = ((before + step // 2) // step.clamp_min(1)).clamp_(0, 255)
    out = torch.where(step > 0, lut.gather(1, q), q)
    return _keep_format(out.view(n, c, h, w).to(x.dtype) / 255, x)


def solarize(x: Tensor, threshold: Tensor | float) -> Tensor:
    """Invert the pixels at or above the threshold."""
    return torch.where(x >= _per_image(threshold, x), 1 - x, x)


def posterize(x: Tensor, bits: Tensor | float) -> Tensor:
    """Keep the top `bits` bits of each uint8 level."""
    bits = _per_image(bits, x)
    levels = 2 ** (8 - (bits.round() if isinstance(bits, Tensor) else round(bits)))
    q = (x * 255).round()
    return (torch.div(q, levels, rounding_mode="floor") * levels / 255).to(x.dtype)


# --------------------------------------------------------------------------- geometry


def affine_nearest(x: Tensor, matrix: Tensor, shift: Tensor | None = None) -> Tensor:
    """Each output pixel p (relative to the image centre) takes the input pixel nearest
    to matrix @ p + shift (per image: matrix N x 2 x 2, shift N x 2, both (x, y) in
    pixels); pixels that map outside the image are zero."""
    n, c, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=torch.float32) - (h - 1) / 2
    xs = torch.arange(w, device=x.device, dtype=torch.float32) - (w - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)])  # 2 x HW
    src = matrix.float() @ grid  # N x 2 x HW
    if shift is not None:
        src = src + shift.float()[:, :, None]
    sx = torch.round(src[:, 0] + (w - 1) / 2).long()
    sy = torch.round(src[:, 1] + (h - 1) / 2).long()
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    index = sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)
    out = x.reshape(n, c, h * w).gather(2, index[:, None, :].expand(n, c, h * w))
    out = torch.where(inside[:, None, :], out, 0.0)
    return _keep_format(out.view(n, c, h, w), x)


def _linear(x: Tensor, magnitude: Tensor | float, kind: str) -> Tensor:
    """Shear along x or y (radians) or rotation (degrees) by its (N, 2, 2) source matrix."""
    m = _as_vector(magnitude, x)
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    if kind == "rotate":
        cos, sin = torch.cos(torch.deg2rad(m)), torch.sin(torch.deg2rad(m))
        a, b, c, d = cos, -sin, sin, cos
    else:
        t = torch.tan(m)
        a, b, c, d = (one, t, zero, one) if kind == "x" else (one, zero, t, one)
    return affine_nearest(x, torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2))


def shear(x: Tensor, angle: Tensor | float, axis: str = "x") -> Tensor:
    """Shear along `axis` ("x" or "y") by `angle` radians."""
    return _linear(x, angle, axis)


def rotate(x: Tensor, degrees: Tensor | float) -> Tensor:
    return _linear(x, degrees, "rotate")


def translate(x: Tensor, pixels: Tensor | float, axis: str = "x") -> Tensor:
    """Shift the content right ("x") or down ("y") by `pixels`."""
    shift = torch.zeros(x.shape[0], 2, device=x.device)
    shift[:, 0 if axis == "x" else 1] = -_as_vector(pixels, x)
    return affine_nearest(x, torch.eye(2, device=x.device).expand(x.shape[0], 2, 2), shift)


# --------------------------------------------------------------------------- dispatch

Op = Callable[[Tensor, Tensor], Tensor]
OPS: dict[str, Op] = {
    "identity": lambda x, m: x, "saturation": saturation, "brightness": brightness,
    "contrast": contrast, "sharpness": sharpness, "autocontrast": autocontrast,
    "equalize": equalize, "rotate": rotate, "solarize": solarize, "posterize": posterize,
    "shear_x": lambda x, m: shear(x, m, "x"), "shear_y": lambda x, m: shear(x, m, "y"),
    "translate_x": lambda x, m: translate(x, m, "x"),
    "translate_y": lambda x, m: translate(x, m, "y"),
}


#: the ops `apply_ops` fuses: each family runs once per call, with per-image parameters
_BLEND = ("saturation", "brightness", "contrast", "sharpness")
_AFFINE = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def _blend_selected(x: Tensor, picked: dict[str, Tensor], magnitude: Tensor) -> Tensor:
    """The blend ops in one pass: each image blends with its own op's degenerate image
    (grey, black, mean grey or smoothed), computed as each op computes it."""
    degenerate: Tensor | float = 0.0  # brightness: black
    luma = grey(x) if "saturation" in picked or "contrast" in picked else None
    if luma is not None and "saturation" in picked:
        degenerate = torch.where(picked["saturation"], luma, degenerate)
    if luma is not None and "contrast" in picked:
        mean = luma.mean(dim=(1, 2, 3), keepdim=True)
        degenerate = torch.where(picked["contrast"], mean, degenerate)
    if "sharpness" in picked:
        degenerate = torch.where(picked["sharpness"], _smooth(x), degenerate)
    return _blend(x, degenerate, magnitude)


def _affine_selected(x: Tensor, picked: dict[str, Tensor], magnitude: Tensor) -> Tensor:
    """The geometric ops in one gather: each image's own source matrix and shift (the
    identity for images of other ops), built exactly as `rotate`, `shear` and `translate`
    build theirs."""
    m = _as_vector(magnitude, x)
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    a, b, c, d, sx, sy = one, zero, zero, one, zero, zero
    if "rotate" in picked:
        rot = picked["rotate"]
        cos, sin = torch.cos(torch.deg2rad(m)), torch.sin(torch.deg2rad(m))
        a, b = torch.where(rot, cos, a), torch.where(rot, -sin, b)
        c, d = torch.where(rot, sin, c), torch.where(rot, cos, d)
    if "shear_x" in picked or "shear_y" in picked:
        t = torch.tan(m)
        if "shear_x" in picked:
            b = torch.where(picked["shear_x"], t, b)
        if "shear_y" in picked:
            c = torch.where(picked["shear_y"], t, c)
    if "translate_x" in picked:
        sx = torch.where(picked["translate_x"], -m, sx)
    if "translate_y" in picked:
        sy = torch.where(picked["translate_y"], -m, sy)
    matrix = torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2)
    return affine_nearest(x, matrix, torch.stack([sx, sy], -1))


def apply_ops(x: Tensor, names: Sequence[str], choice: Tensor, magnitude: Tensor) -> Tensor:
    """Image i gets op `names[choice[i]]` with `magnitude[i]` (choice long, N; an image
    whose choice names no op is left as it is). No host sync on any device.

    The blend ops run as one blend and the geometric ops as one gather, each image with
    its own op's parameters (`_blend_selected`, `_affine_selected`); autocontrast,
    equalize, solarize and posterize run on the whole batch (each is a few element-wise
    kernels) and the choice selects per image. The result equals, bit for bit, running
    every op on the whole batch and selecting (what this function did before)."""
    unknown = [name for name in names if name not in OPS]
    if unknown:
        raise KeyError(f"unknown augmentation op(s) {unknown}; known: {sorted(OPS)}")
    picked: dict[str, Tensor] = {}
    for k, name in enumerate(names):
        hit = choice == k
        picked[name] = picked[name] | hit if name in picked else hit
    if x.shape[1] == 1:
        picked.pop("saturation", None)  # identity on one channel, as `saturation`
    picked.pop("identity", None)
    out = x
    blends = {n: picked.pop(n).view(-1, 1, 1, 1) for n in _BLEND if n in picked}
    if blends:
        out = torch.where(_any(blends), _blend_selected(x, blends, magnitude), out)
    affine = {n: picked.pop(n) for n in _AFFINE if n in picked}
    if affine:
        out = torch.where(_any(affine).view(-1, 1, 1, 1), _affine_selected(x, affine, magnitude),
                          out)
    for name, hit in picked.items():
        out = torch.where(hit.view(-1, 1, 1, 1), OPS[name](x, magnitude), out)
    return _keep_format(out, x)


def _any(picked: dict[str, Tensor]) -> Tensor:
    masks = iter(picked.values())
    out = next(masks)
    for mask in masks:
        out = out | mask
    return out
