"""End to end through the command line on the `smoke` suite: run, evaluate,
leaderboard, list, the full-evaluation script, and the user-facing errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_run_then_leaderboard_end_to_end(tmp_path, capsys):
    results = tmp_path / "results"
    assert main(["run", "--suite", "smoke", "--method", "at", "--results", str(results),
                 "--quiet"]) == 0
    assert main(["run", "--suite", "smoke", "--method", "at", "--defense", "awp:gamma=0.02",
                 "--results", str(results), "--quiet"]) == 0
    out = capsys.readouterr().out
    records = sorted(results.glob("smoke/*/record.json"))
    assert len(records) == 2 and "record:" in out
    record = json.loads(records[0].read_text())
    for tag in ("best", "last"):
        m = record["metrics"]["model"][tag]
        assert 0 <= m["autoattack"] <= m["pgd20"] + 1e-9 <= m["clean"] + 1e-9
        assert m["n"] == 64
    assert record["history"]["best_epoch"] in (1, 2)
    assert len(record["history"]["curves"]["val_robust"]) == 2
    assert record["cost"]["forward_passes"] > 0 and record["versions"]["torch"]
    run_dir = records[0].parent
    assert {p.name for p in run_dir.iterdir()} >= {
        "spec.json", "history.jsonl", "last.pt", "best.pt", "record.json"}

    # re-evaluation rewrites the record
    before = records[0].stat().st_mtime_ns
    assert main(["evaluate", str(run_dir), "--quiet"]) == 0
    assert records[0].stat().st_mtime_ns > before

    out_dir = tmp_path / "board"
    assert main(["leaderboard", "--results", str(results), "--out", str(out_dir)]) == 0
    table = (out_dir / "leaderboard.md").read_text()
    assert "AT+AWP" in table and "| AT " in table.replace("|  AT", "| AT")
    assert (out_dir / "leaderboard.csv").exists() and (out_dir / "leaderboard.json").exists()


def test_list_shows_suites_methods_and_cards(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("fmnist-quick", "smoke", "cifar10-linf", "trades", "awp", "Wu, Xia & Wang"):
        assert word in out


@pytest.mark.parametrize("argv, message", [
    (["run", "--suite", "nosuch"], "unknown suite 'nosuch'; valid suites are"),
    (["run", "--suite", "smoke", "--method", "pgd"], "unknown method 'pgd'; valid methods"),
    (["run", "--suite", "smoke", "--defense", "nodef"], "unknown defense 'nodef'; valid"),
    (["run", "--suite", "smoke", "--defense", "awp:gama=1"], "no parameter(s) ['gama']"),
    (["run", "--suite", "smoke", "--defense", "awp:gamma"], "expected NAME[:key=value"),
    (["run", "--suite", "smoke", "--method", "fgsm_rs", "--defense", "awp"],
     "does not compose with method 'fgsm_rs'"),
    (["evaluate", "/nonexistent/run"], "is not a run folder"),
])
def test_user_errors_are_clear(argv, message, capsys, tmp_path):
    assert main([*argv, *(["--results", str(tmp_path)] if argv[0] == "run" else [])]) == 2
    assert message in capsys.readouterr().err


def test_defense_from_a_file_anywhere_on_disk(tmp_path):
    module = tmp_path / "mine.py"
    module.write_text(
        "from defenses.base import Defense, DefenseCard\n"
        "class Mine(Defense):\n"
        "    card = DefenseCard(name='Mine', paper='me')\n"
        "    params = {'strength': 0.0}\n"
        "    def __init__(self, strength):\n"
        "        super().__init__(strength=strength)\n"
        "    def add_losses(self, state):\n"
        "        return {'zero': state.per_sample_loss.mean() * self.hparams['strength']}\n")
    results = tmp_path / "results"
    assert main(["run", "--suite", "smoke", "--defense", f"{module}:Mine:strength=0.5",
                 "--results", str(results), "--quiet"]) == 0
    record = json.loads(next(results.glob("smoke/*/record.json")).read_text())
    assert record["row_name"] == "AT+Mine"
    assert record["spec"]["defenses"][0]["params"] == {"strength": 0.5}
    assert main(["run", "--suite", "smoke", "--defense", f"{module}:Nope",
                 "--results", str(results), "--quiet"]) == 2


def test_full_evaluation_script_is_resumable(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "run_full_evaluation.py"), "--suite", "smoke",
           "--defenses", "awp", "--results", str(tmp_path), "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "leaderboard" / "leaderboard.md").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("smoke/*/record.json")}
    assert len(mtimes) == 2
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing retrained
    bad = subprocess.run([*cmd[:3], "smoke", "--defenses", "nodef"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown defense 'nodef'" in bad.stderr


def _plan():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "run_full_evaluation", ROOT / "scripts" / "run_full_evaluation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.plan


def test_full_evaluation_runs_each_defense_with_the_suite_methods_it_composes_with(capsys):
    from bench.config import ConfigError

    plan = _plan()
    rows = {(s.row_name, s.method) for s in plan("fmnist-quick", None, None, [0])}
    assert ("AT", "at") in rows and ("AT+AWP", "at") in rows and ("AT+HR", "at") in rows
    assert not any("LAP" in name for name, _ in rows)  # single-step only: skipped, said so
    assert "skipped lap" in capsys.readouterr().err
    single = {s.row_name for s in plan("fmnist-fast", ["lap", "dom_re"], None, [0])}
    assert single == {"FGSM-RS", "N-FGSM", "FGSM-RS+LAP", "N-FGSM+LAP", "FGSM-RS+DOM-RE"}
    with pytest.raises(ConfigError, match="fgsm_rs\\+lap"):
        plan("fmnist-quick", ["lap"], None, [0])
    # a method prefix forces the pairing; LAP then refuses eps 0.1 (no published beta)
    # when the run is planned, before any data is loaded
    with pytest.raises(ConfigError, match="beta is published only for eps"):
        plan("fmnist-quick", ["fgsm_rs+lap"], None, [0])
    assert {s.row_name for s in plan("fmnist-quick", ["fgsm_rs+lap:beta=0.01"], None, [0])} == {
        "AT", "FGSM-RS", "FGSM-RS+LAP"}  # the prefixed method's plain row is its reference


def test_a_defense_for_another_method_of_the_same_kind_runs_with_its_own_baseline(capsys):
    from bench.config import METHOD_KIND, METHODS, ConfigError

    assert set(METHOD_KIND) == set(METHODS)
    plan = _plan()
    rows = [s.row_name for s in plan("fmnist-quick", None, None, [0])]
    assert "TRADES+CURE" in rows and rows.count("TRADES") == 1  # CURE declares trades only
    assert "note cure: composes with ['trades']" in capsys.readouterr().err
    assert [s.row_name for s in plan("fmnist-quick", ["cure"], None, [0, 1])] == [
        "AT", "AT", "TRADES+CURE", "TRADES+CURE", "TRADES", "TRADES"]
    # no stand-in of the suite's kind: LAP (single-step) on a multi-step suite is skipped
    assert not any("LAP" in r for r in rows)
    with pytest.raises(ConfigError, match="unknown method 'bogus'"):
        plan("fmnist-quick", ["cure"], ["bogus"], [0])


def test_leaderboard_without_records_is_a_clear_error(tmp_path, capsys):
    assert main(["leaderboard", "--results", str(tmp_path), "--out", str(tmp_path / "lb")]) == 2
    err = capsys.readouterr().err
    assert "no usable run records" in err and "Traceback" not in err
    assert main(["leaderboard", "--results", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_recheck_co_reapplies_the_current_rule_to_stored_curves(tmp_path, capsys):
    from bench.overfitting import RULE_KEY, RULE_VERSION

    # a collapse whose FGSM accuracy oscillates: the first rule version missed it
    curves = {"epoch": [1, 2, 3, 4, 5, 6], "val_robust": [0.30, 0.40, 0.02, 0.01, 0.00, 0.01],
              "val_fgsm": [0.45, 0.50, 0.97, 0.45, 0.90, 0.50]}
    stale = {"row_name": "FGSM-RS", "spec": {"seed": 0}, "history": {"curves": curves},
             "catastrophic_overfitting": None, "metrics": {"model": {}}}
    path = tmp_path / "fast" / "run0" / "record.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(stale))
    no_curves = tmp_path / "fast" / "run1" / "record.json"
    no_curves.parent.mkdir()
    no_curves.write_text(json.dumps({"history": {}}))

    assert main(["recheck-co", "--results", str(tmp_path), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "FGSM-RS seed 0: CO epoch none -> 3" in captured.out
    assert "would update 1 (1 verdict(s) changed), 1 skipped" in captured.out
    assert f"skipped {no_curves}" in captured.err
    assert json.loads(path.read_text()) == stale  # dry run: nothing written

    assert main(["recheck-co", "--results", str(tmp_path)]) == 0
    record = json.loads(path.read_text())
    assert record["catastrophic_overfitting"]["epoch"] == 3
    assert record[RULE_KEY] == RULE_VERSION and record["metrics"] == stale["metrics"]
    assert main(["recheck-co", "--results", str(tmp_path)]) == 0  # idempotent
    assert "updated 0 (0 verdict(s) changed)" in capsys.readouterr().out

    assert main(["recheck-co", "--results", str(tmp_path / "missing")]) == 2
    assert "no usable run records" in capsys.readouterr().err
