"""Expands a suite into runs and launches them one after another on this
machine. Runs are independent and resumable: a run folder that is half-done
continues from `last.pt`, a trained but unevaluated one is only evaluated, and
a finished one (with `record.json`) is skipped."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench.config import RunSpec, Suite, check_method, load_suite
from bench.data import Splits, build_splits
from bench.engine import RunMismatchError, Trainer, pick_device
from bench.evaluate import evaluate_run
from bench.records import read_record
from defenses.base import build_defenses

DEFAULT_RESULTS = Path("results")


def run_dir_for(spec: RunSpec, results: Path) -> Path:
    return Path(results) / spec.suite / spec.run_id


_SPLITS_CACHE: dict[tuple[str, str, str | None], Splits] = {}


def splits_for(suite: Suite, data_root: str | None) -> Splits:
    key = (suite.name, suite.protocol_hash, data_root)
    if key not in _SPLITS_CACHE:
        _SPLITS_CACHE[key] = build_splits(suite.data, data_root, suite.curves.size)
    return _SPLITS_CACHE[key]


def validate_spec(spec: RunSpec, suite: Suite) -> None:
    """Fail fast on unknown methods/defenses/parameters and slot conflicts,
    before any data is loaded or any training starts."""
    check_method(spec.method)
    build_defenses(spec.defenses, spec.method, suite)


def check_record_matches(record: dict, spec: RunSpec, suite: Suite, path: Path) -> None:
    """A finished run is reused only if it was made under the same protocol and the
    same suite settings for its defenses; otherwise say so instead of mixing versions."""
    expected = suite.run_hash(spec.defense_names)
    found = record.get("suite", {}).get("run_hash")
    if found != expected:
        raise RunMismatchError(
            f"{path} was made under another version of suite {suite.name!r} or of its "
            f"settings for {spec.row_name} (run hash {str(found)[:12]} vs {expected[:12]}); "
            "move or delete that run folder to rerun it")


@dataclass
class RunResult:
    spec: RunSpec
    run_dir: Path
    record_path: Path
    seconds: float


def run_one(spec: RunSpec, results: Path = DEFAULT_RESULTS, data_root: str | None = None,
            device: str | None = None, progress: bool = True,
            suite: Suite | None = None) -> RunResult:
    """Train (or resume) and evaluate one run; returns where its record is."""
    suite = suite or load_suite(spec.suite)
    validate_spec(spec, suite)
    run_dir = run_dir_for(spec, results)
    record_path = run_dir / "record.json"
    start = time.perf_counter()
    if record_path.exists():
        record = read_record(record_path)  # validates
        check_record_matches(record, spec, suite, record_path)
        return RunResult(spec, run_dir, record_path, 0.0)
    torch_device = pick_device(device)
    splits = splits_for(suite, data_root)
    Trainer(spec, suite, splits, run_dir, device=torch_device, progress=progress).train()
    evaluate_run(run_dir, suite, splits, device=torch_device, progress=progress)
    return RunResult(spec, run_dir, record_path, time.perf_counter() - start)
