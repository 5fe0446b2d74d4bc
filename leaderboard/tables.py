"""Records -> one pandas table per suite version: mean ± std over seeds, gaps, cost, ranks.

Suite versions and rows come from `leaderboard.grouping`: one table per suite protocol hash
(the installed suite file's is the current one), one row per configuration (method,
defenses, effective parameters, run hash) and per official/other seeds. Each extra model a
defense keeps (an EMA, ...) is a sub-row under its row, never ranked.

Ranking. Only the trained model is ranked, by the mean last-checkpoint worst case (the
per-image fraction robust to every attack), descending, ties by row label. A row whose
trained model raised a `masking` or `integrity` flag on any seed or checkpoint is not
ranked (mark ⚑, listed after the ranked rows); a `health` flag marks it (†) but it keeps
its rank; `note` flags only go to the `notes` column. Each ranked row also gets the range
of ranks its 95% t interval of the mean allows (`rank_range`, "2–4" where intervals overlap).

Statistics (`leaderboard.statistics`): each mean has its 95% t interval over seeds
(`<value>_ci_low`, `<value>_ci_high`); each official trained row has its difference to the
suite's base row (the one the cost column divides by) in last worst case and in its gap,
with a paired bootstrap interval over seeds and test images (`<metric>_vs_base*`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pandas as pd

from leaderboard.costs import cost_source, measured_ratios
from leaderboard.grouping import (
    CURRENT,
    Bucket,
    SuiteGroup,
    buckets,
    defense_names,
    has_fgsm_curve,
    params_text,
    prepare,
    warn_mixed_provenance,
)
from leaderboard.records import (
    CHECKPOINTS,
    CO_KEY,
    METRICS,
    LeaderboardWarning,
    canonical,
    created_at,
)
from leaderboard.statistics import paired_difference, rank_ranges, resolved, t_interval

DECIMALS = 6
TRAINED = "model"  # the trained model's name in `metrics`; the only one ever ranked
GAP_METRICS = ("pgd20", "autoattack", "worst_case")
VALUE_COLUMNS = ([f"{m}_{c}" for m in METRICS for c in CHECKPOINTS]
                 + [f"gap_{m}" for m in GAP_METRICS])
# `_n`: the seeds a value was averaged over; `_ci_low`/`_ci_high`: its 95% t interval
STATS = ("mean", "std", "n", "ci_low", "ci_high")
# the metrics compared with the base row by a paired bootstrap (leaderboard.statistics)
PAIRED_METRICS = ("worst_case_last", "gap_worst_case")
VS_BASE_COLUMNS = (["vs_base", "vs_base_seeds"]
                   + [f"{m}_vs_base{s}" for m in PAIRED_METRICS
                      for s in ("", "_ci_low", "_ci_high", "_resolved")])
COLUMNS = (
    ["suite", "rank", "row", "row_name", "model", "official", "marks", "method", "defenses",
     "params", "run_hash"]
    + [f"{v}_{s}" for v in VALUE_COLUMNS for s in STATS]
    + ["rank_low", "rank_high", "rank_range"] + VS_BASE_COLUMNS
    + ["best_epoch_mean", "epochs", "n_seeds", "seeds_expected", "seeds", "seed_list",
       "seconds_per_epoch_mean", "passes_mean", "cost_vs_base", "passes_vs_base", "cost_base",
       "pretraining_seconds_mean", "extra_pretraining", "flags", "notes", "run_ids"]
)
# catastrophic overfitting, only in the tables of suites with CO data (see `has_co_data`):
# seeds flagged, seeds whose record was checked, earliest flagged epoch
CO_COLUMNS = ["co_seeds", "co_checked", "co_epoch_min"]

# flag levels (leaderboard.schema.FLAG_LEVELS) and the marks they give a row
UNRANKED_LEVELS = ("masking", "integrity")
HEALTH_LEVEL = "health"
NOTE_LEVEL = "note"
MARK_UNRANKED = "⚑"  # a masking or integrity flag: not ranked
MARK_HEALTH = "†"  # a health flag: marked, still ranked
MARK_UNOFFICIAL = "○"  # seeds the suite does not ask for: kept apart, never ranked
SUB_ROW = "↳"

AA_LABELS = {"standard": "AutoAttack", "apgd": "APGD-CE+APGD-T",
             "reduced": "APGD-CE+APGD-T (reduced)"}


def _num(value: Any) -> float:
    """A finite number as float, anything else (None, strings, bools) as NaN."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ------------------------------------------------------------------------------ per run

def has_cpu_clock(records: list[dict]) -> bool:
    """True when every record has the process CPU seconds of every training epoch (CPU
    runs): the suite's cost column then uses them instead of wall seconds, so that other
    jobs sharing the machine do not distort the ratios. Otherwise all rows use wall time."""
    return bool(records) and all(
        (rec.get("cost") or {}).get("cpu_seconds_per_epoch") for rec in records)


def _seconds_per_epoch(rec: dict, clock: str = "wall") -> float:
    cost = rec.get("cost") or {}
    key = "cpu_seconds_per_epoch" if clock == "cpu" else "seconds_per_epoch"
    per_epoch = [_num(s) for s in cost.get(key) or []]
    per_epoch = [s for s in per_epoch if not math.isnan(s)]
    if per_epoch:
        return sum(per_epoch) / len(per_epoch)
    epochs = _num((rec.get("history") or {}).get("epochs"))
    train = _num(cost.get("train_seconds"))
    return train / epochs if epochs and epochs > 0 else math.nan


def has_co_data(records: list[dict]) -> bool:
    """True when a suite's table gets the CO columns: some record flags catastrophic
    overfitting, or some record carries the FGSM curve (`val_fgsm`) the detector uses."""
    return any(rec.get(CO_KEY) is not None or has_fgsm_curve(rec) for rec in records)


def _co_epoch(rec: dict) -> float:
    """The record's catastrophic-overfitting epoch, NaN when none was flagged."""
    co = rec.get(CO_KEY)
    return _num(co.get("epoch")) if isinstance(co, dict) else math.nan


def _pretraining(rec: dict) -> tuple[float, float, list[str]]:
    """Seconds and passes of the run's extra pretraining (e.g. the cached clean model a
    warm start needs; charged in full to every run that uses it), and what it was."""
    cost = rec.get("cost") or {}
    extras = [e for e in rec.get("extra_pretraining") or [] if isinstance(e, dict)]
    seconds = _num(cost.get("pretraining_seconds"))
    if math.isnan(seconds) or seconds == 0:
        seconds = sum(_num(e.get("seconds")) for e in extras) if extras else seconds
    passes = (_num(cost.get("pretraining_forward_passes"))
              + _num(cost.get("pretraining_backward_passes")))
    if math.isnan(passes):
        passes = sum(_num(e.get("forward_passes")) + _num(e.get("backward_passes"))
                     for e in extras) if extras else 0.0
    return seconds, passes, [str(e.get("what", "?")) for e in extras]


def run_rows(rec: dict, clock: str = "wall") -> dict[str, dict]:
    """Model name -> one flat row of one run (one seed). The cost columns count the
    extra pretraining: `cost_per_epoch` adds its seconds spread over the run's epochs,
    `passes` adds its passes."""
    cost, hist = rec.get("cost") or {}, rec.get("history") or {}
    pre, pre_passes, extras = _pretraining(rec)
    epochs = _num(hist.get("epochs"))
    per_epoch = _seconds_per_epoch(rec, clock)
    amortised = pre / epochs if pre > 0 and epochs > 0 else 0.0
    base = {
        "seed": rec["spec"]["seed"], "run_id": rec["run_id"],
        "best_epoch": _num(hist.get("best_epoch")), "epochs": epochs,
        "seconds_per_epoch": per_epoch, "cost_per_epoch": per_epoch + amortised,
        "passes": (_num(cost.get("forward_passes")) + _num(cost.get("backward_passes"))
                   + (pre_passes if pre_passes > 0 else 0.0)),
        "pretraining_seconds": pre, "extra": extras,
    }
    rows = {}
    for model, per_ckpt in rec["metrics"].items():
        trained = model == TRAINED  # the curves (so the CO check) are the trained model's
        flags = [f for f in rec["flags"] if f.get("model") == model]
        row = dict(base, co_checked=trained and CO_KEY in rec,
                   co_epoch=_co_epoch(rec) if trained else math.nan,
                   levels={f["level"] for f in flags},
                   flags=[f["check"] for f in flags if f["level"] != NOTE_LEVEL],
                   notes=[f["check"] for f in flags if f["level"] == NOTE_LEVEL])
        for metric in METRICS:
            for ckpt in CHECKPOINTS:
                row[f"{metric}_{ckpt}"] = _num(per_ckpt[ckpt].get(metric))
        for metric in GAP_METRICS:  # best - last per seed (NaN when either is missing)
            row[f"gap_{metric}"] = row[f"{metric}_best"] - row[f"{metric}_last"]
        rows[model] = row
    return rows


# ---------------------------------------------------------------------------- aggregation

def _stats(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample std (NaN below 2 values) and count of the non-NaN values."""
    vals = [v for v in values if not math.isnan(v)]
    n = len(vals)
    if not n:
        return math.nan, math.nan, 0
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def _mean(values: list[float]) -> float:
    return _stats(values)[0]


def _unique(lists: list[list[str]]) -> str:
    return ", ".join(sorted({item for items in lists for item in items}))


def _extra_text(runs: list[dict]) -> str:
    """'clean model (standard training, 200 epochs) (1234 s)': what, and its mean seconds."""
    what = _unique([r["extra"] for r in runs])
    seconds = _mean([r["pretraining_seconds"] for r in runs])
    if not what or not seconds > 0:
        return what
    return f"{what} ({seconds:.0f} s)" if seconds >= 10 else f"{what} ({seconds:.1f} s)"


def _marks(levels: set[str], official: bool) -> str:
    marks = MARK_UNRANKED if levels & set(UNRANKED_LEVELS) else ""
    marks += MARK_HEALTH if HEALTH_LEVEL in levels else ""
    return marks + ("" if official else MARK_UNOFFICIAL)


def bucket_rows(key: str, bucket: Bucket, expected: list[int], clock: str) -> list[dict]:
    """The aggregated rows of one bucket: the trained model, then each extra model."""
    per_run = [run_rows(rec, clock) for rec in bucket.records]
    n = len(bucket.records)
    models = sorted({m for runs in per_run for m in runs}, key=lambda m: (m != TRAINED, m))
    first = bucket.records[0]
    n_expected = len(expected)
    if bucket.official and n_expected:
        seeds = f"{n}/{n_expected}" + (" ⚠" if n < n_expected else "")
    else:
        seeds = str(n)
    rows = []
    for model in models:
        runs = [r[model] for r in per_run if model in r]
        trained = model == TRAINED
        levels = set().union(*(r["levels"] for r in runs))
        row = {"suite": key, "rank": None, "rank_low": None, "rank_high": None,
               "rank_range": "",
               "row": bucket.row if trained else f"{SUB_ROW} {bucket.row} [{model}]",
               "row_name": first["row_name"], "model": model, "official": bucket.official,
               "marks": _marks(levels, bucket.official),
               "method": first["spec"]["method"], "defenses": "+".join(defense_names(first)),
               "params": params_text(first), "run_hash": first["suite"]["run_hash"],
               "_ranked": bucket.official and trained and not levels & set(UNRANKED_LEVELS),
               "_key": bucket.key, "_records": bucket.records if trained else []}
        for col in VALUE_COLUMNS:
            # `_n` < `n_seeds` where a seed has no value (or lacks this extra model)
            values = [r[col] for r in runs]
            row[f"{col}_mean"], row[f"{col}_std"], row[f"{col}_n"] = _stats(values)
            row[f"{col}_ci_low"], row[f"{col}_ci_high"] = t_interval(values)
        epochs = {r["epochs"] for r in runs if not math.isnan(r["epochs"])}
        co_epochs = [r["co_epoch"] for r in runs if not math.isnan(r["co_epoch"])]
        row.update(
            best_epoch_mean=_mean([r["best_epoch"] for r in runs]),
            epochs=epochs.pop() if len(epochs) == 1 else math.nan,
            n_seeds=n, seeds_expected=n_expected, seeds=seeds,
            seed_list=",".join(str(s) for s in bucket.seeds),
            seconds_per_epoch_mean=_mean([r["seconds_per_epoch"] for r in runs]),
            cost_per_epoch_mean=_mean([r["cost_per_epoch"] for r in runs]),
            passes_mean=_mean([r["passes"] for r in runs]),
            pretraining_seconds_mean=_mean([r["pretraining_seconds"] for r in runs]),
            extra_pretraining=_extra_text(runs), flags=_unique([r["flags"] for r in runs]),
            notes=_unique([r["notes"] for r in runs]),
            run_ids=",".join(sorted(r["run_id"] for r in runs)),
            co_seeds=len(co_epochs), co_checked=sum(bool(r["co_checked"]) for r in runs),
            co_epoch_min=min(co_epochs) if co_epochs else math.nan)
        rows.append(row)
    return rows


# The base row the cost columns divide by: plain PGD-AT where the suite has it, otherwise
# the first plain method of this list that it has (FGSM-RS on the single-step suites).
BASE_METHODS = ("at", "trades", "fgsm_rs", "n_fgsm", "standard")


def _base_row(families: list[list[dict]]) -> dict | None:
    plain = [f[0] for f in families if f[0]["official"] and not f[0]["defenses"]]
    for method in BASE_METHODS:
        rows = [r for r in plain if str(r["method"]).lower() == method]
        if rows:
            return rows[0]
    return None


def _order(families: list[list[dict]]) -> list[list[dict]]:
    """Official ranked rows by last worst case (descending, ties by row label), then the
    official unranked rows, then the rows of seeds the suite does not ask for; each row
    followed by its sub-rows."""
    def key(family: list[dict]) -> tuple:
        head = family[0]
        worst = head["worst_case_last_mean"]
        return (not head["official"], not head["_ranked"], math.isnan(worst),
                -worst if not math.isnan(worst) else 0.0, head["row"])
    return sorted(families, key=key)


def _rank(families: list[list[dict]]) -> None:
    """Number the ranked rows in order, and give each the range of ranks its 95% interval
    of the mean last worst case allows (`rank_ranges`): "2–4" where intervals overlap."""
    heads = [f[0] for f in families if f[0]["_ranked"]]
    spans = rank_ranges([(h["worst_case_last_ci_low"], h["worst_case_last_ci_high"])
                         for h in heads])
    for rank, (head, (low, high)) in enumerate(zip(heads, spans), start=1):
        head.update(rank=rank, rank_low=low, rank_high=high,
                    rank_range=str(rank) if low == high else f"{low}–{high}")


def _compare_with_base(families: list[list[dict]], base: dict | None) -> None:
    """Each official trained row's paired difference to the base row (PAIRED_METRICS,
    `leaderboard.statistics.paired_difference`); NaN for the base itself, sub-rows and
    the rows of other seeds."""
    for family in families:
        for row in family:
            row.update({c: math.nan for c in VS_BASE_COLUMNS})
            row["vs_base"] = base["row"] if base is not None else ""
            row["vs_base_seeds"] = 0
    if base is None:
        return
    for family in families:
        head = family[0]
        if head is base or not head["official"]:
            continue
        for metric in PAIRED_METRICS:
            d = paired_difference(head["_records"], base["_records"], metric)
            head.update({f"{metric}_vs_base": d["diff"], f"{metric}_vs_base_ci_low": d["low"],
                         f"{metric}_vs_base_ci_high": d["high"],
                         f"{metric}_vs_base_resolved": resolved(d["low"], d["high"])})
            head["vs_base_seeds"] = d["seeds"]


def evaluation_info(rec: dict) -> dict:
    """What the record's evaluation ran, for the table's headers and legend: test images,
    the attack subset, the AutoAttack version and its truthful label, the Square budget
    and the attacks behind `worst_case` (counts from `metrics` where `evaluation` lacks
    them)."""
    ev, last = rec["evaluation"], rec["metrics"][TRAINED]["last"]
    aa = ev["autoattack"]
    version = aa["version"]
    worst = ev.get("worst_case") if isinstance(ev.get("worst_case"), dict) else {}
    square = ev.get("square") if isinstance(ev.get("square"), dict) else {}
    n_images = _int(ev.get("n_images")) or last["n"]
    n_subset = _int(worst.get("n_images")) or last["n_worst_case"]
    queries = _int(square.get("queries")) or 0
    if version == "none":
        label, n_aa = None, 0
    else:
        # from the version the evaluator ran, never from the record's own label text
        label = AA_LABELS[version]
        n_aa = _int(aa.get("n_images")) or _int(last.get("n_autoattack")) or n_subset
    attacks = worst.get("attacks")
    if not (isinstance(attacks, list) and all(isinstance(a, str) for a in attacks)):
        attacks = (["clean", "pgd20", "cw20"] + (["autoattack"] if label else [])
                   + (["square"] if queries else []))
    column = "AutoAttack" if version == "standard" else (label or "AutoAttack (not run)")
    return {"n_images": n_images, "n_attack_subset": n_subset,
            "autoattack": {"version": version, "label": label, "column": column,
                           "n_images": n_aa},
            "square": {"queries": queries,
                       "n_images": (_int(square.get("n_images")) or n_subset) if queries else 0,
                       "within_autoattack": _int(square.get("within_autoattack")) or 0},
            "worst_case": {"n_images": n_subset, "attacks": list(attacks)}}


def _evaluation_meta(key: str, records: list[dict], newest: dict) -> dict:
    infos = {canonical(evaluation_info(r)) for r in records}
    if len(infos) > 1:
        warnings.warn(
            f"suite {key!r}: its records describe their evaluation differently ({len(infos)} "
            "versions); the headers and legend follow the newest record", LeaderboardWarning,
            stacklevel=4)
    return evaluation_info(newest)


def suite_table(group: SuiteGroup, cost: dict | None = None) -> pd.DataFrame:
    """Aggregate one suite version's (deduplicated) records into its leaderboard table.
    `cost`: the suite's `robench cost` document (leaderboard.costs); where it was measured
    under this version, the cost column shows its ratios instead of the runs' seconds."""
    records, key = group.records, group.key
    clock = "cpu" if has_cpu_clock(records) else "wall"
    expected = group.seeds
    families = []
    for bucket in buckets(group):
        if len(bucket.records) > 1:
            warn_mixed_provenance(key, bucket)
        families.append(bucket_rows(key, bucket, expected, clock))
    families = _order(families)
    _rank(families)
    base = _base_row(families)
    _compare_with_base(families, base)
    table = pd.DataFrame([row for family in families for row in family])
    if base is not None:
        table["cost_vs_base"] = table["cost_per_epoch_mean"] / base["cost_per_epoch_mean"]
        table["passes_vs_base"] = table["passes_mean"] / base["passes_mean"]
        table["cost_base"] = base["row"]
    else:
        table["cost_vs_base"] = table["passes_vs_base"] = math.nan
        table["cost_base"] = ""
    measured = measured_ratios(cost, group.hash)
    if measured is not None:
        table["cost_vs_base"] = [measured.get(k, math.nan) for k in table["_key"]]
        table["cost_base"] = cost.get("base") or ""
    for col in ("rank", "rank_low", "rank_high"):
        table[col] = table[col].astype("Int64")
    for col in (f"{m}_vs_base_resolved" for m in PAIRED_METRICS):
        table[col] = table[col].astype("boolean")  # <NA> where no difference was taken
    table = table[COLUMNS + (CO_COLUMNS if has_co_data(records) else [])].reset_index(drop=True)
    floats = table.select_dtypes("float").columns
    table[floats] = table[floats].round(DECIMALS)  # drop float noise such as 1e-17 stds
    table.attrs.update(_suite_meta(group))
    table.attrs["cost"] = (cost_source(cost) if measured is not None
                           else {"source": "runs", "clock": clock})
    return table


def _suite_meta(group: SuiteGroup) -> dict:
    records, newest = group.records, group.newest
    used = {name for r in records for name in defense_names(r)}
    cards: dict[str, dict] = {}
    for rec in sorted(records, key=created_at):  # newest card wins
        cards.update({k: v for k, v in (rec.get("cards") or {}).items()
                      if k in used and isinstance(v, dict)})
    return {"key": group.key, "name": group.name, "hash": group.hash,
            "status": group.status, "current": group.status == CURRENT,
            "current_hash": group.current_hash,
            "description": newest["suite"].get("description", ""), "seeds": group.seeds,
            "evaluation": _evaluation_meta(group.key, records, newest),
            "cards": dict(sorted(cards.items())), "n_records": len(records)}


def compile_tables(records: list[dict], current_hashes: dict[str, str] | None = None,
                   costs: dict[str, dict] | None = None) -> dict[str, pd.DataFrame]:
    """One leaderboard table per suite key (see the module docstring), in key order.

    `current_hashes`: suite name -> protocol hash of the current suite file; None reads
    the installed suite files. Suite metadata (name, hash, status, description, seeds,
    evaluation, cards) sits in each table's `attrs`.
    """
    costs = costs or {}
    return {key: suite_table(group, costs.get(group.name))
            for key, group in prepare(records, current_hashes).items()}
