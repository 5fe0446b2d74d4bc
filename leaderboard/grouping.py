"""Records -> suite tables and rows, before any arithmetic.

Suite versions. Records are grouped by suite name, then by protocol hash. The *current*
table of a suite (keyed by its plain name) holds the records made under the protocol of
the INSTALLED suite file (`current_hashes`: suite name -> protocol hash, by default read
from `bench.config`); records made under any other hash get their own table keyed
``"<name>@<hash[:8]>"`` (with a `LeaderboardWarning`), never averaged with the current
one. A suite name with no installed file has no current table: each of its hashes gets a
labelled ``name@hash8`` table.

Rows. A row (a `Bucket`) is one (method, defenses, EFFECTIVE defense parameters, suite run
hash) configuration: runs made under different effective settings are never averaged.
Only the seeds the suite asks for enter a row; runs with other seeds form rows of their
own, kept apart and never ranked. `leaderboard.tables` aggregates and ranks them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from leaderboard.records import CO_RULE_KEY, LeaderboardWarning, canonical, created_at

# status of a suite table
CURRENT, OTHER_VERSION, NOT_INSTALLED = "current", "other_version", "not_installed"

# ---------------------------------------------------------------------------- suite versions

def installed_suite_hashes() -> dict[str, str]:
    """Suite name -> protocol hash of every installed suite file (`bench/suites/*.toml`).

    `bench.config` is imported here, lazily (it imports only the standard library); a
    suite file that fails to load is skipped."""
    from bench.config import list_suites, load_suite

    hashes = {}
    for name in list_suites():
        try:
            hashes[name] = load_suite(name).protocol_hash
        except Exception:  # a broken suite file must not stop the leaderboard
            continue
    return hashes


@dataclass
class SuiteGroup:
    """The records of one suite name and protocol hash: one leaderboard table."""

    key: str
    name: str
    hash: str
    status: str  # CURRENT, OTHER_VERSION or NOT_INSTALLED
    current_hash: str | None  # the installed suite file's protocol hash, if any
    records: list[dict] = field(default_factory=list)

    @property
    def newest(self) -> dict:
        return max(self.records, key=created_at)

    @property
    def seeds(self) -> list[int]:
        """The seeds this table expects. The seeds are part of the protocol hash, so the
        records of one table all carry the same list (for the current table: the installed
        suite file's); the newest record's list wins should they not."""
        return list(self.newest["suite"].get("seeds") or [])


def split_by_suite(records: list[dict],
                   current_hashes: dict[str, str]) -> dict[str, SuiteGroup]:
    """Group records by suite key; see the module docstring for how hashes are kept apart."""
    by_name: dict[str, dict[str, list[dict]]] = {}
    for rec in records:
        suite = rec["suite"]
        by_name.setdefault(suite["name"], {}).setdefault(suite["hash"], []).append(rec)
    out: dict[str, SuiteGroup] = {}
    for name in sorted(by_name):
        hashes = by_name[name]
        current = current_hashes.get(name)
        order = sorted(hashes, reverse=True, key=lambda h: (
            h == current, max(created_at(r) for r in hashes[h]), len(hashes[h]), h))
        if current is None:
            keys = [f"{name}@{h[:8]}" for h in order]
            warnings.warn(
                f"suite {name!r} has no installed suite file: its records are listed by "
                f"protocol hash ({', '.join(map(repr, keys))}), none as the current table",
                LeaderboardWarning, stacklevel=3)
        for h in order:
            if h == current:
                out[name] = SuiteGroup(name, name, h, CURRENT, current, hashes[h])
                continue
            key = f"{name}@{h[:8]}"
            if current is not None:
                warnings.warn(
                    f"suite {name!r}: {len(hashes[h])} record(s) were made under another "
                    f"version of the suite file (protocol hash {h[:12]}; the installed file "
                    f"has {current[:12]}); listed apart as {key!r}, not comparable with the "
                    "current table", LeaderboardWarning, stacklevel=3)
            out[key] = SuiteGroup(key, name, h, OTHER_VERSION if current else NOT_INSTALLED,
                                  current, hashes[h])
    return out


# ---------------------------------------------------------------------------------- rows

def defense_names(rec: dict) -> list[str]:
    return [d["name"] for d in rec["spec"].get("defenses", [])]


def row_key(rec: dict) -> str:
    """What makes one leaderboard row: method, defenses (in order), their effective
    parameters and the suite's run hash (protocol + the suite's settings for them)."""
    return canonical({"method": rec["spec"]["method"], "defenses": defense_names(rec),
                      "params": rec["defense_params"], "run_hash": rec["suite"]["run_hash"]})


def deduplicate(key: str, records: list[dict]) -> list[dict]:
    """Keep one record per (row key, seed): the newest, else the first by path."""
    kept: dict[str, dict] = {}
    for rec in records:
        dup = canonical([row_key(rec), rec["spec"]["seed"]])
        if dup not in kept:
            kept[dup] = rec
            continue
        keep, drop = sorted([kept[dup], rec], key=created_at, reverse=True)
        warnings.warn(
            f"duplicate run {rec['row_name']} seed {rec['spec']['seed']} (suite {key}): "
            f"keeping {keep.get('_path', keep['run_id'])}, ignoring "
            f"{drop.get('_path', drop['run_id'])}", LeaderboardWarning, stacklevel=3)
        kept[dup] = keep
    return list(kept.values())


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def params_text(rec: dict) -> str:
    """'awp(gamma=0.01); fomo(rho=0.1, ...)': the effective parameters of each defense."""
    parts = []
    for name in defense_names(rec):
        params = rec["defense_params"].get(name) or {}
        inner = ", ".join(f"{k}={_value_text(v)}" for k, v in sorted(params.items()))
        parts.append(f"{name}({inner})" if inner else name)
    return "; ".join(parts)


_MISSING = object()


def _param(rec: dict, defense: str, param: str) -> Any:
    return (rec["defense_params"].get(defense) or {}).get(param, _MISSING)


def _differing_params(configs: list[dict]) -> list[tuple[str, str]]:
    """(defense, parameter) pairs whose effective value is not the same in all configs."""
    pairs: dict[tuple[str, str], None] = {}
    for rec in configs:
        for name in defense_names(rec):
            for param in sorted(rec["defense_params"].get(name) or {}):
                pairs.setdefault((name, param))
    differing = []
    for name, param in pairs:
        values = {"<absent>" if (v := _param(rec, name, param)) is _MISSING else canonical(v)
                  for rec in configs}
        if len(values) > 1:
            differing.append((name, param))
    return differing


def row_labels(records: list[dict]) -> dict[str, str]:
    """Map row key -> label. Rows sharing a row_name are told apart by the effective
    parameters that differ between them (`AT+AWP (gamma=0.005)`), or by their run hash
    (`AT+AWP #1a2b3c`) when the parameters are the same."""
    configs = {row_key(r): r for r in records}
    by_name: dict[str, list[str]] = {}
    for key, rec in configs.items():
        by_name.setdefault(rec["row_name"], []).append(key)
    labels: dict[str, str] = {}
    for name, keys in by_name.items():
        if len(keys) == 1:
            labels[keys[0]] = name
            continue
        differing = _differing_params([configs[k] for k in keys])
        counts = Counter(param for _, param in differing)
        for key in keys:
            parts = []
            for defense, param in differing:
                value = _param(configs[key], defense, param)
                shown = param if counts[param] == 1 else f"{defense}.{param}"
                parts.append(f"{shown}={'–' if value is _MISSING else _value_text(value)}")
            labels[key] = f"{name} ({', '.join(parts)})" if parts else name
    clashes = Counter(labels.values())
    for key, label in labels.items():
        if clashes[label] > 1:  # same effective parameters: the suite settings differ
            labels[key] = f"{label} #{configs[key]['suite']['run_hash'][:6]}"
    clashes = Counter(labels.values())
    for key, label in labels.items():
        if clashes[label] > 1:  # last resort (e.g. the same run hash prefix)
            labels[key] = f"{label}/{hashlib.sha256(key.encode()).hexdigest()[:6]}"
    return labels


@dataclass
class Bucket:
    """The runs averaged into one row (with its sub-rows): one configuration, and either
    the seeds the suite asks for (`official`) or the others."""

    key: str
    label: str
    official: bool
    records: list[dict]

    @property
    def seeds(self) -> list[int]:
        return sorted(r["spec"]["seed"] for r in self.records)

    @property
    def row(self) -> str:
        if self.official:
            return self.label
        seeds = self.seeds
        return f"{self.label} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"


def buckets(group: SuiteGroup) -> list[Bucket]:
    """The rows of a suite table (official ones first), before aggregation."""
    expected = set(group.seeds)
    labels = row_labels(group.records)
    out: dict[tuple[bool, str], Bucket] = {}
    for rec in group.records:
        official = not expected or rec["spec"]["seed"] in expected
        key = row_key(rec)
        out.setdefault((official, key), Bucket(key, labels[key], official, [])).records.append(rec)
    return sorted(out.values(), key=lambda b: (not b.official, b.label))


def warn_mixed_provenance(key: str, bucket: Bucket) -> None:
    """Warn when the seeds of one row were made from different defense source files
    (provenance.defense_sources sha256) or different git commits."""
    sources: dict[str, set[str]] = {}
    commits: set[str] = set()
    for rec in bucket.records:
        prov = rec.get("provenance") or {}
        for name, info in (prov.get("defense_sources") or {}).items():
            if isinstance(info, dict) and isinstance(info.get("sha256"), str):
                sources.setdefault(name, set()).add(info["sha256"])
        if isinstance(prov.get("git_commit"), str) and prov["git_commit"]:
            commits.add(prov["git_commit"])
    problems = [f"{len(shas)} different source files of defense {name!r}"
                for name, shas in sorted(sources.items()) if len(shas) > 1]
    if len(commits) > 1:
        problems.append(f"{len(commits)} different git commits "
                        f"({', '.join(sorted(c[:10] for c in commits))})")
    if problems:
        warnings.warn(
            f"suite {key!r}, row {bucket.row!r}: its seeds were made from "
            f"{' and '.join(problems)}; they are averaged as one row, so check that the "
            "code did not change what the runs measure", LeaderboardWarning, stacklevel=3)


def warn_mixed_co_rules(key: str, records: list[dict]) -> None:
    """Warn when a suite's CO verdicts come from different versions of the detector rule
    (`catastrophic_overfitting_rule`; absent in records older than the versioning), so
    that no column silently mixes verdicts made under different rules."""
    checked = [r for r in records if has_fgsm_curve(r)]
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


def prepare(records: list[dict],
            current_hashes: dict[str, str] | None = None) -> dict[str, SuiteGroup]:
    """Split records by suite key (`current_hashes`: None = the installed suite files),
    deduplicate each group and warn about mixed CO rule versions."""
    if current_hashes is None:
        current_hashes = installed_suite_hashes()
    groups = split_by_suite(records, current_hashes)
    for key, group in groups.items():
        group.records = deduplicate(key, group.records)
        warn_mixed_co_rules(key, group.records)
    return groups


def has_fgsm_curve(rec: dict) -> bool:
    """The record carries the FGSM curve the CO detector reads (a CO-checked run)."""
    return "val_fgsm" in ((rec.get("history") or {}).get("curves") or {})
