"""Leaderboard statistics against hand-derived answers: t intervals over seeds, the paired
bootstrap difference to the base row (by seed and by test image), rank ranges, and how the
board shows them."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_leaderboard import AWP, board, make_record, md_lines, tables, write

from leaderboard.schema import pack_bits, unpack_bits
from leaderboard.statistics import (
    paired_bootstrap,
    paired_difference,
    per_image,
    rank_ranges,
    resolved,
    t_interval,
    t_quantile,
)

# t(0.975, df) from printed tables of Student's t
T_TABLE = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 30: 2.0423}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_printed_tables(df: int) -> None:
    assert t_quantile(df) == pytest.approx(T_TABLE[df], abs=5e-5)


def test_t_quantile_matches_scipy_for_every_small_df() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 41):
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)


def test_t_interval_by_hand() -> None:
    # 0.40, 0.42, 0.44: mean 0.42, s = 0.02, half width 4.3027 * 0.02 / sqrt(3) = 0.049683
    low, high = t_interval([0.40, 0.42, 0.44])
    assert (low, high) == pytest.approx((0.370317, 0.469683), abs=1e-6)
    # NaNs are left out; below two values there is no interval
    assert t_interval([0.40, math.nan, 0.44]) == pytest.approx(
        (0.42 - 12.7062 * math.sqrt(0.0008) / math.sqrt(2),
         0.42 + 12.7062 * math.sqrt(0.0008) / math.sqrt(2)), abs=1e-5)
    assert all(math.isnan(v) for v in t_interval([0.5]))
    assert all(math.isnan(v) for v in t_interval([]))


# ------------------------------------------------------------------ paired bootstrap

def test_identical_per_image_results_give_exactly_zero() -> None:
    diffs = [np.zeros(100, dtype=np.int64) for _ in range(3)]
    assert paired_bootstrap(diffs) == (0.0, 0.0, 0.0)
    assert not resolved(0.0, 0.0)


def test_better_on_every_image_of_every_seed_is_resolved() -> None:
    rng = np.random.default_rng(0)
    diffs = [(rng.random(200) < p).astype(np.int64) for p in (0.05, 0.10, 0.08)]  # never < 0
    diff, low, high = paired_bootstrap(diffs)
    assert diff == pytest.approx(np.mean([d.mean() for d in diffs]))
    assert 0 < low <= diff <= high and resolved(low, high)


def test_one_seed_is_a_bootstrap_over_images() -> None:
    """One seed, half of 400 images +1: the mean of 400 draws has sd sqrt(.25 / 400) =
    0.025, so the 95% interval is about 0.5 ± 1.96 * 0.025 = [0.451, 0.549]."""
    d = np.array([1, 0] * 200, dtype=np.int64)
    diff, low, high = paired_bootstrap([d])
    assert diff == 0.5
    assert low == pytest.approx(0.451, abs=0.006) and high == pytest.approx(0.549, abs=0.006)


def test_the_seeds_are_resampled_too() -> None:
    """Seed A: every image +1; seed B: every image 0. The images add no noise, so the
    resampled means are those of two seeds drawn with replacement: 1, 0.5 or 0 with
    chances 1/4, 1/2, 1/4; the 2.5th and 97.5th percentiles are 0 and 1."""
    diffs = [np.ones(50, dtype=np.int64), np.zeros(50, dtype=np.int64)]
    diff, low, high = paired_bootstrap(diffs)
    assert (diff, low, high) == (0.5, 0.0, 1.0)


def test_the_bootstrap_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    diffs = [rng.integers(-1, 2, size=150) for _ in range(3)]
    first = paired_bootstrap(diffs)
    assert paired_bootstrap([d.copy() for d in diffs]) == first
    assert paired_bootstrap(diffs, seed=7) != first  # the fixed seed is what fixes it


def reversed_bits(rec: dict) -> dict:
    """The record with every per-image result reversed: the same fractions on other images."""
    out = copy.deepcopy(rec)
    for ckpt, bits in out["per_image"]["model"].items():
        m = out["metrics"]["model"][ckpt]
        for attack, text in bits.items():
            n = m["n"] if attack in ("clean", "pgd20", "cw20") else m["n_worst_case"]
            bits[attack] = pack_bits(unpack_bits(text, n)[::-1])
    return out


def test_per_image_worst_case_agrees_with_the_record() -> None:
    rec = make_record(aa_last=0.4, wc_last=0.3, wc_best=0.35)
    assert per_image(rec, "worst_case_last").mean() == pytest.approx(0.3)
    assert per_image(rec, "gap_worst_case").mean() == pytest.approx(0.05)
    assert per_image(reversed_bits(rec), "worst_case_last")[-30:].all()


def test_pairing_is_by_image_and_by_seed() -> None:
    base = [make_record(seed=s, wc_last=0.3) for s in (0, 1)]
    # the same numbers on the same images: no difference, interval [0, 0]
    same = paired_difference([copy.deepcopy(r) for r in base], base, "worst_case_last")
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "seeds": 2}
    # the same fraction on other images: the mean difference is 0, but images disagree
    other = paired_difference([reversed_bits(r) for r in base], base, "worst_case_last")
    assert other["diff"] == 0.0 and other["low"] < 0 < other["high"]
    # a seed the base row lacks is not paired (seed 2 would add a huge difference)
    row = [make_record(seed=s, wc_last=w) for s, w in ((0, 0.35), (1, 0.37), (2, 0.0))]
    d = paired_difference(row, base, "worst_case_last")
    assert d["seeds"] == 2 and d["diff"] == pytest.approx(0.06)
    # better on every image of every seed (prefix bits: a superset of the base's images)
    assert d["low"] > 0 and resolved(d["low"], d["high"])


# ------------------------------------------------------------------------ rank ranges

def test_rank_ranges_by_hand() -> None:
    intervals = [(0.50, 0.60), (0.45, 0.55), (0.10, 0.20), (math.nan, math.nan)]
    # row 0: nothing wholly above; row 2 wholly below -> 1..3 (row 3 is unknown)
    # row 2: rows 0 and 1 wholly above -> 3..4; row 3 (one seed) spans every rank
    assert rank_ranges(intervals) == [(1, 3), (1, 3), (3, 4), (1, 4)]
    assert rank_ranges([(0.5, 0.6), (0.1, 0.2)]) == [(1, 1), (2, 2)]


# ------------------------------------------------------------------------- the board

@pytest.fixture
def results(tmp_path: Path) -> Path:
    """AT (the base) and AT+AWP, 3 seeds each; AT+AWP better on every image of every seed
    (prefix bits), by 5, 3 and 4 points; AT+CURE identical to AT."""
    res = tmp_path / "results"
    for seed, (at, awp) in enumerate([(0.30, 0.35), (0.32, 0.35), (0.31, 0.35)]):
        write(res, make_record(seed=seed, wc_last=at, wc_best=0.40))
        write(res, make_record("AT+AWP", defenses=AWP, seed=seed, wc_last=awp, wc_best=0.40))
        write(res, make_record("AT+CURE", defenses=[{"name": "cure", "params": {}}],
                               seed=seed, wc_last=at, wc_best=0.40))
    return res


def test_board_columns_marks_and_legend(results: Path, tmp_path: Path) -> None:
    t = tables(results)["quick"].set_index("row")
    awp, cure, at = t.loc["AT+AWP"], t.loc["AT+CURE"], t.loc["AT"]
    assert awp["vs_base"] == "AT" and awp["vs_base_seeds"] == 3
    assert awp["worst_case_last_vs_base"] == pytest.approx(0.04)
    assert awp["gap_worst_case_vs_base"] == pytest.approx(-0.04)  # same best, higher last
    assert bool(awp["worst_case_last_vs_base_resolved"])
    assert bool(awp["gap_worst_case_vs_base_resolved"])
    assert awp["worst_case_last_vs_base_ci_low"] > 0 > awp["gap_worst_case_vs_base_ci_high"]
    assert (cure["worst_case_last_vs_base"], cure["worst_case_last_vs_base_ci_low"],
            cure["worst_case_last_vs_base_ci_high"]) == (0.0, 0.0, 0.0)
    assert not bool(cure["worst_case_last_vs_base_resolved"])
    # the base row's own difference is absent
    assert math.isnan(at["worst_case_last_vs_base"]) and at["vs_base_seeds"] == 0
    # t interval of AT's last worst case: 0.31 ± 4.3027 * 0.01 / sqrt(3)
    assert (at["worst_case_last_ci_low"], at["worst_case_last_ci_high"]) == pytest.approx(
        (0.31 - 0.024842, 0.31 + 0.024842), abs=1e-6)
    # AT+AWP [35, 35] lies wholly above AT and AT+CURE [28.52, 33.48]: rank 1; they tie
    assert awp["rank_range"] == "1" and at["rank_range"] == cure["rank_range"] == "2–3"
    md = board(results, tmp_path / "out")
    lines = md_lines(md)
    assert lines["AT+AWP"].startswith("| 1 | AT+AWP |")
    assert lines["AT+CURE"].startswith("| 2–3 | AT+CURE |")
    assert lines["AT"].startswith("| 2–3 | AT |")
    assert "| 31.00 ± 1.00 [28.52, 33.48] |" in lines["AT"]
    assert "| +4.00 [+" in lines["AT+AWP"] and "] ✓ |" in lines["AT+AWP"]
    assert "| +0.00 [+0.00, +0.00] |" in lines["AT+CURE"]
    assert "| (base) | (base) |" in lines["AT"]
    assert "Student t interval" in md and "paired bootstrap" in md and "4000 resamples" in md
    # the same numbers land in the CSV and JSON, and compiling again gives the same board
    doc = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    row = next(r for r in doc["rows"] if r["row"] == "AT+AWP")
    assert row["worst_case_last_vs_base_resolved"] is True and row["rank_range"] == "1"
    assert row["worst_case_last_vs_base_ci_low"] == awp["worst_case_last_vs_base_ci_low"]
    csv = (tmp_path / "out" / "leaderboard.csv").read_text()
    assert "worst_case_last_vs_base_ci_low" in csv.splitlines()[0]
    assert board(results, tmp_path / "again") == md
