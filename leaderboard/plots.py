"""Robust-overfitting curves: mean train/validation robust accuracy per row, one PNG per suite.

Only the trained model has curves (the record's `history` is the training run's), and only
the official rows are drawn: the runs with seeds the suite does not ask for stay out, as
they stay out of the table's ranked rows."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from leaderboard.grouping import SuiteGroup, buckets


def _mean_curves(records: list[dict]) -> pd.DataFrame | None:
    """Per-epoch mean over seeds of train_robust and val_robust (and val_fgsm, the
    single-step suites' FGSM curve, where every run has it); None when no run has curves."""
    frames = []
    for rec in records:
        curves = (rec.get("history") or {}).get("curves") or {}
        epochs = curves.get("epoch") or []
        cols = {k: curves.get(k) or [] for k in ("train_robust", "val_robust")}
        if not epochs or not all(len(v) == len(epochs) for v in cols.values()):
            continue
        if len(curves.get("val_fgsm") or []) == len(epochs):
            cols["val_fgsm"] = curves["val_fgsm"]
        frame = pd.DataFrame({"epoch": epochs, **cols})
        frames.append(frame.apply(pd.to_numeric, errors="coerce"))
    if not frames:
        return None
    merged = pd.concat(frames)
    if "val_fgsm" in merged and merged["val_fgsm"].isna().any():
        merged = merged.drop(columns="val_fgsm")  # only some runs have it: draw none
    return merged.groupby("epoch").mean().sort_index()


def curve_rows(group: SuiteGroup) -> dict[str, list[dict]]:
    """Row label -> records whose curves are drawn: the official rows only (the curves
    are the trained model's; extra models have none)."""
    return {b.row: b.records for b in buckets(group) if b.official}


def curves_file(key: str) -> str:
    """The file name of suite key `key`'s curves PNG."""
    return f"curves_{re.sub(r'[^A-Za-z0-9._-]+', '_', key)}.png"


def plot_groups(groups: dict[str, SuiteGroup], out_dir: str | Path) -> list[Path]:
    """Write `curves_<suite key>.png` for each suite key with curves; return the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, group in groups.items():
        by_row = curve_rows(group)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = 0
        for label in sorted(by_row):
            curves = _mean_curves(by_row[label])
            if curves is None:
                continue
            (line,) = ax.plot(curves.index, 100 * curves["val_robust"], label=f"{label} (val)")
            ax.plot(curves.index, 100 * curves["train_robust"], linestyle="--",
                    color=line.get_color(), label=f"{label} (train)")
            if "val_fgsm" in curves:
                ax.plot(curves.index, 100 * curves["val_fgsm"], linestyle=":",
                        color=line.get_color(), label=f"{label} (val FGSM)")
            drawn += 1
        if drawn:
            ax.set(xlabel="epoch", ylabel="robust accuracy (%)",
                   title=f"{key}: train (dashed) vs validation robust accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            path = out / curves_file(key)
            fig.savefig(path, dpi=110)
            paths.append(path)
        plt.close(fig)
    return paths
