"""Leaderboard tables -> Markdown (own small formatter: no `tabulate` needed)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from leaderboard.statistics import BOOTSTRAP_SEED, RESAMPLES
from leaderboard.tables import MARK_UNOFFICIAL, PAIRED_METRICS

DASH = "–"
RESOLVED = "✓"  # a difference to the base row whose 95% interval excludes 0

LEGEND = (
    "*best*: the checkpoint with the highest PGD robust accuracy on the held-out validation "
    "split (never the test set); *last*: the checkpoint after the final epoch. Accuracies in %, "
    "mean ± sample standard deviation over the row's seeds (no ± with a single seed); – = not "
    "measured; a trailing (k/n) = averaged over only k of the row's n seeds (the other seeds "
    "have no value, e.g. AutoAttack did not run there). "
    "*gap* = best − last per seed, averaged: the size of robust overfitting. "
    "*#*: the rank. Only the trained model is ranked, by last-checkpoint worst case "
    "(descending; ties by row name). ↳ rows are extra models a defense keeps (e.g. an EMA or "
    "a stable model), shown under their row and never ranked. "
    "⚑ = not ranked: a sanity check of level *masking* (the gradients may be masked, so the "
    "robust accuracy may be inflated) or *integrity* (what the training recorded does not "
    "match the checkpoint) fired on the trained model for some seed or checkpoint; ⚑ rows "
    "follow the ranked ones. † = a *health* check fired (clean accuracy near chance: the "
    "model did not learn; or PGD-20 far above AutoAttack: the PGD-20 columns overstate "
    "robustness, the ranked worst case counts AutoAttack); the row keeps its rank. "
    "*flags*: the masking, integrity and health checks that fired on some seed or checkpoint "
    "of that model; *notes*: checks of level note (shown only, they change nothing). "
    "*seeds*: seeds of the suite's list that were run / seeds the suite asks for (⚠ = "
    "incomplete); runs with other seeds are listed apart and never ranked. "
    "Runs are averaged only under identical effective settings (method, defenses, their "
    "effective parameters, the suite's settings for them): rows of the same name show the "
    "parameters that differ, or #hash of the suite settings when only those differ. "
    "COST_TEXT *passes vs BASE*: forward + "
    "backward passes relative to the base row, extra pretraining included. *extra "
    "pretraining*: what a row trained besides its own run, with its mean seconds (charged "
    "in full to every row that uses it)."
)
COST_FROM_RUNS = (
    "*cost vs BASE*: the runs' own mean training seconds per epoch relative to the suite's "
    "plain base row (PGD-AT, the `AT` row, where the suite has one; otherwise the first of "
    "TRADES, FGSM-RS, N-FGSM and standard training that it has) (process CPU seconds where "
    "every run recorded them, wall seconds otherwise), any extra pretraining (a clean model "
    "a warm start needs) included, its seconds spread over the run's epochs. These depend on "
    "what else the machine was running; `robench cost` measures ratios that do not."
)
COST_MEASURED = (
    "*cost vs BASE*: measured by `robench cost` (CREATED, on DEVICE, THREADS thread(s), "
    "median of ROUNDS rounds): each row's training seconds per epoch relative to the BASE "
    "row, all rows timed side by side in one process, in turn, so that the machine's load "
    "falls on all of them alike; any extra pretraining (a clean model a warm start needs) "
    "included as its share per epoch; – = a row it did not time (run it again)."
)


def cost_legend(info: dict, base: str) -> str:
    if info.get("source") != "robench cost":
        return COST_FROM_RUNS
    text = COST_MEASURED
    for key in ("created", "device", "threads", "rounds"):
        text = text.replace(key.upper(), str(info.get(key)))
    return text


CO_LEGEND = (
    "*CO*: catastrophic overfitting, seeds flagged / seeds checked and the earliest flagged "
    "epoch (– = none): validation PGD accuracy collapsed (below 5%, or more than 20 points "
    "below its running maximum) while FGSM accuracy stayed high (at least its value at the "
    "PGD peak minus 10 points, and 20 points above PGD); see `bench/overfitting.py`."
)
STATS_LEGEND = (
    "*[low, high]* after a mean: its 95% confidence interval over the row's seeds, a "
    "Student t interval, mean ± t(0.975, n−1) · s / √n with s the sample standard "
    "deviation and n the seeds (none with a single seed); it covers the spread between "
    "seeds, not the choice of the test images. A rank shown as *2–4*: the ranks the row "
    "could take given these intervals of the mean last worst case, from 1 + the rows whose "
    "interval lies wholly above its own to the rows whose interval does not lie wholly "
    "below it; rows whose intervals overlap are tied and share ranks (a row with one seed "
    "has no interval and spans every rank). *Δ … vs VS*: the row's difference to the "
    "suite's base row VS in percentage points (last worst case; gap of the worst case), "
    "paired: only the seeds both rows ran, and within a seed the same test images. Its "
    f"[low, high] is a 95% paired bootstrap interval: {RESAMPLES} resamples, each drawing "
    "the paired seeds with replacement and then, within each drawn seed, the test images "
    "with replacement (the same images for both rows), the statistic being the mean over "
    "seeds of the mean per-image difference; the interval is the 2.5th to 97.5th "
    f"percentile (random generator seeded with {BOOTSTRAP_SEED}, so the board is "
    f"reproducible). {RESOLVED} = resolved at 95%: the interval excludes 0. With few seeds "
    "the seed level of the bootstrap can only draw among those seeds, so its interval can "
    "be too narrow; read it together with the t intervals."
)
NO_BASE = (" This suite has no base row (no official plain PGD-AT, TRADES, FGSM-RS, N-FGSM or "
           "standard-training row), so its Δ columns are empty.")
UNOFFICIAL_HEADING = "### Runs with seeds the suite does not ask for (not ranked)"


def missing(value: Any) -> bool:
    """No value: None, NaN or pandas' NA (the nullable rank and resolved columns)."""
    return (value is None or value is pd.NA
            or (isinstance(value, float) and math.isnan(value)))


def is_base_row(row: Any) -> bool:
    """The official row every other row's paired difference is taken against."""
    return bool(row.get("vs_base")) and row["row"] == row["vs_base"] and bool(row["official"])


def base_names(table: pd.DataFrame) -> tuple[str, str, bool]:
    """(the cost column's base row, the paired differences' base row or "base", whether
    the table has a paired base at all)."""
    bases = [b for b in table["cost_base"].astype(str).unique() if b]
    vs_bases = [b for b in table["vs_base"].astype(str).unique() if b]
    return (bases[0] if bases else "AT", vs_bases[0] if vs_bases else "base",
            bool(vs_bases))


def board_legend(table: pd.DataFrame, base: str, vs: str, has_vs: bool) -> str:
    """The legend under a suite's table (Markdown and HTML boards)."""
    meta = table.attrs
    co = "co_seeds" in table.columns
    return (evaluation_legend(meta["evaluation"]) + " "
            + LEGEND.replace("COST_TEXT", cost_legend(meta.get("cost") or {}, base))
            .replace("BASE", base)
            + (" " + CO_LEGEND if co else "") + " "
            + STATS_LEGEND.replace("VS", vs) + ("" if has_vs else NO_BASE))


def pct(mean: Any, std: Any = None) -> str:
    """Fractions as percentages with 2 decimals: '48.00 ± 1.23', '48.00', or '–'."""
    if missing(mean):
        return DASH
    return f"{100 * mean:.2f}" if missing(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def ratio(value: Any) -> str:
    """A cost ratio such as '1.52×', or '–'."""
    return DASH if missing(value) else f"{value:.2f}×"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table; '|' inside cells is escaped."""
    def line(cells: list[str]) -> str:
        clean = (str(c).replace("|", "\\|").replace("\n", " ") for c in cells)
        return "| " + " | ".join(clean) + " |"
    return "\n".join([line(headers), "| " + " | ".join("---" for _ in headers) + " |"]
                     + [line(r) for r in rows])


def _best_epoch(row: pd.Series) -> str:
    if missing(row["best_epoch_mean"]):
        return DASH
    text = f"{row['best_epoch_mean']:.1f}"
    return text if missing(row["epochs"]) else f"{text} / {int(row['epochs'])}"


def co_cell(row: pd.Series) -> str:
    """'2/3 @ep 12' (seeds flagged / seeds checked, earliest epoch), or '–' when none."""
    if missing(row["co_seeds"]) or int(row["co_seeds"]) == 0:
        return DASH
    epoch = "" if missing(row["co_epoch_min"]) else f" @ep {int(row['co_epoch_min'])}"
    return f"{int(row['co_seeds'])}/{int(row['co_checked'])}{epoch}"


def _subset(k: int, n: int) -> str:
    return f"all {n}" if k >= n else f"the first {k} of the {n}"


def attack_names(ev: dict) -> dict[str, str]:
    """What each attack of `evaluation.worst_case.attacks` is called in the legend."""
    aa = ev["autoattack"]
    return {"clean": "clean classification", "pgd20": "PGD-20", "cw20": "CW-20",
            "autoattack": aa["label"] or "AutoAttack",
            "square": f"the Square check ({ev['square']['queries']} queries)"}


def evaluation_legend(ev: dict) -> str:
    """Which attacks ran on how many of how many test images, and what worst case means."""
    n, aa, square = ev["n_images"], ev["autoattack"], ev["square"]
    parts = [f"Clean accuracy, PGD-20 and CW-20 (CW-20 in the CSV/JSON files only) ran on "
             f"all {n} test images"]
    if aa["label"]:
        parts.append(f"{aa['label']} (AutoAttack version `{aa['version']}`) on "
                     f"{_subset(aa['n_images'], n)} test images")
    else:
        parts.append("AutoAttack was not run (– in its columns)")
    if square["queries"]:
        parts.append(f"the gradient-free Square check ({square['queries']} queries) on "
                     f"{_subset(square['n_images'], n)} test images (those every gradient "
                     "attack missed)")
    if square.get("within_autoattack"):
        parts.append(f"the standard version's own gradient-free Square "
                     f"({square['within_autoattack']} queries) runs last on what its gradient "
                     "attacks missed, and its gain is checked (`square_beats_gradients`)")
    names = attack_names(ev)
    attacks = [names.get(a, a) for a in ev["worst_case"]["attacks"]]
    listed = ", ".join(attacks[:-1]) + f" and {attacks[-1]}" if len(attacks) > 1 else attacks[0]
    text = "; ".join(parts) + ". "
    text += (f"*worst case*: the fraction of {_subset(ev['worst_case']['n_images'], n)} test "
             "images that are robust to every attack: an image counts as robust only if every "
             f"attack failed on it ({listed}). It is the ranking metric.")
    if ev["worst_case"]["n_images"] < n or 0 < aa["n_images"] < n:
        text += " (k img) in a header: the column was measured on k test images only."
    return text


def _img(k: int, n: int) -> str:
    return f" ({k} img)" if 0 < k < n else ""


def interval(low: Any, high: Any, signed: bool = False) -> str:
    """A 95% interval of fractions in %: '[37.03, 46.97]' ('[+1.50, +7.50]'), '' if none."""
    if missing(low) or missing(high):
        return ""
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f"[{fmt.format(100 * low)}, {fmt.format(100 * high)}]"


def _cell(row: pd.Series, col: str) -> str:
    text = pct(row[f"{col}_mean"], row[f"{col}_std"])
    if text != DASH and (ci := interval(row[f"{col}_ci_low"], row[f"{col}_ci_high"])):
        text += f" {ci}"
    k, n = row[f"{col}_n"], row["n_seeds"]
    if text != DASH and not missing(k) and not missing(n) and int(k) < int(n):
        text += f" ({int(k)}/{int(n)})"
    return text


def vs_base_cell(row: pd.Series, metric: str) -> str:
    """'+4.00 [+1.50, +7.50] ✓': the paired difference to the base row in points, its
    bootstrap interval, ✓ when it excludes 0; '(base)' on the base row, '–' without one."""
    if is_base_row(row):
        return "(base)"
    diff = row.get(f"{metric}_vs_base")
    if missing(diff):
        return DASH
    text = f"{100 * diff:+.2f} " + interval(row[f"{metric}_vs_base_ci_low"],
                                          row[f"{metric}_vs_base_ci_high"], signed=True)
    flag = row[f"{metric}_vs_base_resolved"]
    return text + (f" {RESOLVED}" if not pd.isna(flag) and bool(flag) else "")


def rank_cell(row: pd.Series) -> str:
    """The rank, or the range of ranks its interval allows ('1–3'), with † where a health
    check fired; or the marks of an unranked row."""
    rank = "" if pd.isna(row["rank"]) else str(int(row["rank"]))
    if rank and str(row.get("rank_range") or ""):
        rank = str(row["rank_range"])
    return " ".join(p for p in (rank, str(row["marks"] or "")) if p)


VALUE_CELLS = ("clean_best", "clean_last", "pgd20_best", "pgd20_last", "autoattack_best",
               "autoattack_last", "worst_case_best", "worst_case_last", "gap_pgd20",
               "gap_autoattack", "gap_worst_case")


def _table(table: pd.DataFrame, headers: list[str], co: bool, extra: bool) -> str:
    rows = []
    for _, r in table.iterrows():
        cells = [rank_cell(r), r["row"]] + [_cell(r, col) for col in VALUE_CELLS]
        cells += [vs_base_cell(r, m) for m in PAIRED_METRICS]
        cells += [_best_epoch(r)] + ([co_cell(r)] if co else [])
        cells += [r["seeds"], ratio(r["cost_vs_base"]), ratio(r["passes_vs_base"]),
                  r["flags"] or DASH, r["notes"] or DASH]
        cells += [r["extra_pretraining"] or DASH] if extra else []
        rows.append(cells)
    return md_table(headers, rows)


def _status_line(meta: dict) -> list[str]:
    name, status = meta.get("name"), meta.get("status", "current")
    this = str(meta.get("hash", ""))[:12]
    if status == "other_version":
        return [f"> Another version of suite `{name}`: these runs used a different suite file "
                f"(protocol hash `{this}`; the installed file has "
                f"`{str(meta.get('current_hash', ''))[:12]}`) and are not comparable with the "
                f"current table `{name}`.", ""]
    if status == "not_installed":
        return [f"> No installed suite file is named `{name}`: this table is labelled by its "
                f"protocol hash (`{this}`) and no table of this name is the current one.", ""]
    return []


def suite_markdown(table: pd.DataFrame) -> str:
    """One suite's section: heading, protocol line, ranked table, legend, the runs of other
    seeds, defense cards."""
    meta = table.attrs
    ev = meta["evaluation"]
    out = [f"## {meta.get('key', meta.get('name', '?'))}", ""]
    if meta.get("description"):
        out += [str(meta["description"]).strip(), ""]
    seeds = meta.get("seeds") or []
    out += [f"Suite `{meta.get('name')}`, protocol hash `{str(meta.get('hash', ''))[:12]}`, "
            f"seeds expected: {', '.join(map(str, seeds)) or 'none listed'} ({len(seeds)}); "
            f"{meta.get('n_records', 0)} run record(s).", ""]
    out += _status_line(meta)
    extra = bool(table["extra_pretraining"].astype(str).str.len().gt(0).any())
    co = "co_seeds" in table.columns
    base, vs, has_vs = base_names(table)
    n = ev["n_images"]
    aa = ev["autoattack"]["column"] + _img(ev["autoattack"]["n_images"], n)
    aa_best = f"{ev['autoattack']['column']} best{_img(ev['autoattack']['n_images'], n)}"
    aa_last = f"{ev['autoattack']['column']} last{_img(ev['autoattack']['n_images'], n)}"
    wc = _img(ev["worst_case"]["n_images"], n)
    headers = ["#", "row", "clean best", "clean last", "PGD-20 best", "PGD-20 last",
               aa_best, aa_last, f"worst case best{wc}", f"worst case last{wc}",
               "gap PGD-20", f"gap {aa}", f"gap worst case{wc}",
               f"Δ worst case last vs {vs}", f"Δ gap worst case vs {vs}", "best epoch"]
    headers += (["CO"] if co else []) + ["seeds", f"cost vs {base}", f"passes vs {base}",
                                         "flags", "notes"]
    headers += ["extra pretraining"] if extra else []
    official = table[table["official"].astype(bool)]
    others = table[~table["official"].astype(bool)]
    legend = board_legend(table, base, vs, has_vs)
    if len(official):
        out += [_table(official, headers, co, extra), ""]
    else:
        out += ["No run of this suite used the seeds it asks for.", ""]
    out += [legend, ""]
    if len(others):
        listed = ", ".join(map(str, seeds))
        out += [UNOFFICIAL_HEADING, "",
                f"{MARK_UNOFFICIAL} Runs whose seeds are not in the suite's list ({listed}): "
                "shown apart for information, never averaged into the rows above and never "
                "ranked; each row names its seeds.", "",
                _table(others, headers, co, extra), ""]
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
