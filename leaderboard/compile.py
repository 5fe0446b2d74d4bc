"""Compile run records into the leaderboard: Markdown, CSV, JSON and curve plots.

    python -m leaderboard.compile --results results --out leaderboard_out

Reads plain `record.json` files only; imports neither torch nor `bench`/`defenses`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from leaderboard.markdown import render_markdown
from leaderboard.plots import plot_groups
from leaderboard.records import (
    LeaderboardWarning,
    RecordsNotFoundError,
    load_records,
)
from leaderboard.tables import COLUMNS, compile_tables, prepare, suite_table

__all__ = [
    "LeaderboardWarning", "RecordsNotFoundError", "load_records", "compile_tables",
    "plot_curves", "write_leaderboard", "main",
]


def plot_curves(records: list[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per suite key: mean validation (solid) and train (dashed) robust accuracy."""
    return plot_groups(prepare(records), out_dir)


def all_rows(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All suites' rows in one frame (first column `suite`); metrics stay fractions."""
    if not tables:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(list(tables.values()), ignore_index=True)


def _json_document(tables: dict[str, pd.DataFrame]) -> dict:
    rows = json.loads(all_rows(tables).to_json(orient="records", force_ascii=False))
    return {"schema": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "suites": {key: dict(t.attrs) for key, t in tables.items()}, "rows": rows}


def write_leaderboard(results_dir: str | Path, out_dir: str | Path,
                      plots: bool = True) -> list[Path]:
    """Compile every record under `results_dir`; write leaderboard.md/.csv/.json (+ PNGs).

    Returns the written paths: Markdown, CSV, JSON, then one curves PNG per suite key.
    """
    records = load_records(results_dir)
    groups = prepare(records)
    tables = {key: suite_table(key, recs) for key, recs in groups.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv, js = out / "leaderboard.md", out / "leaderboard.csv", out / "leaderboard.json"
    md.write_text(render_markdown(tables, source=str(results_dir)), encoding="utf-8")
    all_rows(tables).to_csv(csv, index=False)
    js.write_text(json.dumps(_json_document(tables), indent=2, ensure_ascii=False) + "\n",
                  encoding="utf-8")
    paths = [md, csv, js]
    if plots:
        paths += plot_groups(groups, out)
    return paths


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """Print a warning as one plain line on stderr (CLI use)."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m leaderboard.compile --results DIR --out DIR [--no-plots]`."""
    parser = argparse.ArgumentParser(prog="python -m leaderboard.compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="folder searched for record.json")
    parser.add_argument("--out", default="leaderboard_out", help="where the leaderboard goes")
    parser.add_argument("--no-plots", action="store_true", help="skip the curve PNGs")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", LeaderboardWarning)
        warnings.showwarning = _show_warning
        try:
            paths = write_leaderboard(args.results, args.out, plots=not args.no_plots)
        except RecordsNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
