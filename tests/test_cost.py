"""`robench cost` (bench/cost.py, bench/cost_probe.py) and the leaderboard's cost column
from its file (leaderboard/costs.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_leaderboard import CURRENT, board, make_record, md_lines, write

from bench.config import RunSpec, load_suite, parse_defense_arg
from bench.cost import FORMAT, base_index, cost_document

ROOT = Path(__file__).resolve().parents[1]


def _specs():
    return [RunSpec("smoke", "at", (), 0), RunSpec("smoke", "at", (parse_defense_arg("awp"),), 0),
            RunSpec("smoke", "trades", (), 0),
            RunSpec("smoke", "trades", (parse_defense_arg("cure"),), 0)]


def test_ratios_are_medians_of_per_round_ratios_with_the_clean_model_charged():
    suite = load_suite("smoke")
    info = {"batches_per_epoch": 10, "steps": 5, "phases": 2, "clean_model_rows": [3],
            "defense_params": [{}, {"awp": {}}, {}, {"cure": {}}], "device": "cpu",
            "threads": 1}
    # seconds of each block (AT, AT+AWP, TRADES, TRADES+CURE, standard) in 3 rounds; the
    # load doubles every time in round 2 and is 3x in round 3
    blocks = [[1.0, 1.5, 1.2, 2.0, 0.5], [2.0, 3.0, 2.4, 4.0, 1.0], [3.0, 4.8, 3.6, 6.0, 1.5]]
    doc = cost_document(suite, _specs(), blocks, info, rounds=3)
    rows = {r["row"]: r for r in doc["rows"]}
    per_epoch = 10 / (5 * 2)  # a block holds 2 phases of 5 steps; an epoch has 10 steps
    clean = suite.clean_model_epochs / suite.train.epochs
    assert rows["AT"]["ratio"] == 1.0 and doc["base"] == "AT"
    assert rows["AT+AWP"]["ratio_per_round"] == pytest.approx([1.5, 1.5, 1.6])
    assert rows["AT+AWP"]["ratio"] == pytest.approx(1.5)  # the median, the loaded round out
    assert rows["TRADES"]["ratio"] == pytest.approx(1.2)
    assert rows["TRADES+CURE"]["ratio"] == pytest.approx(2.0 + 0.5 * clean)
    assert rows["AT"]["seconds_per_epoch"] == pytest.approx(2.0 * per_epoch)
    # a row whose clean model has its own recipe is charged that recipe's epochs
    short = cost_document(suite, _specs(), blocks, {**info, "clean_model_epochs": {"3": 1}},
                          rounds=3)
    assert short["rows"][3]["ratio"] == pytest.approx(2.0 + 0.5 * 1 / suite.train.epochs)
    assert doc["format"] == FORMAT and doc["protocol_hash"] == suite.protocol_hash
    assert "passes_ratio" not in rows["AT"]  # the probe reported no passes


def test_passes_predict_a_ratio_with_the_clean_model_charged():
    suite = load_suite("smoke")
    # passes of one block (AT, AT+AWP, TRADES, TRADES+CURE, standard), as the probe counts
    # them; input_backward: the attacks' backwards (input gradients only)
    passes = [{"forward": 40, "backward": 40, "input_backward": 30},
              {"forward": 50, "backward": 50, "input_backward": 30},
              {"forward": 50, "backward": 40, "input_backward": 30},
              {"forward": 70, "backward": 50, "input_backward": 30},
              {"forward": 10, "backward": 10, "input_backward": 0}]
    info = {"batches_per_epoch": 10, "steps": 5, "phases": 2, "clean_model_rows": [3],
            "clean_model_epochs": {"3": 1}, "defense_params": [{}, {}, {}, {}],
            "device": "cpu", "threads": 1, "passes": passes}
    blocks = [[1.0, 1.5, 1.2, 2.0, 0.5], [1.0, 1.5, 1.2, 2.0, 0.5]]
    rows = {r["row"]: r for r in cost_document(suite, _specs(), blocks, info, 2)["rows"]}
    assert rows["AT"]["passes_per_epoch"] == {"forward": 40.0, "backward": 40.0,
                                              "input_backward": 30.0}
    # work in forward units: forward + input backward + 2 x weight backward
    at = 40 + 30 + 2 * 10
    assert rows["AT+AWP"]["passes_ratio"] == pytest.approx((50 + 30 + 2 * 20) / at)
    assert rows["AT+AWP"]["cost_over_passes"] == pytest.approx(1.5 / (120 / at))
    assert rows["TRADES"]["passes_ratio"] == pytest.approx((50 + 30 + 2 * 10) / at)
    clean = 1 / suite.train.epochs  # the clean model's epochs over the run's
    cure = 70 + 30 + 2 * 20 + (10 + 2 * 10) * clean
    assert rows["TRADES+CURE"]["passes_ratio"] == pytest.approx(cure / at)
    assert rows["TRADES+CURE"]["cost_over_passes"] == pytest.approx(
        (2.0 + 0.5 * clean) / (cure / at))


def test_the_base_is_the_plain_method_first_in_the_leaderboards_order():
    specs = _specs()
    assert base_index(specs[1:]) == 1  # no AT row: TRADES
    assert base_index(list(reversed(specs))) == 3  # AT wherever it stands


SLEEPY = """\
import time

from defenses.base import Defense, DefenseCard

time.perf_counter = lambda: 0.0  # lies to any clock read in this process
time.monotonic = lambda: 0.0
time.process_time = lambda: 0.0


class Sleepy(Defense):
    card = DefenseCard(name='Sleepy', paper='a test')

    def after_step(self, state):
        time.sleep(0.12)
"""


def test_the_launcher_times_the_rows_and_a_defense_cannot_fake_its_cost(tmp_path):
    module = tmp_path / "sleepy.py"
    module.write_text(SLEEPY)
    results = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench.cli", "cost", "--suite", "smoke", "--defenses",
         f"awp,{module}:Sleepy", "--rounds", "2", "--steps", "3", "--results", str(results)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    doc = json.loads((results / "smoke" / "cost.json").read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    assert set(rows) == {"AT", "AT+AWP", "AT+Sleepy"} and doc["threads"] == 1
    assert rows["AT"]["ratio_per_round"] == [1.0, 1.0]
    # 3 steps x 4 phases x 120 ms of sleep = 1.44 s a block: far above a smoke AT block,
    # even when other work on the machine slows the AT block down several times
    sleepy = rows["AT+Sleepy"]
    assert sleepy["per_round"][0] > 1.44 * (doc["batches_per_epoch"] / 3 / 4) * 0.99
    assert min(sleepy["ratio_per_round"]) > 2
    # the passes the engine counted, in forward units: AT runs attack_steps forwards and
    # input-gradient backwards per step, then a training forward and a weight backward
    # (2); AWP adds a forward and a weight backward; Sleepy adds nothing
    steps = load_suite("smoke").train.attack_steps
    assert rows["AT+AWP"]["passes_ratio"] == pytest.approx((2 * steps + 6) / (2 * steps + 3))
    assert rows["AT+Sleepy"]["passes_ratio"] == 1.0
    assert sleepy["cost_over_passes"] == sleepy["ratio"]
    assert "AT+Sleepy" in done.stdout and "written:" in done.stdout


def _cost_file(results: Path, suite_hash: str, ratios: dict[str, float]) -> None:
    rows = []
    for name, ratio in ratios.items():
        defenses = [{"name": n, "params": {}} for n in name.split("+")[1:]]
        rows.append({"row": name.upper(), "spec": {"suite": "quick", "method": "at",
                                                   "defenses": defenses, "seed": 0},
                     "defense_params": {d["name"]: {} for d in defenses},
                     "run_hash": suite_hash, "ratio": ratio})
    path = results / "quick" / "cost.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": 1, "suite": "quick", "protocol_hash": suite_hash,
                                "base": "AT", "created": "2026-12-05T00:00:00+00:00",
                                "device": "cpu", "threads": 1, "rounds": 5, "rows": rows}))


def test_the_cost_column_shows_the_measured_ratios_of_the_current_version(tmp_path):
    results = tmp_path / "results"
    suite_hash = CURRENT["quick"]
    for seed in (0, 1, 2):
        write(results, make_record("AT", seed=seed, spe=2.0))
        write(results, make_record("AT+AWP", defenses=[{"name": "awp", "params": {}}],
                                   seed=seed, spe=10.0))  # a loaded machine: 5x
        write(results, make_record("AT+HR", defenses=[{"name": "hr", "params": {}}],
                                   seed=seed, spe=2.2))
    md = board(results, tmp_path / "out")
    assert "| 5.00×" in md_lines(md)["AT+AWP"] and "own mean training seconds" in md
    _cost_file(results, suite_hash, {"at": 1.0, "at+awp": 1.18})  # HR not timed
    md = board(results, tmp_path / "out")
    lines = md_lines(md)
    assert "| 1.18×" in lines["AT+AWP"] and "5.00×" not in lines["AT+AWP"]
    assert "| 1.00×" in lines["AT"]
    assert "1.10×" not in lines["AT+HR"]  # not timed: no ratio from another source
    assert "measured by `robench cost` (2026-12-05T00:00:00+00:00, on cpu, 1 thread(s), " \
           "median of 5 rounds)" in md
    _cost_file(results, "f" * 64, {"at": 1.0, "at+awp": 1.18})  # another suite version
    md = board(results, tmp_path / "out")
    assert "| 5.00×" in md_lines(md)["AT+AWP"]


def test_an_invalid_cost_file_is_left_out_with_a_warning(tmp_path):
    from leaderboard.costs import load_costs
    from leaderboard.records import LeaderboardWarning

    _cost_file(tmp_path, "a" * 64, {"at": 1.0, "at+awp": -2.0})
    with pytest.warns(LeaderboardWarning, match="positive finite ratio"):
        assert load_costs(tmp_path) == {}
