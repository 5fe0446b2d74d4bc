"""leaderboard.tex: one booktabs table per suite, escaped text, one row per CSV row."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from test_leaderboard import AWP, EMA, board, make_record, write

from leaderboard.latex import escape

LABEL = r"AT_x 50% & #1 {a} ~b^ \c $"


def test_escape_by_hand() -> None:
    assert escape("a_b") == r"a\_b" and escape("50%") == r"50\%"
    assert escape("x & y") == r"x \& y" and escape("#1") == r"\#1"
    assert escape(LABEL) == (r"AT\_x 50\% \& \#1 \{a\} \textasciitilde{}b\textasciicircum{} "
                             r"\textbackslash{}c \$")
    assert escape("↳ AT [ema]") == r"$\hookrightarrow$ AT [ema]"
    assert escape("1–3 †") == r"1--3 \dag{}"


def data_rows(tex: str) -> list[list[str]]:
    """The cells of each table body row (between \\midrule and \\bottomrule)."""
    rows, inside = [], False
    for line in tex.splitlines():
        if line == r"\midrule":
            inside = True
        elif line == r"\bottomrule":
            inside = False
        elif inside:
            assert line.endswith(r" \\"), line
            rows.append(line[:-3].split(" & "))
    return rows


@pytest.fixture
def tex_board(tmp_path: Path) -> tuple[str, pd.DataFrame]:
    """AT (3 seeds), a row with LaTeX specials in its name (2 seeds, an EMA sub-row), a run
    of a seed the suite does not ask for, and a second suite."""
    res = tmp_path / "results"
    for seed, aa in enumerate([0.40, 0.42, 0.44]):
        write(res, make_record(seed=seed, aa_last=aa))
    for seed in (0, 1):
        write(res, make_record(LABEL, defenses=AWP, seed=seed, aa_last=0.50, extra_models=EMA))
    write(res, make_record(LABEL, defenses=AWP, seed=7, aa_last=0.50))
    write(res, make_record(suite="fast", seed=0))
    out = tmp_path / "out"
    board(res, out)
    return (out / "leaderboard.tex").read_text(), pd.read_csv(out / "leaderboard.csv")


def test_one_escaped_booktabs_table_per_suite_and_one_row_per_csv_row(
        tex_board: tuple[str, pd.DataFrame]) -> None:
    tex, csv = tex_board
    assert r"\usepackage{booktabs}" in tex.splitlines()[1] and tex.startswith("%")
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 2
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 2
    assert r"\label{tab:robench-quick}" in tex and r"\label{tab:robench-fast}" in tex
    rows = data_rows(tex)
    assert len(rows) == len(csv)
    assert [r[1] for r in rows] == [escape(label) for label in csv["row"]]
    assert LABEL not in tex and escape(LABEL) in tex
    assert rf"$\hookrightarrow$ {escape(LABEL)} [ema]" in tex
    # every row has as many cells as its header, and no raw special character is left
    header = [line for line in tex.splitlines() if line.startswith(r"\# & Row")]
    assert len(header) == 2 and all(len(r) == header[0].count(" & ") + 1 for r in rows)
    for cells in rows:
        for cell in cells:
            assert "_" not in cell.replace(r"\_", "") and "%" not in cell.replace(r"\%", "")
            assert "#" not in cell.replace(r"\#", "") and "&" not in cell.replace(r"\&", "")


def test_cells_show_the_intervals(tex_board: tuple[str, pd.DataFrame]) -> None:
    tex, _ = tex_board
    by_label = {r[1]: r for r in data_rows(tex)}
    at = by_label["AT"]
    # WC last 42 ± 4.3027 * 2 / sqrt(3) = 42 ± 4.97; the base row has no difference
    assert at[7] == r"$42.00 \pm 4.97$" and at[9] == at[10] == "(base)"
    awp = by_label[escape(LABEL)]
    # 8 more robust images than AT's on seed 0 and seed 1: +4 points, better everywhere
    assert awp[9].startswith("$+4.00$ {\\scriptsize$[+") and awp[9].endswith("]$}$^{*}$")
    assert awp[0] == "1--2"  # AT+AWP's [50, 50] overlaps AT's interval: tied
    assert by_label[escape(LABEL) + " (seed 7)"][0] == r"$\circ$"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_the_tables_compile(tex_board: tuple[str, pd.DataFrame], tmp_path: Path) -> None:
    tex, _ = tex_board
    (tmp_path / "leaderboard.tex").write_text(tex)
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
        "\\input{leaderboard.tex}\n\\end{document}\n")
    subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=120)
