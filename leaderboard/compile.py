"""Compile run records into the leaderboard: Markdown, CSV, JSON, LaTeX, curve plots, the
reproduction table (published numbers vs ROBench's, `leaderboard.reproduction`) and one
self-contained HTML page of it all (`leaderboard.html`).

    python -m leaderboard.compile --results results --out leaderboard_out [--strict]

Reads plain `record.json` files only, each validated against the record schema
(`leaderboard.schema`): an invalid one is left out with a warning, or with --strict stops
the compile. Importing it imports neither torch nor `defenses`; compiling reads
`bench.config` (the protocol hashes of the installed suite files: which table of a suite is
the current one) and, for the reproduction table only, the registered defenses' cards
(class attributes: no defense is instantiated), both lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from leaderboard.costs import load_costs
from leaderboard.html import render_html
from leaderboard.latex import render_latex
from leaderboard.markdown import render_markdown
from leaderboard.plots import curves_file, plot_groups
from leaderboard.records import (
    InvalidRecordError,
    LeaderboardWarning,
    RecordsNotFoundError,
    load_records,
)
from leaderboard.reproduction import dump, load_cards, render_reproduction, reproduction_document
from leaderboard.tables import COLUMNS, compile_tables, prepare, suite_table

__all__ = [
    "InvalidRecordError", "LeaderboardWarning", "RecordsNotFoundError", "load_records",
    "compile_tables", "plot_curves", "write_leaderboard", "write_reproduction", "main",
]
DOCUMENT_SCHEMA = 2  # of leaderboard.json


def plot_curves(records: list[dict], out_dir: str | Path,
                current_hashes: dict[str, str] | None = None) -> list[Path]:
    """One PNG per suite key: mean validation (solid) and train (dashed) robust accuracy."""
    return plot_groups(prepare(records, current_hashes), out_dir)


def all_rows(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """All suites' rows in one frame (first column `suite`); metrics stay fractions."""
    if not tables:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(list(tables.values()), ignore_index=True)


def _json_document(tables: dict[str, pd.DataFrame]) -> dict:
    rows = json.loads(all_rows(tables).to_json(orient="records", force_ascii=False))
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"schema": DOCUMENT_SCHEMA, "created": created,
            "suites": {key: dict(t.attrs) for key, t in tables.items()}, "rows": rows}


def write_reproduction(out_dir: Path, groups: dict, tables: dict[str, pd.DataFrame],
                       cards: dict[str, dict] | None = None) -> tuple[list[Path], dict]:
    """Write reproduction.md/.json (see `leaderboard.reproduction`); return their paths and
    the document as written to the JSON file (plain values, for the HTML page). `cards`:
    registry name -> `DefenseCard.to_dict()`; None reads the registered defenses' cards.
    Cards that cannot be read leave a warning and tables that say so, never a failed
    compile."""
    error = ""
    if cards is None:
        try:
            cards = load_cards()
        except Exception as exc:  # a broken defense module must not stop the board
            error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"reproduction table without cards: {error}", LeaderboardWarning,
                          stacklevel=2)
            cards = {}
    doc = reproduction_document(cards, groups, tables, error)
    md, js = out_dir / "reproduction.md", out_dir / "reproduction.json"
    md.write_text(render_reproduction(doc), encoding="utf-8")
    text = dump(doc)
    js.write_text(text, encoding="utf-8")
    return [md, js], json.loads(text)


def write_leaderboard(results_dir: str | Path, out_dir: str | Path, plots: bool = True,
                      strict: bool = False,
                      current_hashes: dict[str, str] | None = None,
                      cards: dict[str, dict] | None = None) -> list[Path]:
    """Compile every record under `results_dir`; write leaderboard.md/.csv/.json/.tex
    (the .tex: one booktabs table per suite), the reproduction table
    reproduction.md/.json, the curve PNGs and leaderboard.html (one self-contained page:
    tables, curves inline, cards, reproduction; `leaderboard.html`).

    `strict`: an invalid record raises `InvalidRecordError` instead of being left out
    with a warning. `current_hashes`: suite name -> protocol hash of the current suite
    file (None: the installed suite files). `cards`: the defense cards the reproduction
    table lists (registry name -> `DefenseCard.to_dict()`; None: every registered
    defense). Returns the written paths: Markdown, CSV, JSON, LaTeX, reproduction Markdown
    and JSON, then one curves PNG per suite key, then the HTML page.
    """
    records = load_records(results_dir, strict=strict)
    groups = prepare(records, current_hashes)
    costs = load_costs(results_dir)
    tables = {key: suite_table(group, costs.get(group.name)) for key, group in groups.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv, js = out / "leaderboard.md", out / "leaderboard.csv", out / "leaderboard.json"
    md.write_text(render_markdown(tables, source=str(results_dir)), encoding="utf-8")
    all_rows(tables).to_csv(csv, index=False)
    js.write_text(json.dumps(_json_document(tables), indent=2, ensure_ascii=False) + "\n",
                  encoding="utf-8")
    tex = out / "leaderboard.tex"
    tex.write_text(render_latex(tables, source=str(results_dir)), encoding="utf-8")
    repro_paths, repro = write_reproduction(out, groups, tables, cards)
    paths = [md, csv, js, tex, *repro_paths]
    if plots:
        paths += plot_groups(groups, out)
    curves = {key: out / curves_file(key) for key in tables} if plots else {}
    page = out / "leaderboard.html"
    page.write_text(render_html(tables, curves, [r for g in groups.values() for r in g.records],
                                repro, source=str(results_dir)), encoding="utf-8")
    return [*paths, page]


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """Print a warning as one plain line on stderr (CLI use)."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Command line: `python -m leaderboard.compile --results DIR --out DIR [--no-plots]
    [--strict]`; exit code 2 when there is no usable record (or, strict, an invalid one)."""
    parser = argparse.ArgumentParser(prog="python -m leaderboard.compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results", help="folder searched for record.json")
    parser.add_argument("--out", default="leaderboard_out", help="where the leaderboard goes")
    parser.add_argument("--no-plots", action="store_true", help="skip the curve PNGs")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first invalid record instead of leaving it out")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("always", LeaderboardWarning)
        warnings.showwarning = _show_warning
        try:
            paths = write_leaderboard(args.results, args.out, plots=not args.no_plots,
                                      strict=args.strict)
        except (RecordsNotFoundError, InvalidRecordError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
