"""ROBench leaderboard: compiles plain `record.json` run records into tables and plots.

Light on purpose: importing it never imports torch, `bench` or `defenses` (compiling reads
the installed suite files' protocol hashes through `bench.config`, lazily). The public
names below are loaded lazily from `leaderboard.compile` (so `python -m leaderboard.compile`
does not import that module twice).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "InvalidRecordError", "LeaderboardWarning", "RecordsNotFoundError", "compile_tables",
    "load_records", "main", "plot_curves", "write_leaderboard",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from leaderboard import compile as _compile

        return getattr(_compile, name)
    raise AttributeError(f"module 'leaderboard' has no attribute {name!r}")
