"""The cost column's measured ratios: `results/<suite>/cost.json`, written by `robench cost`
(`bench/cost.py`), which times every row side by side in one process so that the
machine's load cancels out.

A cost file applies to the table of the suite version it was measured under (same
protocol hash). Its rows are matched to the table's rows by the same key that makes a
leaderboard row (method, defenses, their effective parameters, run hash): a row it does
not cover gets no ratio ("–") rather than one from another source. Without a cost file
for the current version, the column falls back to the runs' own seconds.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from leaderboard.grouping import row_key
from leaderboard.records import LeaderboardWarning

COST_FILE = "cost.json"
FORMAT = 1


def _problem(doc: object) -> str | None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return f"not a cost file of format {FORMAT}"
    if not isinstance(doc.get("suite"), str) or not isinstance(doc.get("protocol_hash"), str):
        return "no suite name or protocol hash"
    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows:
        return "no rows"
    for row in rows:
        ratio = row.get("ratio") if isinstance(row, dict) else None
        if (isinstance(ratio, bool) or not isinstance(ratio, int | float)
                or not math.isfinite(ratio) or ratio <= 0):
            return f"a row without a positive finite ratio ({row!r:.80})"
        if not (isinstance(row.get("spec"), dict) and isinstance(row.get("run_hash"), str)
                and isinstance(row.get("defense_params"), dict)):
            return "a row without its spec, run hash and defense parameters"
    return None


def load_costs(results_dir: str | Path) -> dict[str, dict]:
    """Suite name -> its cost document, for each valid `<suite>/cost.json` under
    `results_dir`; an invalid one is left out with a warning."""
    costs = {}
    for path in sorted(Path(results_dir).glob(f"*/{COST_FILE}")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            doc, problem = None, f"unreadable ({exc})"
        else:
            problem = _problem(doc)
        if problem:
            warnings.warn(f"{path}: left out of the cost column: {problem}; run "
                          "`robench cost` again", LeaderboardWarning, stacklevel=2)
            continue
        costs[doc["suite"]] = doc
    return costs


def measured_ratios(doc: dict | None, protocol_hash: str) -> dict[str, float] | None:
    """Row key -> measured cost ratio, or None when `doc` is not of this suite version."""
    if doc is None or doc.get("protocol_hash") != protocol_hash:
        return None
    return {row_key({"spec": row["spec"], "defense_params": row["defense_params"],
                     "suite": {"run_hash": row["run_hash"]}}): float(row["ratio"])
            for row in doc["rows"]}


def cost_source(doc: dict) -> dict:
    """What the table's legend says about where its cost column comes from."""
    return {"source": "robench cost", "created": doc.get("created"), "base": doc.get("base"),
            "device": doc.get("device"), "threads": doc.get("threads"),
            "rounds": doc.get("rounds")}
