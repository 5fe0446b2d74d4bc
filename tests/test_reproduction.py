"""The reproduction table (leaderboard/reproduction.py): every published number of every card,
ROBench's number from the board's own rows, the right checkpoint, the sign of the difference,
and the not-run / no-suite cases; plus the structured `Published` entries on the cards."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from test_leaderboard import HASH, OLD_HASH, make_record, write

from bench.config import ConfigError
from defenses.base import Defense, DefenseCard, list_defenses
from defenses.card import Published
from leaderboard import reproduction
from leaderboard.compile import LeaderboardWarning, write_leaderboard

SUITE = "cifar10-linf"
CURRENT = {SUITE: HASH}
AWP = [{"name": "awp", "params": {"gamma": 0.01}}]


def toy_card() -> dict:
    """A card with one entry per case the table must handle (values are made up)."""
    common = {"method": "at", "defenses": ("awp",), "label": "AT-AWP", "suite": SUITE}
    return DefenseCard(name="AWP", paper="Toy", published=(
        Published(value=50.57, metric="autoattack", checkpoint="best", selection="test",
                  **common),
        Published(value=49.95, metric="autoattack", checkpoint="last", **common),
        Published(value=51.37, metric="autoattack", checkpoint="best",
                  selection="validation", **common),
        Published(value=55.0, metric="pgd20", checkpoint="best", **common,
                  params={"awp": {"gamma": 0.005}}),  # never run with that gamma
        Published(value=60.0, metric="autoattack", checkpoint="last", method="at",
                  defenses=("awp",), architecture="ResNet-18"),  # no suite
        Published(value=4.0, metric="test_error", checkpoint="last", **dict(
            common, method="standard")),
        Published(value=53.97, metric="autoattack", checkpoint="best", method="at",
                  defenses=("awp",), suite="cifar10-linf-wrn"),  # no record of that suite
        Published(value=83.99, metric="clean", checkpoint="last", method="at",
                  suite=SUITE, differences=("data: 50k vs 49k",)),
    )).to_dict()


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """AT+AWP, 3 official seeds: AutoAttack last 0.40/0.42/0.44, best 0.50/0.52/0.54;
    a 4th, unofficial seed with extreme numbers; plain AT, 2 seeds (clean last 0.85)."""
    res = tmp_path / "results"
    for seed, (last, best) in enumerate([(0.40, 0.50), (0.42, 0.52), (0.44, 0.54)]):
        write(res, make_record("AT+AWP", defenses=AWP, seed=seed, suite=SUITE,
                               aa_last=last, aa_best=best))
    write(res, make_record("AT+AWP", defenses=AWP, seed=7, suite=SUITE, aa_last=0.79,
                           aa_best=0.79))
    for seed in (0, 1):
        write(res, make_record("AT", seed=seed, suite=SUITE))
    return res


def compile_toy(results: Path, out: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeaderboardWarning)
        write_leaderboard(results, out, plots=False, current_hashes=CURRENT,
                          cards={"awp": toy_card()})
    return json.loads((out / "reproduction.json").read_text())


def test_ours_and_difference_use_last_unless_the_paper_selected_on_validation(
        results: Path, tmp_path: Path) -> None:
    doc = compile_toy(results, tmp_path / "out")
    items = doc["entries"]
    assert len(items) == 8
    # hand-computed: last mean (40+42+44)/3 = 42.00, sample std 2.00; best mean 52.00;
    # the unofficial seed 7 does not enter
    best_on_test, last, best_on_val = items[:3]
    for item in items[:3]:
        (row,) = item["rows"]
        assert row["row"] == "AT+AWP" and row["seeds"] == "3/3"
        assert row["ours_last"] == pytest.approx(42.0) and row["ours_best"] == pytest.approx(52.0)
        assert row["ours_last_std"] == pytest.approx(2.0) and row["ours_last_n"] == 3
        assert item["status"] == "measured"
    assert best_on_test["compared_with"] == "last"
    assert best_on_test["rows"][0]["difference"] == pytest.approx(42.0 - 50.57)  # -8.57
    assert last["compared_with"] == "last"
    assert last["rows"][0]["difference"] == pytest.approx(42.0 - 49.95)  # -7.95
    assert best_on_val["compared_with"] == "best"
    assert best_on_val["rows"][0]["ours"] == pytest.approx(52.0)
    assert best_on_val["rows"][0]["difference"] == pytest.approx(52.0 - 51.37)  # +0.63
    plain = items[7]
    assert plain["rows"][0]["row"] == "AT"
    assert plain["rows"][0]["difference"] == pytest.approx(85.0 - 83.99)  # +1.01
    assert plain["differences"] == ["data: 50k vs 49k"]


def test_the_numbers_are_the_boards(results: Path, tmp_path: Path) -> None:
    doc = compile_toy(results, tmp_path / "out")
    board = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    (awp,) = [r for r in board["rows"] if r["row"] == "AT+AWP" and r["model"] == "model"]
    row = doc["entries"][0]["rows"][0]
    assert row["ours_last"] == pytest.approx(100 * awp["autoattack_last_mean"])
    assert row["ours_best"] == pytest.approx(100 * awp["autoattack_best_mean"])


def test_not_run_no_suite_and_metric_not_on_the_board(results: Path, tmp_path: Path) -> None:
    # gamma 0.005 was run, but under another version of the suite file: not comparable
    write(results, make_record("AT+AWP", seed=0, suite=SUITE, suite_hash=OLD_HASH,
                               defenses=[{"name": "awp", "params": {"gamma": 0.005}}]))
    items = compile_toy(results, tmp_path / "out")["entries"]
    other_gamma, no_suite, error, wrn = items[3:7]
    assert (other_gamma["status"], other_gamma["rows"]) == ("not run yet", [])
    assert (no_suite["status"], no_suite["compared_with"]) == ("no matching suite", None)
    assert error["status"] == "metric not on the board"
    assert (wrn["status"], wrn["rows"]) == ("not run yet", [])


def test_markdown_renders_every_entry(results: Path, tmp_path: Path) -> None:
    compile_toy(results, tmp_path / "out")
    md = (tmp_path / "out" / "reproduction.md").read_text()
    assert "## AWP (`awp`)" in md and "papers usually select theirs on the test set" in md
    rows = [line for line in md.splitlines() if line.startswith("| AT-AWP") or
            line.startswith("| at,")]
    assert len(rows) == 8
    assert "| 50.57 | cifar10-linf | AT+AWP | 3/3 | 42.00 ± 2.00 | 52.00 ± 2.00 | last | -8.57 |" \
        in md
    assert "| best | +0.63 | measured |" in md
    assert md.count("| not run yet |") == 2 and "| no matching suite |" in md
    assert "1. data: 50k vs 49k" in md


def test_every_published_number_of_every_card_is_listed(results: Path, tmp_path: Path) -> None:
    classes = list_defenses()
    expected = sorted((name, p.label, p.metric, p.checkpoint, p.value, p.architecture, p.eps)
                      for name, cls in classes.items() for p in cls.card.published)
    assert len(expected) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeaderboardWarning)
        write_leaderboard(results, tmp_path / "out", plots=False, current_hashes=CURRENT)
    doc = json.loads((tmp_path / "out" / "reproduction.json").read_text())
    listed = sorted((e["defense"], e["label"], e["metric"], e["checkpoint"], e["published"],
                     e["architecture"], e["eps"]) for e in doc["entries"])
    assert listed == expected
    assert set(doc["cards"]) == set(classes)
    # a few numbers straight from the papers, as the cards must carry them
    assert ("awp", "AT-AWP", "pgd20", "best", 55.39, "PreActResNet-18", "8/255") in listed
    assert ("fomo", "AT+FOMO", "autoattack", "last", 51.28, "PreActResNet-18", "8/255") in listed
    assert ("lap", "R-LAP", "autoattack", "last", 15.69, "PreActResNet-18", "16/255") in listed
    md = (tmp_path / "out" / "reproduction.md").read_text()
    assert all(f"`{name}`" in md for name in classes)


def test_every_entry_names_an_installed_suite_or_none() -> None:
    from bench.config import list_suites

    suites = set(list_suites())
    for name, cls in list_defenses().items():
        for p in cls.card.published:
            assert p.suite is None or p.suite in suites, (name, p.label, p.suite)
            assert p.differences, (name, p.label)  # always say what differs (or why no suite)


def test_cards_are_read_without_building_a_defense(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, **kwargs):
        raise AssertionError("a defense was instantiated")

    monkeypatch.setattr(Defense, "__init__", refuse)
    cards = reproduction.load_cards()
    assert cards["awp"]["published"][0]["value"] == 55.39


def test_unreadable_cards_warn_and_say_so(results: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr("leaderboard.compile.load_cards", broken)
    with pytest.warns(LeaderboardWarning, match="reproduction table without cards"):
        write_leaderboard(results, tmp_path / "out", plots=False, current_hashes=CURRENT)
    assert "boom" in (tmp_path / "out" / "reproduction.md").read_text()


def test_published_entries_are_checked() -> None:
    with pytest.raises(ConfigError, match="checkpoint must be one of"):
        Published(value=50.0, metric="autoattack", checkpoint="final", method="at")
    with pytest.raises(ConfigError, match="percentage"):
        Published(value=0.5e3, metric="clean", checkpoint="last", method="at")
    with pytest.raises(ConfigError, match="selection must be one of"):
        Published(value=50.0, metric="clean", checkpoint="best", method="at", selection="val")
    with pytest.raises(ConfigError, match="published must be a tuple"):
        DefenseCard(name="X", paper="Y", published={"AA": 50.0})


def test_a_row_without_the_metric_says_so(tmp_path: Path) -> None:
    res = tmp_path / "results"
    for seed in (0, 1, 2):  # AutoAttack switched off on this suite version
        write(res, make_record("AT+AWP", defenses=AWP, seed=seed, suite=SUITE,
                               aa_version="none"))
    items = compile_toy(res, tmp_path / "out")["entries"]
    assert items[0]["status"] == "row has no value for this metric"
    assert items[0]["rows"][0]["ours"] is None and items[0]["rows"][0]["difference"] is None
