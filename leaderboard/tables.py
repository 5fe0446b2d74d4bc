"""Records -> one pandas table per suite: mean ± std over seeds, gaps, cost vs the base row.

Suite versions: records are grouped by suite name, then by suite hash. The hash
with the newest record (`created`) keeps the plain suite name; every older hash
becomes its own table keyed ``"<name>@<hash[:8]>"`` (with a `LeaderboardWarning`),
so numbers made under different protocol files are never averaged together.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any

import pandas as pd

from leaderboard.records import (
    CHECKPOINTS,
    CO_KEY,
    CO_RULE_KEY,
    METRICS,
    LeaderboardWarning,
    canonical,
    created_at,
)

DECIMALS = 6
VALUE_COLUMNS = [f"{m}_{c}" for m in METRICS for c in CHECKPOINTS] + ["gap_pgd20", "gap_autoattack"]
COLUMNS = (
    ["suite", "row", "row_name", "model", "method", "defenses"]
    + [f"{v}_{s}" for v in VALUE_COLUMNS for s in ("mean", "std")]
    + ["best_epoch_mean", "epochs", "n_seeds", "seeds_expected", "seeds",
       "seconds_per_epoch_mean", "passes_mean", "cost_vs_base", "passes_vs_base", "cost_base",
       "pretraining_seconds_mean", "extra_pretraining", "flags", "run_ids"]
)
# catastrophic overfitting, only in the tables of suites with CO data (see `has_co_data`):
# seeds flagged, seeds whose record was checked, earliest flagged epoch
CO_COLUMNS = ["co_seeds", "co_checked", "co_epoch_min"]


def _num(value: Any) -> float:
    """A finite number as float, anything else (None, strings, bools) as NaN."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def config_key(spec: dict) -> str:
    """A run spec without its seed and suite: what makes one leaderboard row."""
    return canonical({k: v for k, v in spec.items() if k not in ("seed", "suite")})


def split_by_suite(records: list[dict]) -> dict[str, list[dict]]:
    """Group records by suite key; see the module docstring for how hashes are kept apart."""
    by_name: dict[str, dict[str, list[dict]]] = {}
    for rec in records:
        suite = rec["suite"]
        by_name.setdefault(suite["name"], {}).setdefault(suite["hash"], []).append(rec)
    out: dict[str, list[dict]] = {}
    for name in sorted(by_name):
        hashes = by_name[name]
        order = sorted(hashes, reverse=True,
                       key=lambda h: (max(created_at(r) for r in hashes[h]), len(hashes[h]), h))
        out[name] = hashes[order[0]]
        for old in order[1:]:
            key = f"{name}@{old[:8]}"
            warnings.warn(
                f"suite {name!r}: {len(hashes[old])} record(s) were made under an older suite file "
                f"(hash {old[:12]}, newest is {order[0][:12]}); listed apart as {key!r}, "
                "not averaged with the current suite", LeaderboardWarning, stacklevel=3)
            out[key] = hashes[old]
    return out


def deduplicate(records: list[dict]) -> list[dict]:
    """Keep one record per (suite hash, run spec incl. seed): the newest, else the first by path."""
    kept: dict[str, dict] = {}
    for rec in records:
        key = canonical([rec["suite"]["hash"], rec["spec"]])
        if key not in kept:
            kept[key] = rec
            continue
        keep, drop = sorted([kept[key], rec], key=created_at, reverse=True)
        warnings.warn(
            f"duplicate run {rec['row_name']} seed {rec['spec']['seed']} "
            f"(suite {rec['suite']['name']}): keeping {keep.get('_path', keep['run_id'])}, "
            f"ignoring {drop.get('_path', drop['run_id'])}", LeaderboardWarning, stacklevel=3)
        kept[key] = keep
    return list(kept.values())


def warn_mixed_co_rules(key: str, records: list[dict]) -> None:
    """Warn when a suite's CO verdicts come from different versions of the detector rule
    (`catastrophic_overfitting_rule`; absent in records older than the versioning), so
    that no column silently mixes verdicts made under different rules."""
    checked = [r for r in records if _has_fgsm_curve(r)]
    versions = {r.get(CO_RULE_KEY) for r in checked}
    if len(versions) < 2:
        return
    counts = ", ".join(
        f"{sum(r.get(CO_RULE_KEY) == v for r in checked)} with "
        f"{'no rule version' if v is None else f'rule v{v}'}"
        for v in sorted(versions, key=lambda v: (v is not None, v)))
    warnings.warn(
        f"suite {key!r}: catastrophic-overfitting verdicts were made under different detector "
        f"rules ({counts}); run `robench recheck-co --results <results folder>` to re-apply "
        "the current rule to every record from its stored curves", LeaderboardWarning,
        stacklevel=3)


def prepare(records: list[dict]) -> dict[str, list[dict]]:
    """Split records by suite key, then deduplicate each group (warning about mixed CO
    rule versions)."""
    groups = {key: deduplicate(recs) for key, recs in split_by_suite(records).items()}
    for key, recs in groups.items():
        warn_mixed_co_rules(key, recs)
    return groups


def _defenses_text(spec: dict) -> str:
    parts = []
    for d in spec.get("defenses", []):
        params = d.get("params") or {}
        inner = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
        parts.append(f"{d.get('name', '?')}({inner})" if inner else str(d.get("name", "?")))
    return "; ".join(parts)


def row_labels(records: list[dict]) -> dict[str, str]:
    """Map config key -> row label; configs sharing a row_name get their parameters appended."""
    specs = {config_key(r["spec"]): r for r in records}
    names = {cfg: rec["row_name"] for cfg, rec in specs.items()}
    labels = {}
    for cfg, name in names.items():
        if list(names.values()).count(name) == 1:
            labels[cfg] = name
        else:
            labels[cfg] = f"{name} ({_defenses_text(specs[cfg]['spec']) or 'no params'})"
    clashes = {label for label in labels.values() if list(labels.values()).count(label) > 1}
    for cfg, label in labels.items():
        if label in clashes:  # parameters alone don't tell them apart: add a short spec hash
            labels[cfg] = f"{label} #{hashlib.sha256(cfg.encode()).hexdigest()[:6]}"
    return labels


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


def _has_fgsm_curve(rec: dict) -> bool:
    """The record carries the FGSM curve the CO detector reads (a CO-checked run)."""
    return "val_fgsm" in ((rec.get("history") or {}).get("curves") or {})


def has_co_data(records: list[dict]) -> bool:
    """True when a suite's table gets the CO columns: some record flags catastrophic
    overfitting, or some record carries the FGSM curve (`val_fgsm`) the detector uses."""
    return any(rec.get(CO_KEY) is not None or _has_fgsm_curve(rec) for rec in records)


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


def run_rows(rec: dict, label: str, clock: str = "wall") -> list[dict]:
    """One flat row per evaluated model of one run (one seed). The cost columns count the
    extra pretraining: `cost_per_epoch` adds its seconds spread over the run's epochs,
    `passes` adds its passes."""
    spec, cost, hist = rec["spec"], rec.get("cost") or {}, rec.get("history") or {}
    pre, pre_passes, extras = _pretraining(rec)
    epochs = _num(hist.get("epochs"))
    per_epoch = _seconds_per_epoch(rec, clock)
    amortised = pre / epochs if pre > 0 and epochs > 0 else 0.0
    base = {
        "config": config_key(spec), "row_name": rec["row_name"], "method": spec["method"],
        "defenses": _defenses_text(spec), "seed": spec["seed"], "run_id": rec["run_id"],
        "best_epoch": _num(hist.get("best_epoch")), "epochs": epochs,
        "seconds_per_epoch": per_epoch, "cost_per_epoch": per_epoch + amortised,
        "passes": (_num(cost.get("forward_passes")) + _num(cost.get("backward_passes"))
                   + (pre_passes if pre_passes > 0 else 0.0)),
        "pretraining_seconds": pre, "extra": extras,
    }
    rows = []
    for model, per_ckpt in rec["metrics"].items():
        trained = model == "model"  # the curves (so the CO check) are the trained model's
        row = dict(base, model=model,
                   row=label if trained else f"{label} [{model}]",
                   co_checked=trained and CO_KEY in rec,
                   co_epoch=_co_epoch(rec) if trained else math.nan,
                   flags=[str(f.get("check", "?")) for f in rec.get("flags") or []
                          if isinstance(f, dict) and f.get("model") in (None, model)])
        for metric in METRICS:
            for ckpt in CHECKPOINTS:
                row[f"{metric}_{ckpt}"] = _num(per_ckpt[ckpt].get(metric))
        row["gap_pgd20"] = row["pgd20_best"] - row["pgd20_last"]
        row["gap_autoattack"] = row["autoattack_best"] - row["autoattack_last"]
        rows.append(row)
    return rows


def _unique(lists: pd.Series) -> str:
    seen: dict[str, None] = {}
    for items in lists:
        seen.update(dict.fromkeys(items))
    return ", ".join(sorted(seen))


def _extra_text(grp: pd.DataFrame) -> str:
    """'clean model (standard training, 200 epochs) (1234 s)': what, and its mean seconds."""
    what = _unique(grp["extra"])
    seconds = grp["pretraining_seconds"].mean()
    if not what or not seconds > 0:
        return what
    return f"{what} ({seconds:.0f} s)" if seconds >= 10 else f"{what} ({seconds:.1f} s)"


# The base row the cost columns divide by: plain PGD-AT where the suite has it, otherwise
# the first plain method of this list that it has (FGSM-RS on the single-step suites).
BASE_METHODS = ("at", "trades", "fgsm_rs", "n_fgsm", "standard")


def _base_row(table: pd.DataFrame) -> pd.Series | None:
    plain = table[(table["defenses"].map(lambda d: not d)) & (table["model"] == "model")]
    for method in BASE_METHODS:
        rows = plain[plain["method"].astype(str).str.lower() == method]
        if len(rows):
            return rows.iloc[0]
    return None


def suite_table(key: str, records: list[dict]) -> pd.DataFrame:
    """Aggregate one suite's (deduplicated) records into its leaderboard table."""
    labels = row_labels(records)
    clock = "cpu" if has_cpu_clock(records) else "wall"
    runs = pd.DataFrame(
        [r for rec in records for r in run_rows(rec, labels[config_key(rec["spec"])], clock)])
    newest = max(records, key=created_at)
    expected = len(newest["suite"].get("seeds") or [])
    rows = []
    for (_, _), grp in runs.groupby(["config", "model"], sort=False):
        first = grp.iloc[0]
        n = int(grp["seed"].nunique())
        row = {"suite": key, "row": first["row"], "row_name": first["row_name"],
               "model": first["model"], "method": first["method"], "defenses": first["defenses"]}
        for col in VALUE_COLUMNS:
            row[f"{col}_mean"] = grp[col].mean()
            row[f"{col}_std"] = grp[col].std(ddof=1)
        epochs = grp["epochs"].dropna().unique()
        row.update(
            best_epoch_mean=grp["best_epoch"].mean(),
            epochs=float(epochs[0]) if len(epochs) == 1 else math.nan,
            n_seeds=n, seeds_expected=expected,
            seeds=f"{n}/{expected}" + (" ⚠" if n < expected else "") if expected else str(n),
            seconds_per_epoch_mean=grp["seconds_per_epoch"].mean(),
            cost_per_epoch_mean=grp["cost_per_epoch"].mean(),
            passes_mean=grp["passes"].mean(),
            pretraining_seconds_mean=grp["pretraining_seconds"].mean(),
            extra_pretraining=_extra_text(grp), flags=_unique(grp["flags"]),
            run_ids=",".join(sorted(grp["run_id"])),
            co_seeds=int(grp["co_epoch"].notna().sum()), co_checked=int(grp["co_checked"].sum()),
            co_epoch_min=grp["co_epoch"].min())
        rows.append(row)
    table = pd.DataFrame(rows)
    base = _base_row(table)
    if base is not None:
        table["cost_vs_base"] = table["cost_per_epoch_mean"] / base["cost_per_epoch_mean"]
        table["passes_vs_base"] = table["passes_mean"] / base["passes_mean"]
        table["cost_base"] = base["row"]
    else:
        table["cost_vs_base"] = table["passes_vs_base"] = math.nan
        table["cost_base"] = ""
    table["_sort"] = table["autoattack_last_mean"].fillna(table["pgd20_last_mean"])
    table = table.sort_values(["_sort", "row"], ascending=[False, True], na_position="last")
    table = table[COLUMNS + (CO_COLUMNS if has_co_data(records) else [])].reset_index(drop=True)
    floats = table.select_dtypes("float").columns
    table[floats] = table[floats].round(DECIMALS)  # drop float noise such as 1e-17 stds
    table.attrs.update(_suite_meta(key, records, newest))
    return table


def _suite_meta(key: str, records: list[dict], newest: dict) -> dict:
    suite = newest["suite"]
    used = {d.get("name") for r in records for d in r["spec"].get("defenses", [])}
    cards: dict[str, dict] = {}
    for rec in sorted(records, key=created_at):  # newest card wins
        cards.update({k: v for k, v in (rec.get("cards") or {}).items()
                      if k in used and isinstance(v, dict)})
    return {"key": key, "name": suite["name"], "hash": suite["hash"],
            "description": suite.get("description", ""), "seeds": list(suite.get("seeds") or []),
            "cards": dict(sorted(cards.items())), "n_records": len(records),
            "current": "@" not in key}


def compile_tables(records: list[dict]) -> dict[str, pd.DataFrame]:
    """One leaderboard table per suite key (see the module docstring), in key order.

    Suite metadata (name, hash, description, seeds, cards) sits in each table's `attrs`.
    """
    return {key: suite_table(key, recs) for key, recs in prepare(records).items()}
