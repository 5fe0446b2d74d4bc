"""Leaderboard tables -> LaTeX for papers: one booktabs table per suite key (`leaderboard.tex`).

Each table has one row per row of the suite's table (the CSV's rows, in the same order):
rank (or the range of ranks its interval allows), row, clean accuracy at the last
checkpoint, PGD-20 and the worst case over attacks at best and last with their gaps, the
paired differences to the base row, and the seeds. A mean is shown with the half width of
its 95% t interval over seeds; a difference with its paired bootstrap interval
(`leaderboard.statistics`). Every text (row labels, suite names, the caption) is escaped;
the marks the Markdown table uses become standard LaTeX symbols. The file needs
`\\usepackage{booktabs}` and nothing else.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from leaderboard.markdown import base_names, is_base_row, missing
from leaderboard.statistics import BOOTSTRAP_SEED, RESAMPLES
from leaderboard.tables import PAIRED_METRICS

# LaTeX's special characters, then the symbols of the Markdown board
ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}",
    "–": "--", "—": "---", "↳": r"$\hookrightarrow$", "†": r"\dag{}", "⚑": r"$\otimes$",
    "○": r"$\circ$", "⚠": r"$(!)$", "×": r"$\times$", "±": r"$\pm$", "Δ": r"$\Delta$",
    "✓": r"$^{*}$", "→": r"$\to$", "−": r"$-$", "√": r"$\surd$", "≥": r"$\geq$",
    "≤": r"$\leq$", "·": r"$\cdot$",
}
_PATTERN = re.compile("|".join(re.escape(c) for c in ESCAPES))

# (header, value column): mean ± t half width
VALUE_COLUMNS = (("Clean last", "clean_last"), ("PGD-20 best", "pgd20_best"),
                 ("PGD-20 last", "pgd20_last"), ("Gap PGD-20", "gap_pgd20"),
                 ("WC best", "worst_case_best"), ("WC last", "worst_case_last"),
                 ("Gap WC", "gap_worst_case"))
DELTA_HEADERS = {"worst_case_last": "WC last", "gap_worst_case": "Gap WC"}


def escape(text: Any) -> str:
    """`text` as LaTeX source that prints it: specials escaped, the board's marks as symbols."""
    return _PATTERN.sub(lambda m: ESCAPES[m.group(0)], str(text))




def value_cell(row: pd.Series, col: str) -> str:
    """'$42.00 \\pm 4.97$' (mean ± half width of the 95% t interval, in %), '$42.00$'
    with one seed, '--' when not measured; '(k/n)' when only k of n seeds had it."""
    mean = row[f"{col}_mean"]
    if missing(mean):
        return "--"
    low, high = row[f"{col}_ci_low"], row[f"{col}_ci_high"]
    text = f"${100 * mean:.2f}"
    if not (missing(low) or missing(high)):
        text += rf" \pm {100 * (high - low) / 2:.2f}"
    text += "$"
    k, n = row[f"{col}_n"], row["n_seeds"]
    if not missing(k) and not missing(n) and int(k) < int(n):
        text += f" ({int(k)}/{int(n)})"
    return text


def delta_cell(row: pd.Series, metric: str) -> str:
    """'$+4.00$ {\\scriptsize$[+1.50, +7.50]$}$^{*}$', '(base)' or '--'."""
    if is_base_row(row):
        return "(base)"
    diff = row.get(f"{metric}_vs_base")
    if missing(diff):
        return "--"
    low, high = row[f"{metric}_vs_base_ci_low"], row[f"{metric}_vs_base_ci_high"]
    text = f"${100 * diff:+.2f}$ {{\\scriptsize$[{100 * low:+.2f}, {100 * high:+.2f}]$}}"
    flag = row[f"{metric}_vs_base_resolved"]
    return text + (r"$^{*}$" if not missing(flag) and bool(flag) else "")


def rank_cell(row: pd.Series) -> str:
    rank = "" if missing(row["rank"]) else str(row["rank_range"] or int(row["rank"]))
    return escape(" ".join(p for p in (rank, str(row["marks"] or "")) if p))


def _label(key: str) -> str:
    return "tab:robench-" + re.sub(r"[^A-Za-z0-9.-]+", "-", key)


def caption(meta: dict, base: str) -> str:
    """What the table shows and how its intervals are computed (escaped)."""
    n_seeds = len(meta.get("seeds") or [])
    text = (
        f"ROBench suite {meta.get('key', meta.get('name', '?'))} (protocol "
        f"{str(meta.get('hash', ''))[:12]}, {n_seeds} seeds). Robust accuracy in %, mean over "
        "seeds ± the half width of its 95% Student t interval (t(0.975, n−1) · s / √n); "
        "best = checkpoint with the highest validation PGD accuracy, last = final epoch, "
        "gap = best − last; WC = worst case over all attacks (an image counts only if "
        "every attack failed on it), the ranking metric. # = rank by mean last WC; a–b = "
        "the ranks its t interval allows (overlapping intervals tie). "
        f"Δ vs {base}: difference to the base row {base} in points, paired by seed and "
        f"test image, with its 95% paired bootstrap interval ({RESAMPLES} resamples of "
        "seeds, then of images within each seed; 2.5th–97.5th percentile; seed "
        f"{BOOTSTRAP_SEED}); ✓ = resolved (the interval excludes 0). ⚑ = not ranked "
        "(masking or integrity check); † = a health check fired; ↳ = an extra model of "
        "the row above, not ranked; ○ = seeds the suite does not ask for, not ranked; "
        "⚠ = fewer seeds than the suite asks for.")
    return escape(text)


def suite_latex(table: pd.DataFrame) -> str:
    """One booktabs table environment for one suite key."""
    meta = table.attrs
    base = base_names(table)[1]  # the paired differences' base row
    headers = (["\\#", "Row"] + [escape(h) for h, _ in VALUE_COLUMNS]
               + [f"$\\Delta$ {escape(DELTA_HEADERS[m])} vs {escape(base)}"
                  for m in PAIRED_METRICS] + ["Seeds"])
    lines = [r"\begin{table}[t]", r"\centering", r"\scriptsize",
             f"\\caption{{{caption(meta, base)}}}",
             f"\\label{{{_label(str(meta.get('key', 'suite')))}}}",
             r"\begin{tabular}{@{}rl" + "r" * (len(headers) - 2) + "@{}}",
             r"\toprule", " & ".join(headers) + r" \\", r"\midrule"]
    for _, row in table.iterrows():
        cells = [rank_cell(row), escape(row["row"])]
        cells += [value_cell(row, col) for _, col in VALUE_COLUMNS]
        cells += [delta_cell(row, m) for m in PAIRED_METRICS]
        cells += [escape(row["seeds"])]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines)


def render_latex(tables: dict[str, pd.DataFrame], source: str = "") -> str:
    """The whole `leaderboard.tex`: a comment on what it needs, then one table per suite."""
    head = ["% ROBench leaderboard: one booktabs table per suite"
            + (f", compiled from {' '.join(source.split())}" if source else "") + ".",
            "% Needs \\usepackage{booktabs} in the preamble (the symbols are standard LaTeX);",
            "% \\input{leaderboard.tex} or paste the table you want.", ""]
    return "\n".join(head + [suite_latex(t) + "\n" for t in tables.values()])
