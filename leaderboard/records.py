"""Finding, parsing and validating run records (`record.json`, schema 2).

Every record is checked with `leaderboard.schema.validate_record` before it can reach a
table: one that fails is left out (with a `LeaderboardWarning`), or, in strict mode, stops
the compile with an `InvalidRecordError`. Plain JSON only: nothing here imports torch,
`bench` or `defenses`.
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from leaderboard.schema import CHECKPOINTS, METRICS, SCHEMA, SchemaError, validate_record

__all__ = [
    "CHECKPOINTS", "CO_KEY", "CO_RULE_KEY", "METRICS", "RECORD_NAME", "SCHEMA",
    "InvalidRecordError", "LeaderboardWarning", "RecordsNotFoundError", "SchemaError",
    "canonical", "created_at", "how_to_make_records", "load_records", "validate_record",
]

RECORD_NAME = "record.json"
CO_KEY = "catastrophic_overfitting"  # null, or {epoch, val_pgd, val_fgsm, ...}
CO_RULE_KEY = "catastrophic_overfitting_rule"  # version of the rule behind CO_KEY


class LeaderboardWarning(UserWarning):
    """A record was skipped, deduplicated or kept apart; the compile goes on."""


class RecordsNotFoundError(ValueError):
    """A results folder holds no usable run record."""


class InvalidRecordError(ValueError):
    """Strict mode: a record file is unreadable or breaks the schema (the message names it)."""


def how_to_make_records(results_dir: Path) -> str:
    """The hint appended to every 'no records' error."""
    return (f"no usable run records ({RECORD_NAME}) under {results_dir}. Make some with "
            f"`robench run --suite fmnist-quick ...` (records land in "
            f"results/<suite>/<run-id>/{RECORD_NAME}), then point --results at that folder.")


def read_record(path: Path) -> dict:
    """Parse and validate one record file; ValueError (SchemaError for the schema) if unusable."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    try:
        validate_record(rec)
    except (TypeError, AttributeError, KeyError, IndexError) as exc:  # shapes it did not expect
        raise ValueError(f"malformed record ({type(exc).__name__}: {exc})") from exc
    return rec


def load_records(results_dir: str | Path, strict: bool = False) -> list[dict]:
    """Read and validate every `record.json` below `results_dir` (recursively, by path).

    A file that fails to parse or breaks the schema (`leaderboard.schema.validate_record`:
    a fraction out of range, an older schema, per-image bits that disagree with the
    numbers, ...) is left out with a `LeaderboardWarning` naming the file and the problem;
    with `strict=True` it raises `InvalidRecordError` instead. Each returned dict gets a
    `_path` key (str). Raises `RecordsNotFoundError` when the folder is missing or yields
    no usable record.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise RecordsNotFoundError(f"results folder {root} does not exist; "
                                   + how_to_make_records(root))
    records, skipped = [], 0
    for path in sorted(root.rglob(RECORD_NAME)):
        try:
            rec = read_record(path)
        except ValueError as exc:  # SchemaError is a ValueError
            if strict:
                raise InvalidRecordError(f"invalid run record {path}: {exc}") from exc
            skipped += 1
            warnings.warn(f"skipping invalid run record {path}: {exc}", LeaderboardWarning,
                          stacklevel=2)
            continue
        rec["_path"] = str(path)
        records.append(rec)
    if not records:
        extra = f" ({skipped} record file(s) left out as invalid)" if skipped else ""
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
