"""leaderboard.html: one self-contained page, every text escaped, tested in headless chromium.

The browser tests (marker `browser`) run Debian's `chromium` with `--dump-dom` (the DOM after
the page's script ran) and read the console from chromium's log; they are skipped when
chromium is not installed (`.ci/run` installs it)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from test_leaderboard import AWP, CURRENT, EMA, flag, make_record, write

from defenses.base import DefenseCard
from defenses.card import Published
from leaderboard.compile import write_leaderboard

XSS = "<script>alert(1)</script>"
EVIL = '"><img src=x onerror=alert(2)>'
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run "
    "installs it)")

# worst case last per row, by hand: each record's AutoAttack last (below its PGD-20 last of
# 0.45, and Square adds nothing), so its worst case is its AutoAttack, averaged over seeds
WC_LAST = {"AT": (0.30 + 0.32 + 0.34) / 3, "TRADES": 0.44, XSS: 0.38}


def results(root: Path) -> Path:
    """AT (3 seeds, 2 s per epoch), TRADES (3 seeds, 25 s), a row labelled with a script
    element (3 seeds, AWP, 4 s, an EMA sub-row, a masking flag whose message and card hold
    markup), a run of a seed the suite does not ask for."""
    res = root / "results"
    for seed, aa in enumerate([0.30, 0.32, 0.34]):
        write(res, make_record(seed=seed, aa_last=aa))
        write(res, make_record("TRADES", method="trades", seed=seed, aa_last=0.44, spe=25.0))
        masking = [dict(flag("pgd_below_fgsm", "masking"), message=f"PGD {EVIL} FGSM")]
        rec = make_record(XSS, defenses=AWP, seed=seed, aa_last=0.38, extra_models=EMA, spe=4.0,
                          flags=masking if seed == 1 else None)
        rec["cards"]["awp"].update(name=f"AWP {XSS}", notes=f"notes {EVIL}",
                                   link="javascript:alert(3)")
        write(res, rec)
    write(res, make_record(seed=7, aa_last=0.20))
    return res


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("html")
    out = root / "out"
    card = DefenseCard(name="AWP", paper="Toy", published=(
        Published(value=50.0, metric="autoattack", checkpoint="last", method="at",
                  defenses=("awp",), label=f"AT-AWP {XSS}", suite="quick"),)).to_dict()
    paths = write_leaderboard(results(root), out, current_hashes=CURRENT, cards={"awp": card})
    assert paths[-1] == out / "leaderboard.html"
    return out / "leaderboard.html", pd.read_csv(out / "leaderboard.csv")


class Tables(HTMLParser):
    """Rows of every `table.board`: header texts, and per row its cells' (text, data-v)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict] = {}
        self.current: dict | None = None
        self.cell: list | None = None
        self.scripts: list[dict] = []
        self.body: dict = {}
        self.in_head = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "script":
            self.scripts.append(a)
        if tag == "table" and "board" in (a.get("class") or ""):
            self.current = self.tables.setdefault(a["id"], {"head": [], "rows": []})
        elif self.current is not None:
            if tag == "thead":
                self.in_head = True
            elif tag == "tbody":
                self.in_head = False
            elif tag == "tr" and not self.in_head:
                self.current["rows"].append([])
            elif tag in ("td", "th"):
                self.cell = ["", a.get("data-v"), a]

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.current = None
        elif tag in ("td", "th") and self.cell is not None and self.current is not None:
            text = " ".join(self.cell[0].split())
            if tag == "th":
                self.current["head"].append(text)
            else:
                self.current["rows"][-1].append((text, self.cell[1], self.cell[2]))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell[0] += data


def parse(text: str) -> Tables:
    parser = Tables()
    parser.feed(text)
    return parser


def column(parsed: Tables, table: str, header: str) -> int:
    return parsed.tables[table]["head"].index(header)


def labels(parsed: Tables, table: str = "t0") -> list[str]:
    col = column(parsed, table, "row")
    return [row[col][0] for row in parsed.tables[table]["rows"]]


# --------------------------------------------------------------------- no browser needed

def test_every_text_is_escaped(page: tuple[Path, pd.DataFrame]) -> None:
    text = page[0].read_text()
    assert XSS not in text
    assert EVIL not in text
    assert 'href="javascript' not in text  # a non-http(s) card link stays plain text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # the label and the card name
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in text  # flag message and notes
    parsed = parse(text)
    assert len(parsed.scripts) == 1  # the page's own script and nothing else
    assert XSS in labels(parsed)  # the label reads back as text, not as markup
    assert "<img src=x" not in text


def test_self_contained_one_row_per_csv_row(page: tuple[Path, pd.DataFrame]) -> None:
    path, csv = page
    text = path.read_text()
    assert not re.search(r"<link|src=\"(?!data:)|url\(|@import", text)  # nothing to fetch
    assert text.count('src="data:image/png;base64,') == 1  # the quick suite's curves
    parsed = parse(text)
    assert list(parsed.tables) == ["t0"]
    assert labels(parsed) == csv["row"].tolist()  # one row per CSV row, in its order
    assert "CO" not in parsed.tables["t0"]["head"]  # no CO data in these records
    heads = parsed.tables["t0"]["head"]
    for head in ("#", "row", "worst case last", "gap worst case", "seeds", "cost vs AT",
                 "flags", "Δ worst case last vs AT"):
        assert head in heads
    rows = {r[column(parsed, "t0", "row")][0]: r for r in parsed.tables["t0"]["rows"]}
    wc = column(parsed, "t0", "worst case last")
    for label, value in WC_LAST.items():
        assert float(rows[label][wc][1]) == pytest.approx(value)
    # the masking flag explains itself on hover: level, seed, checkpoint, message
    cell = rows[XSS][column(parsed, "t0", "flags")]
    assert cell[0] == "pgd_below_fgsm"
    title = re.search(r'title="([^"]*)">pgd_below_fgsm<', text).group(1)
    assert title.startswith("masking: the gradients may be masked") and "Seed 1" in title
    assert "&lt;img src=x" in title
    assert rows[XSS][0][0] == "⚑" and rows["TRADES"][0][0] in ("1", "1–2", "1–3")
    assert rows["AT"][column(parsed, "t0", "Δ worst case last vs AT")][0] == "(base)"


def test_reproduction_table_of_the_suite(page: tuple[Path, pd.DataFrame]) -> None:
    text = page[0].read_text()
    body = text.split("<h3>Reproduction</h3>")[1].split("</table>")[0]
    cells = re.findall(r"<td>(.*?)</td>", body)
    # hand-computed: the AWP row's AutoAttack last is 38.00 on every seed; 38 - 50 = -12
    assert cells == ["AWP", "AT-AWP &lt;script&gt;alert(1)&lt;/script&gt;", "AutoAttack",
                     "last (not stated)", "50.00", "&lt;script&gt;alert(1)&lt;/script&gt;", "38.00",
                     "50.00", "last", "-12.00", "measured"]


def test_co_column_where_the_suite_has_it(tmp_path: Path) -> None:
    res = tmp_path / "results"
    for seed in (0, 1, 2):
        rec = make_record(seed=seed)
        rec["catastrophic_overfitting"] = {"epoch": 5 + seed} if seed else None
        write(res, rec)
    write_leaderboard(res, tmp_path / "out", plots=False, current_hashes=CURRENT)
    parsed = parse((tmp_path / "out" / "leaderboard.html").read_text())
    co = column(parsed, "t0", "CO")
    assert [r[co][0] for r in parsed.tables["t0"]["rows"]] == ["2/3 @ep 6"]


# ------------------------------------------------------------------------------- browser

def chromium(args: list[str], url: str, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=2000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def console(stderr: str) -> list[str]:
    """What the page wrote to the console (errors included) in chromium's log."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line]


def dump(path: Path, tmp: Path, fragment: str = "") -> Tables:
    done = chromium(["--dump-dom"], path.as_uri() + fragment, tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    assert console(done.stderr) == []
    parsed = parse(done.stdout)
    assert parsed.body.get("data-ok") == "1", "the page's script did not run to its end"
    return parsed


@pytest.mark.browser
@needs_chromium
def test_page_loads_without_errors_one_row_per_csv_row(page: tuple[Path, pd.DataFrame],
                                                       tmp_path: Path) -> None:
    path, csv = page
    parsed = dump(path, tmp_path)
    assert labels(parsed) == csv["row"].tolist()


@pytest.mark.browser
@needs_chromium
def test_console_errors_are_seen(tmp_path: Path) -> None:
    """The check above would catch a broken script: chromium logs its error."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    done = chromium(["--dump-dom"], bad.as_uri(), tmp_path)
    assert any("Uncaught ReferenceError" in line for line in console(done.stderr))
    assert 'data-ok="1"' not in done.stdout


@pytest.mark.browser
@needs_chromium
def test_sorting_reorders_the_rows(page: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    path, _ = page
    parsed = dump(path, tmp_path)
    wc = column(parsed, "t0", "worst case last")
    # hand-sorted: WC_LAST plus the EMA sub-row (0.54, its own AutoAttack, below its PGD) and
    # the seed-7 AT run (0.20)
    ascending = ["AT (seed 7)", "AT", XSS, "TRADES", f"↳ {XSS} [ema]"]
    order = labels(dump(path, tmp_path, f"#sort=t0:{wc}:asc"))
    assert order == ascending
    descending = labels(dump(path, tmp_path, f"#sort=t0:{wc}:desc"))
    assert descending == ascending[::-1]
    assert labels(parsed) != descending
    # numbers sort as numbers, not as text ("12.5" < "2.0"): cost vs AT is 25/2, 4/2 or 1
    # (AT's runs and the seed-7 run: 2 s per epoch), equal values keep the page's order
    cost = column(parsed, "t0", "cost vs AT")
    by_cost = ["AT", "AT (seed 7)", XSS, f"↳ {XSS} [ema]", "TRADES"]
    assert labels(dump(path, tmp_path, f"#sort=t0:{cost}:asc")) == by_cost
    # text columns sort as text; the rank column as numbers with the unranked rows last
    rows = sorted(labels(parsed), key=str.lower)
    assert labels(dump(path, tmp_path, f"#sort=t0:{column(parsed, 't0', 'row')}:asc")) == rows
    ranks = dump(path, tmp_path, "#sort=t0:0:desc")
    values = [r[0][1] for r in ranks.tables["t0"]["rows"]]
    ranked = [float(v) for v in values if v]
    assert ranked == sorted(ranked, reverse=True) and values[len(ranked):] == [""] * (
        len(values) - len(ranked))


@pytest.mark.browser
@needs_chromium
def test_screenshot(page: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    """A screenshot of the page: a PNG of the window's size with something drawn on it."""
    path, _ = page
    shot = tmp_path / "shot.png"
    done = chromium([f"--screenshot={shot}", "--window-size=1400,1000"], path.as_uri(),
                    tmp_path)
    assert done.returncode == 0 and console(done.stderr) == []
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1400, 1000)
    assert len(data) > 20_000  # a rendered page, not a blank one
