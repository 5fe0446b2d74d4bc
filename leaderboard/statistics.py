"""Uncertainty of the leaderboard's numbers: t intervals over seeds, paired bootstrap
differences to the suite's base row, and rank ranges.

* `t_interval`: the 95% confidence interval of a mean over seeds, mean ± t(0.975, n−1) ·
  s / √n (Student's t with n − 1 degrees of freedom, s the sample standard deviation);
  none below 2 seeds. The t quantile comes from the closed form of Student's t CDF for an
  integer number of degrees of freedom (Abramowitz & Stegun 26.7.3/4), inverted by
  bisection, so no scipy is needed.
* `paired_bootstrap`: a row's difference to the base row, paired by seed (only the seeds
  both rows ran) and by test image within a seed. Each resample draws the seeds with
  replacement, then, within each drawn seed, its test images with replacement; the same
  images for both rows. The statistic is the mean over the drawn seeds of the mean
  per-image difference. The 95% interval is the 2.5th and 97.5th percentile of
  `RESAMPLES` resamples drawn from a numpy generator seeded with `BOOTSTRAP_SEED`, so a
  board compiled twice is the same. Drawing images with replacement only matters through
  how many of each per-image difference value are drawn, so each seed's resample is one
  multinomial draw over those values (exact, and fast for any number of images).
* `rank_ranges`: the ranks a ranked row could take given its interval: from 1 + the rows
  whose interval lies wholly above its own to the rows whose interval is not wholly below
  its own (itself included). Rows whose intervals overlap thus share a range ("2–4").

numpy only; nothing here imports torch, `bench` or `defenses`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from leaderboard.schema import decode_per_image

LEVEL = 0.95
RESAMPLES = 4000
BOOTSTRAP_SEED = 20240611


# ------------------------------------------------------------------------ t interval

def t_cdf_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's T with integer `df` >= 1 degrees of freedom (A&S 26.7.3/4)."""
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        if df == 1:
            return 2 * theta / math.pi
        term, total = c, c
        for k in range(1, (df - 3) // 2 + 1):  # 2·4···2k / (3·5···(2k+1)) · cos^(2k+1)
            term *= (2 * k) / (2 * k + 1) * c * c
            total += term
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):  # 1·3···(2k−1) / (2·4···2k) · cos^(2k)
        term *= (2 * k - 1) / (2 * k) * c * c
        total += term
    return s * total


@functools.cache
def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided `level` critical value of Student's t, t((1 + level) / 2, df)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < level:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_two_sided(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The `level` t interval of the mean of the non-NaN `values`; (NaN, NaN) below 2."""
    vals = [float(v) for v in values if not math.isnan(v)]
    n = len(vals)
    if n < 2:
        return math.nan, math.nan
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(n - 1, level) * std / math.sqrt(n)
    return mean - half, mean + half


# ----------------------------------------------------------------- per-image results

def worst_case_bits(rec: dict, ckpt: str, model: str = "model") -> np.ndarray:
    """Per test image of the attack subset: robust to every attack (the worst case), as the
    record's schema defines it (the AND of every stored attack on the first images)."""
    m = rec["metrics"][model][ckpt]
    n_sub = m["n_worst_case"]
    worst = np.ones(n_sub, dtype=bool)
    for flags in decode_per_image(m, rec["per_image"][model][ckpt],
                                  f"per_image[{model!r}][{ckpt!r}]").values():
        worst &= np.array(flags[:n_sub], dtype=bool)
    return worst


def per_image(rec: dict, metric: str) -> np.ndarray:
    """Per test image, as integers: `worst_case_last` (0/1) or `gap_worst_case` (best −
    last, −1/0/1), whose mean is the record's value of that metric."""
    last = worst_case_bits(rec, "last").astype(np.int64)
    if metric == "worst_case_last":
        return last
    if metric == "gap_worst_case":
        return worst_case_bits(rec, "best").astype(np.int64) - last
    raise ValueError(f"no per-image form of {metric!r}")


# ------------------------------------------------------------------ paired bootstrap

def paired_bootstrap(diffs: Sequence[np.ndarray], resamples: int = RESAMPLES,
                     seed: int = BOOTSTRAP_SEED,
                     level: float = LEVEL) -> tuple[float, float, float]:
    """(mean difference, interval low, interval high) of per-image differences, one integer
    array per paired seed (see the module docstring). NaNs when there is no seed."""
    if not diffs or any(len(d) == 0 for d in diffs):
        return math.nan, math.nan, math.nan
    support = np.unique(np.concatenate(diffs))
    # per seed: the share of its images with each difference value
    probs = np.stack([np.array([np.mean(d == v) for v in support]) for d in diffs])
    sizes = np.array([len(d) for d in diffs])
    point = float(np.mean([d.mean() for d in diffs]))
    rng = np.random.default_rng(seed)
    n_seeds = len(diffs)
    drawn = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    counts = np.empty((resamples, n_seeds, len(support)), dtype=np.int64)
    for s in range(n_seeds):  # one multinomial per seed size and distribution
        picked = drawn == s
        counts[picked] = rng.multinomial(sizes[s], probs[s], size=int(picked.sum()))
    means = (counts @ support) / sizes[drawn]  # (resamples, seeds) per-seed image means
    stats = means.mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return point, float(low), float(high)


def paired_difference(row_records: list[dict], base_records: list[dict],
                      metric: str) -> dict:
    """The row's difference to the base row in `metric` (see `per_image`), paired by seed
    and image: {"diff", "low", "high", "seeds"} (NaNs and 0 seeds when none is shared)."""
    base = {r["spec"]["seed"]: r for r in base_records}
    diffs = []
    seeds = []
    for rec in sorted(row_records, key=lambda r: r["spec"]["seed"]):
        other = base.get(rec["spec"]["seed"])
        if other is None:
            continue
        a, b = per_image(rec, metric), per_image(other, metric)
        if len(a) != len(b):  # not the same test images: cannot be paired
            continue
        diffs.append(a - b)
        seeds.append(rec["spec"]["seed"])
    diff, low, high = paired_bootstrap(diffs)
    return {"diff": diff, "low": low, "high": high, "seeds": len(seeds)}


def resolved(low: float, high: float) -> bool:
    """The interval excludes 0."""
    return not (math.isnan(low) or math.isnan(high)) and (low > 0 or high < 0)


# ------------------------------------------------------------------------ rank ranges

def rank_ranges(intervals: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """(best rank, worst rank) of each ranked row given its (low, high) interval of the
    ranked metric (higher is better). A row without an interval (NaN: fewer than 2 seeds)
    is not known to be above or below any other, so it spans every rank and widens theirs."""
    n = len(intervals)
    out = []
    for i, (lo, hi) in enumerate(intervals):
        if math.isnan(lo) or math.isnan(hi):
            out.append((1, n))
            continue
        above = below = 0
        for j, (lo2, hi2) in enumerate(intervals):
            if j == i or math.isnan(lo2) or math.isnan(hi2):
                continue
            above += lo2 > hi
            below += hi2 < lo
        out.append((1 + above, n - below))
    return out
