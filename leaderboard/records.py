"""Finding, parsing and checking run records (`record.json`, schema 1).

Plain JSON only: nothing here imports torch, `bench` or `defenses`.
"""

from __future__ import annotations

import json
import math
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = 1
METRICS = ("clean", "pgd20", "cw20", "autoattack")
CHECKPOINTS = ("best", "last")
RECORD_NAME = "record.json"
CO_KEY = "catastrophic_overfitting"  # optional: null, or {epoch, val_pgd, val_fgsm, ...}
CO_RULE_KEY = "catastrophic_overfitting_rule"  # optional: version of the rule behind CO_KEY


class LeaderboardWarning(UserWarning):
    """A record was skipped, deduplicated or kept apart; the compile goes on."""


class RecordsNotFoundError(ValueError):
    """A results folder holds no usable run record."""


def _is_number_or_null(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_record(rec: Any) -> None:
    """Raise ValueError naming the first problem that makes `rec` unusable."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if rec.get("schema") != SCHEMA:
        raise ValueError(f"unsupported schema {rec.get('schema')!r} (this compiler reads {SCHEMA})")
    for key, kind in (("run_id", str), ("row_name", str), ("spec", dict), ("suite", dict),
                      ("metrics", dict)):
        if not isinstance(rec.get(key), kind):
            raise ValueError(f"missing or malformed {key!r} (expected {kind.__name__})")
    spec, suite = rec["spec"], rec["suite"]
    if not isinstance(spec.get("method"), str):
        raise ValueError("spec.method missing")
    if not isinstance(spec.get("seed"), int) or isinstance(spec.get("seed"), bool):
        raise ValueError("spec.seed missing or not an integer")
    defenses = spec.get("defenses", [])
    if not isinstance(defenses, list) or not all(
            isinstance(d, dict) and isinstance(d.get("name"), str)
            and isinstance(d.get("params", {}), dict) for d in defenses):
        raise ValueError("spec.defenses is not a list of {name, params} objects")
    if not isinstance(suite.get("name"), str) or not isinstance(suite.get("hash"), str):
        raise ValueError("suite.name or suite.hash missing")
    if not isinstance(suite.get("seeds", []), list):
        raise ValueError("suite.seeds is not a list")
    if not rec["metrics"]:
        raise ValueError("metrics is empty")
    for model, per_ckpt in rec["metrics"].items():
        if not isinstance(per_ckpt, dict):
            raise ValueError(f"metrics[{model!r}] is not an object")
        for ckpt in CHECKPOINTS:
            values = per_ckpt.get(ckpt)
            if not isinstance(values, dict):
                raise ValueError(f"metrics[{model!r}][{ckpt!r}] missing")
            for metric in METRICS:
                if not _is_number_or_null(values.get(metric)):
                    raise ValueError(f"metrics[{model!r}][{ckpt!r}][{metric!r}] is not a number "
                                     f"or null: {values.get(metric)!r}")
    for key in ("history", "cost", "cards"):
        if not isinstance(rec.get(key, {}), dict):
            raise ValueError(f"{key!r} is not an object")
    for key in ("flags", "extra_pretraining"):
        if not isinstance(rec.get(key, []), list):
            raise ValueError(f"{key!r} is not a list")
    co = rec.get(CO_KEY)
    if co is not None and not (isinstance(co, dict) and isinstance(co.get("epoch"), int)
                               and not isinstance(co.get("epoch"), bool)):
        raise ValueError(f"{CO_KEY!r} is neither null nor an object with an integer 'epoch'")


def how_to_make_records(results_dir: Path) -> str:
    """The hint appended to every 'no records' error."""
    return (f"no usable run records ({RECORD_NAME}) under {results_dir}. Make some with "
            f"`robench run --suite fmnist-quick ...` (records land in "
            f"results/<suite>/<run-id>/{RECORD_NAME}), then point --results at that folder.")


def load_records(results_dir: str | Path) -> list[dict]:
    """Read every `record.json` below `results_dir` (recursively, sorted by path).

    A file that fails to parse or validate is skipped with a `LeaderboardWarning`
    naming the file and the problem. Each returned dict gets a `_path` key (str).
    Raises `RecordsNotFoundError` when the folder is missing or yields no record.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise RecordsNotFoundError(f"results folder {root} does not exist; "
                                   + how_to_make_records(root))
    records, skipped = [], 0
    for path in sorted(root.rglob(RECORD_NAME)):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            validate_record(rec)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            skipped += 1
            warnings.warn(f"skipping {path}: {exc}", LeaderboardWarning, stacklevel=2)
            continue
        rec["_path"] = str(path)
        records.append(rec)
    if not records:
        extra = f" ({skipped} record file(s) skipped as unreadable)" if skipped else ""
        raise RecordsNotFoundError(how_to_make_records(root) + extra)
    return records


def created_at(rec: dict) -> datetime:
    """The record's `created` time (UTC); the oldest possible time when absent or unreadable."""
    raw = rec.get("created")
    try:
        when = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def canonical(obj: Any) -> str:
    """Stable JSON text of `obj` (sorted keys), for use as a grouping key."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
