"""Run folders and their files: atomic writes, checkpoint loading, the
`history.jsonl` curves and the `record.json` schema.

A run folder `results/<suite>/<run-id>/` holds `spec.json`, `history.jsonl`
(one line per epoch), `last.pt`, `best.pt` and, once evaluated, `record.json`.
Every file is written to a temporary name in the same folder and renamed, so a
crash never leaves a half-written file behind.
"""

from __future__ import annotations

import io
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.errors import RunMismatchError
from leaderboard.schema import SCHEMA, SchemaError

RECORD_SCHEMA = SCHEMA  # the version this ROBench writes


class RecordError(ValueError):
    """A record or run folder is missing or malformed."""


class CheckpointWriteError(RecordError):
    """A checkpoint could not be written (e.g. a full disk); the files it would have
    replaced keep their previous contents."""


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default)
    _atomic_write(path, lambda h: h.write(text.encode()))


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def atomic_torch_save(payload: dict, path: Path) -> None:
    _atomic_write(path, lambda h: torch.save(payload, h))


def serialise_checkpoint(payload: dict) -> memoryview:
    """The bytes `atomic_torch_save` writes for `payload` (torch.save into memory), so that
    one serialisation can be written to several files: a view of the buffer (no copy of
    a checkpoint's hundreds of megabytes)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getbuffer()


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically (temporary file, fsync, rename)."""
    _atomic_write(path, lambda h: h.write(data))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True` (no pickled code is executed)."""
    path = Path(path)
    if not path.exists():
        raise RecordError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise RecordError(
            f"cannot load checkpoint {path}: {exc}. Delete it to retrain that run") from exc


def write_history(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, default=_json_default) + "\n" for row in rows)
    _atomic_write(path, lambda h: h.write(text.encode()))


def read_history(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_record(path: Path) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordError(f"cannot read record {path}: {exc}") from exc
    validate_record(record, str(path))
    return record


def validate_record(record: dict, where: str = "record") -> None:
    """The record schema (`leaderboard.schema`); RecordError naming the file and field."""
    from leaderboard.schema import validate_record as validate

    try:
        validate(record)
    except SchemaError as exc:
        raise RecordError(f"{where}: {exc}") from exc


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "numpy", "pyautoattack"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "not installed"
    return versions


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


_UNSET = object()


def check_same_params(found: dict[str, dict], want: dict[str, dict], what: str,
                      remedy: str) -> None:
    """Refuse a run folder made with other defense parameters than this ROBench gives the
    run (e.g. a default changed since): one RunMismatchError line naming every change."""
    if found == want:
        return
    changes = []
    for name in sorted(set(found) | set(want)):
        old, new = found.get(name) or {}, want.get(name) or {}
        for key in sorted(set(old) | set(new)):
            if old.get(key, _UNSET) != new.get(key, _UNSET):
                changes.append(f"{name}.{key}: {old.get(key, '(unset)')!r} -> "
                               f"{new.get(key, '(unset)')!r}")
    raise RunMismatchError(f"{what} than this version of ROBench gives it "
                           f"({'; '.join(changes) or 'other defenses'}): a defense's "
                           f"defaults changed since; {remedy}")
