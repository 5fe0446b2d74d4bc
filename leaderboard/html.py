"""Leaderboard tables -> one self-contained HTML page (`leaderboard.html`).

The page works offline: its styles and its one script are inline, each suite's curves PNG
is embedded as a base64 data URI, and nothing is fetched from anywhere. It is rendered from
`PAGE` (a `string.Template`) and small fragments; every text that comes from a record
(row labels, suite descriptions, card fields, flag messages, ...) goes through `h`
(`html.escape`), and a card's link becomes a hyperlink only when it is http(s).

Per suite: the protocol (description, suite name, protocol hash, seeds), one sortable
table with one row per row of the suite's CSV table (in the CSV's order; click a header
to sort, click again to reverse; `#sort=<table id>:<column>:<asc|desc>` in the address
sorts on load), the legend (the Markdown board's, same words), the curves, the defense
cards of the suite's rows and the reproduction entries of the suite. Each sortable cell
carries its value in `data-v` (a number, or text); missing values sort last. The script
sets `data-ok="1"` on <body> when it has run without error (the browser tests read it).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from string import Template
from typing import Any

import pandas as pd

from leaderboard.markdown import (  # the Markdown board's cells and legend, same words
    DASH,
    RESOLVED,
    _img,
    base_names,
    board_legend,
    co_cell,
    interval,
    is_base_row,
    missing,
    pct,
    rank_cell,
    ratio,
)
from leaderboard.tables import PAIRED_METRICS

LEVEL_TEXT = {
    "masking": "masking: the gradients may be masked, so robust accuracy may be inflated; "
               "the row is not ranked",
    "integrity": "integrity: what the training recorded does not match the checkpoint; the "
                 "row is not ranked",
    "health": "health: the row keeps its rank but its numbers need care",
    "note": "note: shown only, it changes nothing",
}


def h(text: Any) -> str:
    """Any value as escaped HTML text (quotes too, so it is safe inside attributes)."""
    return html.escape("" if text is None else str(text), quote=True)




def prose(text: str) -> str:
    """Legend text (Markdown-ish: *emphasis*, `code`) as escaped HTML."""
    out = h(text)
    out = re.sub(r"\*([^*]+)\*", r"<em>\1</em>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _num(value: Any) -> str:
    """The data-v of a numeric cell ('' when missing: sorts last)."""
    if missing(value):
        return ""
    return repr(float(value))


def td(text: Any, value: Any = None, numeric: bool = True, cls: str = "",
       raw: str | None = None) -> str:
    """One cell: escaped `text` (or already escaped `raw` HTML) with its sort value."""
    v = _num(value) if numeric else h(value if value is not None else text)
    klass = f' class="{cls}"' if cls else ""
    return f'<td data-v="{v}"{klass}>{raw if raw is not None else h(text)}</td>'


def value_cell(row: pd.Series, col: str) -> str:
    """'42.00 ± 4.00' with its 95% t interval under it, '(k/n)' where seeds are missing."""
    mean = row[f"{col}_mean"]
    text = pct(mean, row[f"{col}_std"])
    ci = interval(row[f"{col}_ci_low"], row[f"{col}_ci_high"])
    k, n = row[f"{col}_n"], row["n_seeds"]
    if text != DASH and not missing(k) and not missing(n) and int(k) < int(n):
        text += f" ({int(k)}/{int(n)})"
    raw = h(text) + (f'<br><span class="ci">{h(ci)}</span>' if ci and text != DASH else "")
    return td(text, mean, raw=raw)


def delta_cell(row: pd.Series, metric: str) -> str:
    """The paired difference to the base row with its bootstrap interval, ✓ if resolved."""
    if is_base_row(row):
        return td("(base)", 0.0, cls="base")
    diff = row.get(f"{metric}_vs_base")
    if missing(diff):
        return td(DASH, None)
    ci = interval(row[f"{metric}_vs_base_ci_low"], row[f"{metric}_vs_base_ci_high"],
                  signed=True)
    flag = row[f"{metric}_vs_base_resolved"]
    ok = not missing(flag) and bool(flag)
    mark = (f' <span class="resolved" title="resolved at 95%: the paired interval excludes 0">'
            f"{RESOLVED}</span>") if ok else ""
    raw = f'{h(f"{100 * diff:+.2f}")}{mark}<br><span class="ci">{h(ci)}</span>'
    return td("", diff, cls="resolved-row" if ok else "", raw=raw)


def flag_messages(records: list[dict]) -> dict[tuple[str, str], dict[str, list[str]]]:
    """(run id, model) -> check -> its explanations ('level: ...; message (checkpoint)')."""
    out: dict[tuple[str, str], dict[str, list[str]]] = {}
    for rec in records:
        for f in rec.get("flags") or []:
            if not isinstance(f, dict):
                continue
            key = (str(rec.get("run_id")), str(f.get("model", "model")))
            seed = (rec.get("spec") or {}).get("seed")
            text = (f"{LEVEL_TEXT.get(str(f.get('level')), f.get('level'))}. "
                    f"Seed {seed}, checkpoint {f.get('checkpoint', '?')}: {f.get('message', '')}")
            out.setdefault(key, {}).setdefault(str(f.get("check")), []).append(text)
    return out


def flags_cell(row: pd.Series, column: str, messages: dict) -> str:
    """Each flag of the row as a span whose title (hover; click shows it too) explains it."""
    names = [n.strip() for n in str(row[column] or "").split(",") if n.strip()]
    if not names:
        return td(DASH, "", numeric=False)
    runs = [r for r in str(row["run_ids"] or "").split(",") if r]
    spans = []
    for name in names:
        texts = [t for run in runs
                 for t in messages.get((run, str(row["model"])), {}).get(name, [])]
        title = "\n".join(dict.fromkeys(texts)) or name
        spans.append(f'<span class="flag" tabindex="0" title="{h(title)}">{h(name)}</span>')
    return td(", ".join(names), ", ".join(names), numeric=False, raw=", ".join(spans))


def _rank_value(row: pd.Series) -> Any:
    return None if missing(row["rank"]) else int(row["rank"])


VALUES = (("clean last", "clean_last"), ("PGD-20 best", "pgd20_best"),
          ("PGD-20 last", "pgd20_last"), ("AA best", "autoattack_best"),
          ("AA last", "autoattack_last"), ("worst case best", "worst_case_best"),
          ("worst case last", "worst_case_last"), ("gap PGD-20", "gap_pgd20"),
          ("gap worst case", "gap_worst_case"))


def headers(table: pd.DataFrame, vs: str, base: str, co: bool) -> list[tuple[str, str]]:
    """(header text, sort type) of each column."""
    ev = table.attrs.get("evaluation") or {}
    n = ev.get("n_images", 0)
    aa = (ev.get("autoattack") or {}).get("column") or "AA"
    aa_img = _img((ev.get("autoattack") or {}).get("n_images", 0), n)
    wc_img = _img((ev.get("worst_case") or {}).get("n_images", 0), n)
    cols = [("#", "num"), ("row", "text")]
    cols += [(label.replace("AA", aa) + (aa_img if "AA" in label else "")
              + (wc_img if "worst case" in label else ""), "num") for label, _ in VALUES]
    cols += [(f"Δ worst case last vs {vs}", "num"), (f"Δ gap worst case vs {vs}", "num")]
    cols += [("CO", "num")] if co else []
    cols += [("seeds", "num"), (f"cost vs {base}", "num"), (f"passes vs {base}", "num"),
             ("flags", "text"), ("notes", "text")]
    return cols


def row_html(row: pd.Series, co: bool, messages: dict) -> str:
    cells = [td(rank_cell(row), _rank_value(row)), td(row["row"], row["row"], numeric=False)]
    cells += [value_cell(row, col) for _, col in VALUES]
    cells += [delta_cell(row, m) for m in PAIRED_METRICS]
    if co:
        cells.append(td(co_cell(row), row["co_seeds"]))
    cells += [td(row["seeds"], row["n_seeds"]), td(ratio(row["cost_vs_base"]),
                                                   row["cost_vs_base"]),
              td(ratio(row["passes_vs_base"]), row["passes_vs_base"]),
              flags_cell(row, "flags", messages), flags_cell(row, "notes", messages)]
    klass = "" if row["official"] else ' class="unofficial"'
    if str(row["row"]).startswith("↳"):
        klass = ' class="sub"'
    return f"<tr{klass}>" + "".join(cells) + "</tr>"


def table_html(table: pd.DataFrame, table_id: str, messages: dict) -> tuple[str, str]:
    """The sortable table of one suite and its legend."""
    co = "co_seeds" in table.columns
    base, vs, has_vs = base_names(table)
    head = "".join(f'<th data-type="{kind}" tabindex="0" title="click to sort">{h(text)}</th>'
                   for text, kind in headers(table, vs, base, co))
    body = "\n".join(row_html(row, co, messages) for _, row in table.iterrows())
    legend = (board_legend(table, base, vs, has_vs)
              + " ○ = a row of seeds the suite does not ask for (never ranked). Hover over or "
                "click a flag for what fired, on which seed and checkpoint.")
    table_tag = (f'<div class="scroll"><table class="board" id="{h(table_id)}">'
                 f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>")
    return table_tag, ('<details class="legend"><summary>Legend: what each column means, how '
                       f"the intervals are computed, the marks</summary><p>{prose(legend)}</p>"
                       "</details>")


def cards_html(cards: dict) -> str:
    """The defense cards of the suite's rows (from the records' stored cards)."""
    if not cards:
        return ""
    items = []
    for key, card in cards.items():
        bits = [f"<strong>{h(card.get('name', key))}</strong> (<code>{h(key)}</code>)"]
        if card.get("paper"):
            bits.append(f"<em>{h(card['paper'])}</em>"
                        + (f", {h(card['venue'])}" if card.get("venue") else ""))
        link = str(card.get("link") or "")
        if re.match(r"https?://", link):
            bits.append(f'<a href="{h(link)}">{h(link)}</a>')
        elif link:
            bits.append(h(link))
        text = " — ".join(bits)
        details = []
        for label, field in (("extra data", "extra_data"), ("reference code", "reference_code"),
                             ("notes", "notes")):
            if card.get(field):
                details.append(f"<dt>{h(label)}</dt><dd>{h(card[field])}</dd>")
        params = card.get("hyperparameters") or {}
        if params:
            listed = ", ".join(f"{k} = {v}" for k, v in params.items())
            details.append(f"<dt>hyperparameters (published)</dt><dd>{h(listed)}</dd>")
        extra = f"<dl>{''.join(details)}</dl>" if details else ""
        items.append(f'<li class="card">{text}{extra}</li>')
    return "<h3>Defenses</h3><ul class=\"cards\">" + "".join(items) + "</ul>"


def _pct(value: Any) -> str:
    return DASH if value is None else f"{value:.2f}"


def reproduction_html(doc: dict | None, key: str) -> str:
    """The reproduction entries (published number vs ROBench's) of suite `key`."""
    entries = [e for e in (doc or {}).get("entries", []) if e.get("suite") == key]
    if not entries:
        return ""
    head = ["defense", "paper row", "metric", "checkpoint (selected on)", "published",
            "row", "ROBench last", "ROBench best", "vs", "difference", "status"]
    rows = []
    for e in entries:
        matches = e.get("rows") or [None]
        for m in matches:
            cells = [e.get("card", e.get("defense")), e.get("label") or e.get("method"),
                     e.get("attack") or e.get("metric"),
                     f"{e.get('checkpoint')} ({e.get('selection')})", _pct(e.get("published")),
                     m["row"] if m else DASH, _pct(m["ours_last"]) if m else DASH,
                     _pct(m["ours_best"]) if m else DASH, e.get("compared_with") or DASH,
                     (DASH if not m or m["difference"] is None else f"{m['difference']:+.2f}"),
                     e.get("status")]
            rows.append("<tr>" + "".join(f"<td>{h(c)}</td>" for c in cells) + "</tr>")
    note = (doc or {}).get("best_checkpoint_note", "")
    return ("<h3>Reproduction</h3><div class=\"scroll\"><table class=\"repro\"><thead><tr>"
            + "".join(f"<th>{h(c)}</th>" for c in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div>"
            + f'<p class="legend">In percent; difference = ROBench − published. {h(note)}.</p>')


def curves_html(path: Path | None, key: str) -> str:
    if path is None or not path.is_file():
        return '<p class="legend">No curves for this suite (no run recorded them, or the ' \
               "board was compiled without plots).</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<h3>Curves</h3><img class="curves" alt="{h(key)}: train (dashed) vs validation '
            f'robust accuracy per row" src="data:image/png;base64,{data}">')


def suite_html(index: int, table: pd.DataFrame, curves: Path | None, messages: dict,
               repro: dict | None) -> str:
    meta = table.attrs
    key = str(meta.get("key", meta.get("name", "?")))
    seeds = meta.get("seeds") or []
    protocol = (f"Suite <code>{h(meta.get('name'))}</code>, protocol hash "
                f"<code title=\"{h(meta.get('hash', ''))}\">{h(str(meta.get('hash', ''))[:12])}"
                f"</code>, status {h(meta.get('status', 'current'))}, seeds expected: "
                f"{h(', '.join(map(str, seeds)) or 'none listed')} ({len(seeds)}); "
                f"{h(meta.get('n_records', 0))} run record(s).")
    table_tag, legend = table_html(table, f"t{index}", messages)
    parts = [f'<section class="suite" id="suite-{index}"><h2>{h(key)}</h2>']
    if meta.get("description"):
        parts.append(f'<p class="desc">{h(str(meta["description"]).strip())}</p>')
    parts += [f'<p class="protocol">{protocol}</p>', table_tag, legend,
              curves_html(curves, key), cards_html(meta.get("cards") or {}),
              reproduction_html(repro, key), "</section>"]
    return "\n".join(p for p in parts if p)


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.6em}h2{border-bottom:2px solid #345;padding-bottom:.2em;margin-top:2em}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}
td{white-space:nowrap}td:nth-child(2),th:nth-child(2),td:nth-last-child(-n+2),th:nth-last-child(-n+2){text-align:left}
table.repro td,table.repro th{text-align:left}
th{background:#eef2f6;cursor:pointer;position:sticky;top:0}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tr.sub td{color:#555;font-style:italic}tr.unofficial td{background:#fafafa;color:#666}
.ci{color:#777;font-size:11px}.resolved{color:#060;font-weight:bold}
td.resolved-row{background:#effbef}
.flag{border-bottom:1px dotted #a00;color:#a00;cursor:help}
.flag.open::after{content:" (" attr(title) ")";color:#444;white-space:pre-wrap}
.legend{font-size:12px;color:#444;max-width:80em}summary{cursor:pointer;color:#345}
.protocol code{background:#f3f3f3}
img.curves{max-width:100%;border:1px solid #ddd}
.cards li{margin-bottom:.4em}.cards dl{margin:.2em 0 0 1em;font-size:12px}
.cards dt{display:inline;font-weight:bold}.cards dt::after{content:": "}
.cards dd{display:inline;margin:0}.cards dd::after{content:"";display:block}
"""

SCRIPT = """
(function () {
  "use strict";
  function value(row, col, type) {
    var v = row.cells[col].getAttribute("data-v");
    if (v === null || v === "") { return null; }
    return type === "num" ? parseFloat(v) : v.toLowerCase();
  }
  function sortTable(table, col, dir) {
    var th = table.tHead.rows[0].cells[col];
    var type = th.getAttribute("data-type");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (r, i) { return [value(r, col, type), i, r]; });
    keyed.sort(function (a, b) {
      if (a[0] === null || b[0] === null) {
        if (a[0] === b[0]) { return a[1] - b[1]; }
        return a[0] === null ? 1 : -1;  /* missing values last, either direction */
      }
      var c = type === "num" ? a[0] - b[0] : (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0);
      if (dir === "desc") { c = -c; }
      return c !== 0 ? c : a[1] - b[1];
    });
    keyed.forEach(function (k) { body.appendChild(k[2]); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) {
      c.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", dir === "desc" ? "descending" : "ascending");
  }
  function onHeader(event) {
    var th = event.currentTarget;
    var table = th.closest("table");
    var dir = th.getAttribute("aria-sort") === "ascending" ? "desc" : "asc";
    sortTable(table, th.cellIndex, dir);
  }
  document.querySelectorAll("table.board th").forEach(function (th) {
    th.addEventListener("click", onHeader);
    th.addEventListener("keydown", function (e) { if (e.key === "Enter") { onHeader(e); } });
  });
  document.querySelectorAll(".flag").forEach(function (f) {
    f.addEventListener("click", function () { f.classList.toggle("open"); });
  });
  var m = /sort=([A-Za-z0-9_-]+):([0-9]+)(?::(asc|desc))?/.exec(window.location.hash);
  if (m) {
    var table = document.getElementById(m[1]);
    if (table) { sortTable(table, parseInt(m[2], 10), m[3] || "asc"); }
  }
  document.body.setAttribute("data-ok", "1");
})();
"""

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ROBench leaderboard</title>
<style>$style</style>
</head>
<body>
<h1>ROBench leaderboard</h1>
<p>$summary Click a column header to sort by it (again to reverse); hover over or click a
flag for its explanation. This page is self-contained and works offline.</p>
$toc
$suites
<script>$script</script>
</body>
</html>
""")


def render_html(tables: dict[str, pd.DataFrame], curves: dict[str, Path] | None = None,
                records: list[dict] | None = None, reproduction: dict | None = None,
                source: str = "") -> str:
    """The whole page. `curves`: suite key -> its curves PNG; `records`: the records the
    tables were compiled from (their flag messages explain the flags); `reproduction`:
    the reproduction document (`leaderboard.reproduction.reproduction_document`)."""
    curves = curves or {}
    messages = flag_messages(records or [])
    n = sum(t.attrs.get("n_records", 0) for t in tables.values())
    summary = f"Compiled from {n} run record(s)" + (f" under {source}" if source else "") + "."
    toc = "<ul>" + "".join(f'<li><a href="#suite-{i}">{h(key)}</a></li>'
                           for i, key in enumerate(tables)) + "</ul>"
    suites = "\n".join(suite_html(i, table, curves.get(key), messages, reproduction)
                       for i, (key, table) in enumerate(tables.items()))
    if not tables:
        suites = "<p>No suite has a usable record.</p>"
    return PAGE.substitute(style=STYLE, summary=h(summary), toc=toc, suites=suites,
                           script=SCRIPT)
