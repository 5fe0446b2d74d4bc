"""`robench verify RESULTS [--reevaluate K]`: check a results folder without trusting it.

For every `record.json` below RESULTS: the record follows the schema (fractions in [0, 1],
counts > 0, required fields, every number equal to its own per-image results), and each
checkpoint it scored is the file in its folder (sha256). With `--reevaluate K`, K of the
valid records (drawn at random with `--seed`) are evaluated again from their checkpoints,
in this process (which never imports defense code), with the record's thread count, into
a scratch folder; their metrics, per-image results and flags must equal the record's
(bit for bit on CPU). Exit status 0 when everything holds, 2 otherwise.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from bench.config import ConfigError, load_suite
from bench.records import RecordError, validate_record
from bench.runner import check_record_checkpoints
from leaderboard.records import RECORD_NAME, how_to_make_records

COPIED = ("spec.json", "history.jsonl")
LINKED = ("best.pt", "last.pt")


def check_one(path: Path) -> dict:
    """Validate one record and its checkpoints; returns the record (RecordError if not)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path}: unreadable: {exc}") from exc
    validate_record(record, str(path))
    check_record_checkpoints(record, path.parent)
    return record


def comparable(record: dict) -> dict:
    """What a re-evaluation must reproduce exactly."""
    flags = sorted((f["check"], f["level"], f["model"], f["checkpoint"], f["message"])
                   for f in record["flags"])
    return {"metrics": record["metrics"], "per_image": record["per_image"], "flags": flags,
            "curve_recheck": record.get("curve_recheck")}


def differences(a: object, b: object, where: str = "") -> list[str]:
    """Paths at which two JSON-like values differ (first few)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in one" for k in sorted(set(a) ^ set(b), key=str)]
        for key in sorted(set(a) & set(b), key=str):
            out += differences(a[key], b[key], f"{where}.{key}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def reevaluate_record(path: Path, record: dict, data_root: str | None,
                      device: str | None) -> list[str]:
    """Evaluate the run of `record` again (scratch folder) and list what differs."""
    import torch

    from bench.curves import pick_device
    from bench.data import build_splits
    from bench.evaluate import evaluate_run

    suite_name = record["suite"]["name"]
    try:
        suite = load_suite(suite_name)
    except ConfigError as exc:
        raise RecordError(f"{path}: cannot re-evaluate: {exc}") from exc
    if suite.protocol_hash != record["suite"]["hash"]:
        raise RecordError(f"{path}: cannot re-evaluate: the installed suite file "
                          f"{suite_name!r} has another protocol hash than the record's")
    threads = record["evaluation"].get("threads")
    before = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="robench-verify-") as scratch:
        run_dir = Path(scratch) / path.parent.name
        run_dir.mkdir()
        for name in COPIED:
            shutil.copy2(path.parent / name, run_dir / name)
        for name in LINKED:
            (run_dir / name).symlink_to((path.parent / name).resolve())
        splits = build_splits(suite.data, data_root, suite.curves.size, with_test=True)
        try:
            if threads:
                torch.set_num_threads(int(threads))
            again = evaluate_run(run_dir, suite, splits, device=pick_device(device),
                                 progress=False)
        finally:
            torch.set_num_threads(before)
    return differences(comparable(record), comparable(again))


def verify_results(results: Path, reevaluate: int = 0, seed: int = 0,
                   data_root: str | None = None, device: str | None = None) -> int:
    paths = sorted(Path(results).rglob(RECORD_NAME)) if Path(results).is_dir() else []
    if not paths:
        raise RecordError(how_to_make_records(Path(results)))
    valid: list[tuple[Path, dict]] = []
    failed = 0
    for path in paths:
        try:
            valid.append((path, check_one(path)))
            print(f"ok       {path}")
        except RecordError as exc:
            failed += 1
            print(f"INVALID  {exc}")
    chosen = random.Random(seed).sample(valid, min(reevaluate, len(valid))) if reevaluate else []
    mismatched = 0
    for path, record in chosen:
        print(f"re-evaluating {path} ...", flush=True)
        try:
            diff = reevaluate_record(path, record, data_root, device)
        except RecordError as exc:
            mismatched += 1
            print(f"FAILED   {exc}")
            continue
        if diff:
            mismatched += 1
            print(f"DIFFERS  {path}: " + "; ".join(diff[:5])
                  + (f" (+{len(diff) - 5} more)" if len(diff) > 5 else ""))
        else:
            print(f"same     {path}: every metric, per-image result and flag reproduced")
    print(f"{len(paths)} record(s): {len(valid)} valid, {failed} invalid"
          + (f"; {len(chosen)} re-evaluated, {len(chosen) - mismatched} reproduced exactly"
             if chosen else ""))
    return 0 if not failed and not mismatched else 2
