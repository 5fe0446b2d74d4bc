"""The reproduction table: every number a defense card publishes, next to ROBench's own
number on the suite that runs the closest protocol (`reproduction.md` / `.json`, written
beside the board by `leaderboard.compile.write_leaderboard`).

Each published entry (`defenses.card.Published`, read as plain data from
`DefenseCard.to_dict()`) names a base method, its defenses, the parameters that pick the
paper's variant and a suite (or none). Its ROBench number is the board's own: the official
row of that suite's CURRENT table whose method, defenses and effective parameters match,
its trained model, the board's mean over seeds (`leaderboard.tables`), in percent. Nothing
is recomputed here.

Which checkpoint is compared. Papers usually pick their best checkpoint on the test set;
ROBench picks it on a validation split held out of the training set, so ROBench's best and
a paper's best are different quantities. A published number is compared with ROBench's
LAST checkpoint, except a best checkpoint the paper itself selected on a validation split
(then with ROBench's best). Both of ROBench's numbers are shown either way.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from leaderboard.grouping import CURRENT, SuiteGroup, buckets, defense_names
from leaderboard.markdown import md_table
from leaderboard.tables import TRAINED

SCHEMA = 1
BOARD_METRICS = ("clean", "pgd20", "cw20", "autoattack")  # the board's per-attack columns
MEASURED = "measured"
NOT_RUN = "not run yet"
NO_SUITE = "no matching suite"
NO_METRIC = "metric not on the board"
NO_VALUE = "row has no value for this metric"  # e.g. a suite that skips AutoAttack
DECIMALS = 4  # percent; the board's fractions carry 6 decimals
BEST_NOTE = ("ROBench's best checkpoint is selected on its validation split (1k images held "
             "out of the training set); papers usually select theirs on the test set, so a "
             "paper's best is compared with ROBench's last unless the paper also selected on "
             "a validation split")


def load_cards() -> dict[str, dict]:
    """Every registered defense's card as plain data (`DefenseCard.to_dict()`), by registry
    name. Reads the class attribute `card` only: no defense is instantiated and no hook
    runs. This is the one place the leaderboard imports `defenses` (and so torch), lazily."""
    from defenses.base import list_defenses

    return {name: cls.card.to_dict() for name, cls in list_defenses().items()}


def compared_checkpoint(entry: dict) -> str:
    """The ROBench checkpoint a published number is compared with (see the module doc)."""
    if entry["checkpoint"] == "best" and entry["selection"] == "validation":
        return "best"
    return "last"


def _percent(value: Any) -> float | None:
    """A board fraction as a percentage (None for NaN / missing)."""
    if value is None or pd.isna(value):
        return None
    return round(100.0 * float(value), DECIMALS)


def params_match(rec: dict, wanted: dict) -> bool:
    """The record's effective defense parameters include every `{defense: {param: value}}`."""
    have = rec.get("defense_params") or {}
    return all((have.get(defense) or {}).get(param, object()) == value
               for defense, params in wanted.items() for param, value in params.items())


def _matching_rows(entry: dict, group: SuiteGroup, table: pd.DataFrame) -> list[dict]:
    """ROBench's numbers for `entry`: one dict per matching official row of the table."""
    metric, compared = entry["metric"], compared_checkpoint(entry)
    out = []
    for bucket in buckets(group):  # the board's own rows (same labels as the table's)
        rec = bucket.records[0]
        if not (bucket.official and rec["spec"]["method"] == entry["method"]
                and defense_names(rec) == list(entry["defenses"])
                and params_match(rec, entry["params"])):
            continue
        found = table[(table["row"] == bucket.row) & (table["model"] == TRAINED)]
        if found.empty:
            continue
        cells = found.iloc[0]
        ours = {ckpt: _percent(cells[f"{metric}_{ckpt}_mean"]) for ckpt in ("last", "best")}
        std = {ckpt: _percent(cells[f"{metric}_{ckpt}_std"]) for ckpt in ("last", "best")}
        n = {ckpt: int(cells[f"{metric}_{ckpt}_n"]) for ckpt in ("last", "best")}
        value = ours[compared]
        out.append({
            "row": bucket.row, "marks": cells["marks"], "seeds": cells["seeds"],
            "ours_last": ours["last"], "ours_last_std": std["last"], "ours_last_n": n["last"],
            "ours_best": ours["best"], "ours_best_std": std["best"], "ours_best_n": n["best"],
            "ours": value,
            "difference": None if value is None else round(value - entry["value"], DECIMALS),
        })
    return out


def reproduction_entries(cards: dict[str, dict], groups: dict[str, SuiteGroup],
                         tables: dict[str, pd.DataFrame]) -> list[dict]:
    """One item per published entry of every card (cards by registry name, in name order;
    entries in card order): the entry's fields, its status, the compared checkpoint and the
    matching rows (`groups` / `tables`: the board's, by suite key)."""
    out = []
    for name in sorted(cards):
        card = cards[name]
        for entry in card.get("published") or ():
            item = {"defense": name, "card": card.get("name", name),
                    **{k: v for k, v in entry.items() if k != "value"},
                    "defenses": list(entry["defenses"]),
                    "differences": list(entry["differences"]),
                    "published": entry["value"], "compared_with": None, "rows": []}
            suite = entry.get("suite")
            group = groups.get(suite) if suite else None
            if not suite:
                item["status"] = NO_SUITE
            elif entry["metric"] not in BOARD_METRICS:
                item["status"] = NO_METRIC
            else:
                item["compared_with"] = compared_checkpoint(entry)
                if group is not None and group.status == CURRENT:
                    item["rows"] = _matching_rows(entry, group, tables[suite])
                item["status"] = (NOT_RUN if not item["rows"] else MEASURED
                                  if any(r["ours"] is not None for r in item["rows"])
                                  else NO_VALUE)
            out.append(item)
    return out


def reproduction_document(cards: dict[str, dict], groups: dict[str, SuiteGroup],
                          tables: dict[str, pd.DataFrame], error: str = "") -> dict:
    """The content of reproduction.json (`error`: why the cards could not be read)."""
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    doc = {"schema": SCHEMA, "created": created, "units": "percent; difference = ours - "
           "published, in percentage points", "best_checkpoint_note": BEST_NOTE,
           "cards": {name: {"card": c.get("name", name), "paper": c.get("paper", ""),
                            "published_notes": c.get("published_notes") or {}}
                     for name, c in sorted(cards.items())},
           "entries": reproduction_entries(cards, groups, tables)}
    if error:
        doc["error"] = error
    return doc


def _number(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" + ("" if std is None else f" ± {std:.2f}")


def _metric_cell(item: dict) -> str:
    """'clean', 'test error', or the attack as the paper ran it ('PGD-20')."""
    if item["metric"] in ("clean", "test_error"):
        return item["metric"].replace("_", " ")
    return item["attack"] or item["metric"]


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _paper_cell(item: dict) -> str:
    bits = [item.get("label") or item["method"], item["architecture"], f"eps {item['eps']}"]
    if item.get("epochs"):
        bits.append(f"{item['epochs']} ep")
    if item.get("runs"):
        bits.append(f"{item['runs']} runs")
    return ", ".join(bits)


def render_reproduction(doc: dict) -> str:
    """reproduction.md: one table per card, then its protocol differences, numbered."""
    lines = ["# ROBench reproduction table", "",
             "Every number the defense cards publish, with ROBench's number on the suite that "
             "runs the closest protocol (the board's mean over seeds of the trained model, in "
             "percent). *Difference* = ROBench − published, in percentage points, against "
             "ROBench's checkpoint in *vs*.", "",
             f"Note: {doc['best_checkpoint_note']}.", ""]
    if doc.get("error"):
        lines += [f"**The defense cards could not be read:** {doc['error']}", ""]
    by_card: dict[str, list[dict]] = {}
    for item in doc["entries"]:
        by_card.setdefault(item["defense"], []).append(item)
    header = ["Paper row", "Metric", "Checkpoint", "Selected on", "Published", "Suite", "Row",
              "Seeds", "ROBench last", "ROBench best", "vs", "Difference", "Status",
              "Differences", "Source"]
    for name, info in doc["cards"].items():
        lines += [f"## {info['card']} (`{name}`)", ""]
        items = by_card.get(name, [])
        remarks = [f"- {key}: {text}" for key, text in
                   (info.get("published_notes") or {}).items()]
        lines += remarks + ([""] if remarks else [])
        if not items:
            lines += ["No published number on this card.", ""]
            continue
        notes: list[str] = []
        rows = []
        for item in items:
            refs = []
            for text in item["differences"]:
                if text not in notes:
                    notes.append(text)
                refs.append(str(notes.index(text) + 1))
            matches = item["rows"] or [None]
            for match in matches:
                rows.append([
                    _paper_cell(item), _metric_cell(item),
                    item["checkpoint"], item["selection"], f"{item['published']:.2f}",
                    item["suite"] or "–",
                    f"{match['row']} {match['marks']}".strip() if match else "–",
                    match["seeds"] if match else "–",
                    _number(match["ours_last"], match["ours_last_std"]) if match else "–",
                    _number(match["ours_best"], match["ours_best_std"]) if match else "–",
                    item["compared_with"] or "–",
                    _signed(match["difference"]) if match else "–",
                    item["status"], ", ".join(refs) or "–",
                    item["source"] + (f" ({item['note']})" if item.get("note") else "")])
        lines += [md_table(header, rows), ""]
        lines += [f"{i}. {text}" for i, text in enumerate(notes, 1)]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def dump(doc: dict) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
