"""Leaderboard tables -> Markdown (own small formatter: no `tabulate` needed)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

DASH = "–"

LEGEND = (
    "*best*: the checkpoint with the highest PGD robust accuracy on the held-out validation "
    "split (never the test set); *last*: the checkpoint after the final epoch. Accuracies in %, "
    "mean ± sample standard deviation over seeds (no ± with a single seed); – = not measured. "
    "*gap* = best − last per seed, averaged: the size of robust overfitting. "
    "*seeds*: seeds run / seeds the suite asks for (⚠ = incomplete). "
    "*cost vs BASE*: mean training seconds per epoch relative to the suite's plain base row "
    "(PGD-AT, the `AT` row, where the suite has one; otherwise the first of TRADES, FGSM-RS, "
    "N-FGSM and standard training that it has) (process CPU seconds when every run of the "
    "suite recorded them, as CPU runs do, so that other jobs on the machine do not distort "
    "the ratio; wall seconds otherwise), any extra pretraining (a clean model a warm start "
    "needs) included, its seconds spread over the run's epochs; *passes vs BASE*: forward + "
    "backward passes relative to the base row, extra pretraining included. *extra "
    "pretraining*: what a row trained besides its own run, with its mean seconds (charged "
    "in full to every row that uses it). "
    "*flags*: sanity checks that fired on some seed or checkpoint. "
    "Rows are sorted by last-checkpoint AutoAttack (PGD-20 where AutoAttack was not run)."
)
CO_LEGEND = (
    "*CO*: catastrophic overfitting, seeds flagged / seeds checked and the earliest flagged "
    "epoch (– = none): validation PGD accuracy collapsed (below 5%, or more than 20 points "
    "below its running maximum) while FGSM accuracy stayed high (at least its value at the "
    "PGD peak minus 10 points, and 20 points above PGD); see `bench/overfitting.py`."
)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def pct(mean: Any, std: Any = None) -> str:
    """Fractions as percentages with 2 decimals: '48.00 ± 1.23', '48.00', or '–'."""
    if _missing(mean):
        return DASH
    return f"{100 * mean:.2f}" if _missing(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def ratio(value: Any) -> str:
    """A cost ratio such as '1.52×', or '–'."""
    return DASH if _missing(value) else f"{value:.2f}×"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table; '|' inside cells is escaped."""
    def line(cells: list[str]) -> str:
        clean = (str(c).replace("|", "\\|").replace("\n", " ") for c in cells)
        return "| " + " | ".join(clean) + " |"
    return "\n".join([line(headers), "| " + " | ".join("---" for _ in headers) + " |"]
                     + [line(r) for r in rows])


def _best_epoch(row: pd.Series) -> str:
    if _missing(row["best_epoch_mean"]):
        return DASH
    text = f"{row['best_epoch_mean']:.1f}"
    return text if _missing(row["epochs"]) else f"{text} / {int(row['epochs'])}"


def co_cell(row: pd.Series) -> str:
    """'2/3 @ep 12' (seeds flagged / seeds checked, earliest epoch), or '–' when none."""
    if _missing(row["co_seeds"]) or int(row["co_seeds"]) == 0:
        return DASH
    epoch = "" if _missing(row["co_epoch_min"]) else f" @ep {int(row['co_epoch_min'])}"
    return f"{int(row['co_seeds'])}/{int(row['co_checked'])}{epoch}"


def suite_markdown(table: pd.DataFrame) -> str:
    """One suite's section: heading, protocol line, table, legend, defense cards."""
    meta = table.attrs
    out = [f"## {meta.get('key', meta.get('name', '?'))}", ""]
    if meta.get("description"):
        out += [str(meta["description"]).strip(), ""]
    seeds = meta.get("seeds") or []
    out += [f"Suite `{meta.get('name')}`, protocol hash `{str(meta.get('hash', ''))[:12]}`, "
            f"seeds expected: {', '.join(map(str, seeds)) or 'none listed'} ({len(seeds)}); "
            f"{meta.get('n_records', 0)} run record(s).", ""]
    if not meta.get("current", True):
        out += [f"> Older version of suite `{meta.get('name')}`: these runs used a different "
                "suite file and are not comparable with the current table.", ""]
    extra = bool(table["extra_pretraining"].astype(str).str.len().gt(0).any())
    co = "co_seeds" in table.columns
    bases = [b for b in table["cost_base"].astype(str).unique() if b]
    base = bases[0] if bases else "AT"
    headers = ["#", "row", "clean best", "clean last", "PGD-20 best", "PGD-20 last",
               "AutoAttack best", "AutoAttack last", "gap PGD-20", "gap AutoAttack",
               "best epoch"] + (["CO"] if co else []) + [
               "seeds", f"cost vs {base}", f"passes vs {base}", "flags"]
    headers += ["extra pretraining"] if extra else []
    rows = []
    for i, (_, r) in enumerate(table.iterrows(), start=1):
        cells = [str(i), r["row"]]
        for col in ("clean_best", "clean_last", "pgd20_best", "pgd20_last", "autoattack_best",
                    "autoattack_last", "gap_pgd20", "gap_autoattack"):
            cells.append(pct(r[f"{col}_mean"], r[f"{col}_std"]))
        cells += [_best_epoch(r)] + ([co_cell(r)] if co else [])
        cells += [r["seeds"], ratio(r["cost_vs_base"]), ratio(r["passes_vs_base"]),
                  r["flags"] or DASH]
        cells += [r["extra_pretraining"] or DASH] if extra else []
        rows.append(cells)
    out += [md_table(headers, rows), "", LEGEND + (" " + CO_LEGEND if co else ""), ""]
    cards = meta.get("cards") or {}
    if cards:
        out += ["### Defenses", ""]
        for key, card in cards.items():
            bits = [f"**{card.get('name', key)}** (`{key}`)"]
            if card.get("paper"):
                bits.append(f"*{card['paper']}*" + (f", {card['venue']}" if card.get("venue")
                                                    else ""))
            if card.get("link"):
                bits.append(f"<{card['link']}>")
            out.append("- " + " — ".join(bits))
        out.append("")
    return "\n".join(out)


def render_markdown(tables: dict[str, pd.DataFrame], source: str = "") -> str:
    """The whole leaderboard document, one section per suite key."""
    head = ["# ROBench leaderboard", ""]
    if source:
        n = sum(t.attrs.get("n_records", 0) for t in tables.values())
        head += [f"Compiled from {n} run record(s) under `{source}`.", ""]
    return "\n".join(head + [suite_markdown(t) for t in tables.values()]).rstrip() + "\n"
