"""Sanity checks of an evaluation: is the number trustworthy?

Every check returns flags `{"check", "level", "message"}`. Levels:

- `masking`: the robust accuracy may be inflated by useless gradients; the leaderboard
  marks the row and does not rank it.
- `integrity`: what the training process recorded does not match its checkpoint (e.g. the
  validation curve that chose the best checkpoint); marked and not ranked.
- `health`: the model did not learn (clean accuracy at chance), or PGD is fooled or
  unstable where AutoAttack ran (the ranked worst case counts AutoAttack); marked, still
  ranked.
- `note`: shown, changes nothing (AutoAttack's own messages below their calibrated level).

Each threshold was calibrated on the honest records of the CPU suites (no false alarm)
and on models masked through their weights alone (every one flagged); see
`docs/trust.md` for the measurements.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from attacks.autoattack import AutoAttackResult, classify_warning
from attacks.pgd import pgd
from bench.config import Suite

# clean accuracy at most 1/classes + this: the model did not train
NEAR_CHANCE_MARGIN = 0.05
SANITY_IMAGES = 100  # images of the attack subset for the two PGD-only checks below
HUGE_EPS = 0.5  # PGD at this radius (any image can become almost any other) ...
HUGE_EPS_MAX_ACC = 0.05  # ... must leave at most this accuracy
# five times more PGD steps (half the step) may not raise accuracy by more than this
# plus the binomial noise of the two runs on the sanity images
MORE_STEPS_SLACK = 0.02
AA_GAP_FLAG = 0.10  # PGD-20 minus AutoAttack on the subset above this: PGD is being fooled
# images every gradient attack missed and gradient-free Square broke, as a fraction of the
# subset: above this the gradients are not to be trusted
SQUARE_ONLY_MAX = 0.03
# correctly classified images of the subset whose cross-entropy input gradient is exactly
# zero in fp32 (a saturated softmax): above this fraction PGD-CE cannot move them
ZERO_GRADIENT_MAX = 0.10
# the counting checks (huge_eps, square_beats_gradients, zero_gradients) also need at least
# this many images: on a weak model evaluated on few images, two or three images stuck in a
# dead-ReLU region are noise, not masking (a masked model trips them by the hundred)
MIN_IMAGES = 5
# the validation accuracy recomputed from a checkpoint may differ from the one the training
# process recorded by at most this many images (other thread count or GPU kernels)
CURVE_TOLERANCE_IMAGES = 2
CURVE_TOLERANCE_FRACTION = 0.01

# AutoAttack's messages: the level each kind gets (the rest are notes). Its zero-gradient
# and Square messages fire on a single image, so on honest models too: they stay notes, and
# the calibrated `zero_gradients` and `square_beats_gradients` checks decide.
AA_LEVELS = {"aa_randomized": "masking", "aa_softmax_output": "masking",
             "aa_dynamic": "masking", "aa_bound": "integrity", "aa_recheck": "integrity"}
LEVELS = ("masking", "integrity", "health", "note")


def flag(check: str, level: str, message: str) -> dict:
    return {"check": check, "level": level, "message": message}


def near_chance_flag(clean: float, num_classes: int) -> list[dict]:
    if clean <= 1 / num_classes + NEAR_CHANCE_MARGIN:
        return [flag("near_chance", "health", (
            f"clean accuracy {clean:.3f} is within {NEAR_CHANCE_MARGIN:.2f} of chance "
            f"(1/{num_classes}): the model did not learn, so its robust accuracy and "
            "best-to-last gap say nothing about robust overfitting"))]
    return []


def autoattack_flags(result: AutoAttackResult | None) -> list[dict]:
    """AutoAttack's own messages, each distinct message once, each under its own name."""
    if result is None:
        return []
    return [flag(kind, AA_LEVELS.get(kind, "note"), message)
            for message in dict.fromkeys(result.warnings)
            for kind in (classify_warning(message),)]


def zero_gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           batch_size: int = 500) -> tuple[int, int]:
    """(images with an all-zero CE input gradient, correctly classified images)."""
    zero = correct = 0
    for i in range(0, len(y), batch_size):
        xb = x[i:i + batch_size].detach().clone().requires_grad_(True)
        yb = y[i:i + batch_size]
        with torch.enable_grad():
            logits = model(xb)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), yb, reduction="sum"),
                                          xb)
        right = logits.argmax(1) == yb
        zero += int((right & (grad.flatten(1).abs().sum(1) == 0)).sum())
        correct += int(right.sum())
    return zero, correct


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
             steps: int, seed: int) -> torch.Tensor:
    """Per image: still classified correctly after PGD (CE) at radius `eps`."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    x_adv = pgd(model, x, y, eps=eps, step_size=step, steps=steps, generator=gen)
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step: float,
              steps: int, seed: int) -> float:
    return float(_correct(model, x, y, eps, step, steps, seed).float().mean()) if len(y) else 0.0


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            per_image: dict[str, torch.Tensor], metrics: dict, suite: Suite, seed: int,
            aa: AutoAttackResult | None) -> dict:
    """What the masking checks read, measured on the attack subset (x, y); stored in the
    record (`sanity`), so the flags can be re-derived if a threshold changes."""
    e, eps = suite.eval, suite.train.eps
    n = len(y)
    xs, ys = x[:SANITY_IMAGES], y[:SANITY_IMAGES]
    out: dict = {"n": n, "n_sanity": len(ys)}
    if not e.sanity_checks or n == 0:
        return out
    huge = _correct(model, xs, ys, HUGE_EPS, HUGE_EPS / 4, 10, seed)
    out["huge_eps_accuracy"] = float(huge.float().mean())
    # the eps-ball lies inside the huge one: an image some attack broke at eps is not robust
    # at HUGE_EPS either, whatever PGD-10's large steps found there (on a rugged loss surface
    # they can do worse than the small ones); what counts is what survives both
    survived = huge.clone()
    for robust in per_image.values():
        survived &= robust[:len(ys)].to(survived.device)
    out["huge_eps_survivors"] = float(survived.float().mean())
    out["pgd20_on_sanity"] = float(per_image["pgd20"][:len(ys)].float().mean())
    out["more_steps_accuracy"] = _accuracy(model, xs, ys, eps, e.pgd_step_ratio * eps / 2,
                                           e.pgd_steps * 5, seed + 2)
    out["pgd20_on_subset"] = float(per_image["pgd20"][:n].float().mean())
    out["autoattack"] = aa.robust_accuracy if aa is not None else None
    out["square_only"] = metrics.get("square_only")
    zero, correct = zero_gradient_fraction(model, x, y, e.batch_size)
    out["zero_gradient_images"], out["correct_images"] = zero, correct
    return out


def flags_from(m: dict, suite: Suite) -> list[dict]:
    """The masking flags that the measurements `m` (from `measure`) fire."""
    e = suite.eval
    flags = []
    if "huge_eps_survivors" not in m:
        return flags
    if (m["huge_eps_survivors"] > HUGE_EPS_MAX_ACC
            and round(m["huge_eps_survivors"] * m["n_sanity"]) >= MIN_IMAGES):
        flags.append(flag("huge_eps", "masking", (
            f"{m['huge_eps_survivors']:.3f} of {m['n_sanity']} images survive PGD-10 at eps "
            f"{HUGE_EPS} and every attack at the suite's eps (expected <= {HUGE_EPS_MAX_ACC}): "
            "gradients may be masked")))
    few, many, k = m["pgd20_on_sanity"], m["more_steps_accuracy"], m["n_sanity"]
    noise = 2 * math.sqrt(max(few * (1 - few), 1 / k) / k)
    if many > few + MORE_STEPS_SLACK + noise:
        # PGD is unstable on this model; where AutoAttack ran, the ranked worst case does
        # not rest on PGD alone (health), elsewhere it does (masking)
        counted = m["autoattack"] is not None
        flags.append(flag("more_steps", "health" if counted else "masking", (
            f"PGD-{e.pgd_steps * 5} accuracy {many:.3f} is above PGD-{e.pgd_steps} {few:.3f} "
            f"on {k} images by more than {MORE_STEPS_SLACK:.2f} + noise {noise:.3f}: "
            "the attack does not converge" + ("; the ranked worst case counts AutoAttack"
                                              if counted else ""))))
    if m["autoattack"] is not None and m["pgd20_on_subset"] - m["autoattack"] > AA_GAP_FLAG:
        # health, not masking: AutoAttack already caught what PGD-20 missed, and the ranked
        # worst case counts AutoAttack; only the PGD-20 columns overstate robustness (a
        # catastrophically overfitted single-step model does this honestly)
        flags.append(flag("aa_pgd_gap", "health", (
            f"PGD-20 {m['pgd20_on_subset']:.3f} exceeds AutoAttack {m['autoattack']:.3f} on "
            f"the same {m['n']} images by more than {AA_GAP_FLAG:.2f}: PGD-20 is fooled "
            "(masked gradients); its columns overstate robustness, the ranked worst case "
            "counts AutoAttack")))
    if (m["square_only"] is not None and m["square_only"] > SQUARE_ONLY_MAX
            and round(m["square_only"] * m["n"]) >= MIN_IMAGES):
        flags.append(flag("square_beats_gradients", "masking", (
            f"gradient-free Square broke {m['square_only']:.3f} of the {m['n']} images that "
            f"every gradient attack missed (allowed {SQUARE_ONLY_MAX:.2f}): the gradients "
            "are not to be trusted")))
    zero, correct = m["zero_gradient_images"], m["correct_images"]
    if correct and zero / correct > ZERO_GRADIENT_MAX and zero >= MIN_IMAGES:
        flags.append(flag("zero_gradients", "masking", (
            f"{zero} of {correct} correctly classified images have an all-zero cross-entropy "
            f"input gradient in fp32 (allowed {ZERO_GRADIENT_MAX:.0%}): a saturated softmax "
            "hides them from gradient attacks")))
    return flags


def curve_flags(check: dict) -> list[dict]:
    """`curve_mismatch` when the validation accuracy recomputed from a checkpoint differs
    from the one recorded by the training process."""
    recorded, recomputed, n = check["recorded"], check["recomputed"], max(1, check["n"])
    tolerance = max(CURVE_TOLERANCE_IMAGES / n, CURVE_TOLERANCE_FRACTION) + 1e-9
    if recorded is None or abs(float(recorded) - recomputed) > tolerance:
        return [flag("curve_mismatch", "integrity", (
            f"validation PGD accuracy at epoch {check['epoch']}: the training process recorded "
            f"{recorded}, the checkpoint gives {recomputed:.4f} (tolerance {tolerance:.3f}): "
            "the curve that chose the best checkpoint does not come from these weights"))]
    return []
