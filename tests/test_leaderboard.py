"""Leaderboard compiler on synthetic records: aggregation, marking, robustness, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

from leaderboard.compile import (
    LeaderboardWarning,
    RecordsNotFoundError,
    compile_tables,
    load_records,
    main,
    write_leaderboard,
)

ROOT = Path(__file__).resolve().parents[1]
HASH = "a" * 64
OLD_HASH = "b" * 64


def make_record(row_name: str = "AT", method: str = "at", defenses: list | None = None,
                seed: int = 0, suite: str = "quick", suite_hash: str = HASH,
                aa_last: float | None = 0.40, pgd_best: float = 0.55, pgd_last: float = 0.45,
                aa_best: float | None = 0.50, spe: float = 2.0, passes: int = 1000,
                created: str = "2025-01-01T00:00:00+00:00", extra_models: dict | None = None,
                flags: list | None = None) -> dict:
    """A schema-1 record with the given headline numbers."""
    defenses = defenses or []
    ckpt = {"best": {"clean": 0.80, "pgd20": pgd_best, "cw20": 0.5, "autoattack": aa_best,
                     "n": 100},
            "last": {"clean": 0.85, "pgd20": pgd_last, "cw20": 0.4, "autoattack": aa_last,
                     "n": 100}}
    names = "-".join(d["name"] for d in defenses)
    return {
        "schema": 1, "run_id": f"{method}{names}{seed}", "row_name": row_name,
        "spec": {"suite": suite, "method": method, "defenses": defenses, "seed": seed},
        "suite": {"name": suite, "hash": suite_hash, "seeds": [0, 1, 2],
                  "description": "A quick suite."},
        "metrics": {"model": ckpt, **(extra_models or {})},
        "history": {"best_epoch": 3 + seed, "epochs": 10,
                    "curves": {"epoch": [1, 2, 3], "train_robust": [0.3, 0.5, 0.7],
                               "val_robust": [0.3, 0.4, 0.35], "train_clean": [0.5] * 3,
                               "val_clean": [0.5] * 3, "train_loss": [1.0] * 3, "lr": [0.1] * 3}},
        "cost": {"train_seconds": 10 * spe, "seconds_per_epoch": [spe] * 10,
                 "eval_seconds": 1.0, "forward_passes": passes, "backward_passes": passes,
                 "pretraining_seconds": 0.0},
        "flags": flags or [], "extra_pretraining": [],
        "cards": {d["name"]: {"name": d["name"].upper(), "paper": f"Paper on {d['name']}",
                              "link": f"https://example.org/{d['name']}"} for d in defenses},
        "autoattack": {"version": "standard"}, "versions": {}, "device": "cpu",
        "created": created,
    }


def write(results: Path, rec: dict, folder: str | None = None) -> Path:
    path = results / rec["spec"]["suite"] / (folder or rec["run_id"]) / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


AWP = [{"name": "awp", "params": {"gamma": 0.01}}]


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """AT with 3 seeds; AT+AWP with 2 seeds, twice as slow, plus an EMA model and a flag."""
    res = tmp_path / "results"
    for seed, aa in enumerate([0.40, 0.42, 0.44]):
        write(res, make_record(seed=seed, aa_last=aa, pgd_last=0.45 + 0.01 * seed))
    ema = {"ema": {"best": {"clean": 0.8, "pgd20": 0.6, "cw20": 0.5, "autoattack": 0.55},
                   "last": {"clean": 0.8, "pgd20": 0.58, "cw20": 0.5, "autoattack": 0.54}}}
    flag = [{"check": "aa_pgd_gap", "model": "model", "checkpoint": "last", "message": "x"}]
    for seed in (0, 1):
        write(res, make_record("AT+AWP", defenses=AWP, seed=seed, aa_last=0.50, spe=4.0,
                               passes=3000, extra_models=ema, flags=flag if seed else None))
    return res


def quick(results: Path) -> pd.DataFrame:
    return compile_tables(load_records(results))["quick"].set_index("row")


def test_mean_std_gap_and_seeds(results: Path) -> None:
    t = quick(results)
    at = t.loc["AT"]
    assert at["autoattack_last_mean"] == pytest.approx(0.42)
    assert at["autoattack_last_std"] == pytest.approx(0.02)  # sample std over seeds
    assert at["gap_pgd20_mean"] == pytest.approx(0.55 - 0.46)
    assert at["gap_autoattack_mean"] == pytest.approx(0.50 - 0.42)
    assert at["best_epoch_mean"] == pytest.approx(4.0)
    assert at["seeds"] == "3/3" and at["n_seeds"] == 3
    assert t.loc["AT+AWP", "seeds"] == "2/3 ⚠"


def test_sort_order_models_and_flags(results: Path) -> None:
    t = quick(results)
    assert list(t.index) == ["AT+AWP [ema]", "AT+AWP", "AT"]
    assert t.loc["AT+AWP", "flags"] == "aa_pgd_gap"
    assert t.loc["AT+AWP [ema]", "flags"] == ""  # the flag was for the main model only


def test_cost_ratio_vs_at(results: Path, tmp_path: Path) -> None:
    t = quick(results)
    assert t.loc["AT", "cost_vs_base"] == pytest.approx(1.0)
    assert t.loc["AT+AWP", "cost_vs_base"] == pytest.approx(2.0)
    assert t.loc["AT+AWP", "passes_vs_base"] == pytest.approx(3.0)
    assert set(t["cost_base"]) == {"AT"}
    write_leaderboard(results, tmp_path / "board", plots=False)
    assert "| cost vs AT | passes vs AT |" in (tmp_path / "board" / "leaderboard.md").read_text()
    lone = tmp_path / "lone"
    write(lone, make_record("AT+AWP", defenses=AWP))
    assert compile_tables(load_records(lone))["quick"]["cost_vs_base"].isna().all()


def test_extra_pretraining_is_shown_and_counted_in_the_cost(results: Path, tmp_path: Path) -> None:
    """A warm start's clean model (record `extra_pretraining`, `cost.pretraining_*`): its
    seconds spread over the run's epochs join the cost column, its passes the passes."""
    cure = [{"name": "cure", "params": {}}]
    for seed in (0, 1):
        rec = make_record("TRADES+CURE", method="trades", defenses=cure, seed=seed, spe=2.0,
                          passes=1000)
        extra = {"kind": "clean_model", "what": "clean model (standard training, 10 epochs)",
                 "where": "results/quick/_clean_models/x", "seconds": 10.0 + 20 * seed,
                 "forward_passes": 250, "backward_passes": 250}
        rec["extra_pretraining"] = [extra]
        rec["cost"].update(pretraining_seconds=extra["seconds"],
                           pretraining_forward_passes=250, pretraining_backward_passes=250)
        write(results, rec)
    t = quick(results)
    row = t.loc["TRADES+CURE"]
    assert row["pretraining_seconds_mean"] == pytest.approx(20.0)
    assert row["seconds_per_epoch_mean"] == pytest.approx(2.0)  # the run's own epochs
    assert row["cost_vs_base"] == pytest.approx((2.0 + 20.0 / 10) / 2.0)
    assert row["passes_vs_base"] == pytest.approx(2500 / 2000)
    assert row["extra_pretraining"] == "clean model (standard training, 10 epochs) (20 s)"
    assert t.loc["AT", "extra_pretraining"] == "" and t.loc["AT", "cost_vs_base"] == 1.0
    out = tmp_path / "out"
    write_leaderboard(results, out, plots=False)
    md = (out / "leaderboard.md").read_text()
    assert "extra pretraining |" in md and "(standard training, 10 epochs) (20 s) |" in md


def test_null_autoattack_falls_back_to_pgd_for_sorting(tmp_path: Path) -> None:
    res = tmp_path / "results"
    write(res, make_record(aa_last=None, aa_best=None, pgd_last=0.30))
    write(res, make_record("AT+AWP", defenses=AWP, aa_last=None, aa_best=None, pgd_last=0.35))
    t = compile_tables(load_records(res))["quick"]
    assert list(t["row"]) == ["AT+AWP", "AT"]
    assert t["autoattack_last_mean"].isna().all() and t["gap_autoattack_mean"].isna().all()
    md = (tmp_path / "out" / "leaderboard.md")
    write_leaderboard(res, md.parent, plots=False)
    assert "| – |" in md.read_text()


def test_corrupt_record_is_skipped_with_warning(results: Path) -> None:
    bad = results / "quick" / "broken" / "record.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    wrong = write(results, {**make_record(seed=9), "schema": 7}, folder="wrong")
    with pytest.warns(LeaderboardWarning) as caught:
        recs = load_records(results)
    text = " ".join(str(w.message) for w in caught)
    assert str(bad) in text and str(wrong) in text and "schema" in text
    assert len(recs) == 5


def test_no_records_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordsNotFoundError, match="robench run"):
        load_records(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        load_records(tmp_path / "missing")
    assert main(["--results", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2


def test_suite_hashes_are_not_mixed(results: Path) -> None:
    write(results, make_record(seed=0, suite_hash=OLD_HASH, aa_last=0.10,
                               created="2024-01-01T00:00:00Z"), folder="old")
    with pytest.warns(LeaderboardWarning, match="older suite file"):
        tables = compile_tables(load_records(results))
    assert set(tables) == {"quick", f"quick@{OLD_HASH[:8]}"}
    assert tables["quick"].set_index("row").loc["AT", "autoattack_last_mean"] == pytest.approx(0.42)
    assert tables[f"quick@{OLD_HASH[:8]}"]["autoattack_last_mean"].tolist() == [0.10]


def test_duplicate_seed_is_deduplicated(results: Path) -> None:
    write(results, make_record(seed=0, aa_last=0.40), folder="copy")
    with pytest.warns(LeaderboardWarning, match="duplicate run AT seed 0"):
        t = quick(results)
    assert t.loc["AT", "n_seeds"] == 3
    assert t.loc["AT", "autoattack_last_mean"] == pytest.approx(0.42)


def test_same_row_name_different_params_are_separate_rows(tmp_path: Path) -> None:
    res = tmp_path / "results"
    write(res, make_record("AT+AWP", defenses=AWP))
    write(res, make_record("AT+AWP", defenses=[{"name": "awp", "params": {"gamma": 0.005}}]),
          folder="other")
    rows = set(compile_tables(load_records(res))["quick"]["row"])
    assert rows == {"AT+AWP (awp(gamma=0.01))", "AT+AWP (awp(gamma=0.005))"}


def test_written_files_markdown_and_csv_roundtrip(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = write_leaderboard(results, out)
    names = [p.name for p in paths]
    assert names[:3] == ["leaderboard.md", "leaderboard.csv", "leaderboard.json"]
    assert "curves_quick.png" in names and all(p.exists() for p in paths)
    md = (out / "leaderboard.md").read_text()
    assert "## quick" in md and "A quick suite." in md and HASH[:12] in md
    for row in ("| AT |", "| AT+AWP |", "| AT+AWP [ema] |", "2/3 ⚠", "42.00 ± 2.00", "2.00×"):
        assert row in md
    assert "**AWP** (`awp`)" in md and "https://example.org/awp" in md
    written = pd.concat(compile_tables(load_records(results)).values(), ignore_index=True)
    back = pd.read_csv(out / "leaderboard.csv")
    assert list(back.columns) == list(written.columns) and back.columns[0] == "suite"
    numeric = written.select_dtypes("number").columns
    pd.testing.assert_frame_equal(back[numeric], written[numeric], check_dtype=False)
    assert back["row"].tolist() == written["row"].tolist()
    doc = json.loads((out / "leaderboard.json").read_text())
    assert doc["suites"]["quick"]["hash"] == HASH and len(doc["rows"]) == 3
    assert {r["suite"] for r in doc["rows"]} == {"quick"}


def test_cli(results: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--results", str(results), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    assert "leaderboard.md" in capsys.readouterr().out


def test_import_is_light() -> None:
    code = ("import sys, leaderboard.compile; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'defenses', 'bench')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def co_record(row_name: str, method: str, seed: int, co_epoch: int | None,
              fgsm_curve: bool = True, **kwargs) -> dict:
    """A record of the single-step suite `fast`, with or without a CO epoch."""
    rec = make_record(row_name, method=method, seed=seed, suite="fast", **kwargs)
    if fgsm_curve:
        rec["history"]["curves"]["val_fgsm"] = [0.4, 0.5, 0.7]
    rec["catastrophic_overfitting"] = None if co_epoch is None else {
        "epoch": co_epoch, "val_pgd": 0.01, "val_fgsm": 0.7, "val_pgd_max": 0.3, "rule": "r"}
    return rec


def test_no_co_column_without_co_data(results: Path, tmp_path: Path) -> None:
    """Suites without CO data (no FGSM curve, nothing flagged) keep their table as it was."""
    write(results, co_record("AT", "at", 0, None, fgsm_curve=False), folder="checked")
    tables = compile_tables(load_records(results))
    assert "co_seeds" not in tables["quick"].columns
    assert "co_seeds" not in tables["fast"].columns  # checked, PGD only, nothing flagged
    write_leaderboard(results, tmp_path / "out", plots=False)
    assert "| CO |" not in (tmp_path / "out" / "leaderboard.md").read_text()


def test_co_column_counts_seeds_and_earliest_epoch(tmp_path: Path) -> None:
    res = tmp_path / "results"
    ema = {"ema": {"best": {"clean": 0.8, "pgd20": 0.6, "cw20": 0.5, "autoattack": 0.55},
                   "last": {"clean": 0.8, "pgd20": 0.58, "cw20": 0.5, "autoattack": 0.54}}}
    for seed, epoch in enumerate([12, 9, None]):
        write(res, co_record("FGSM-RS", "fgsm_rs", seed, epoch, aa_last=0.0,
                             extra_models=ema))
    for seed in range(3):
        write(res, co_record("N-FGSM", "n_fgsm", seed, None))
    t = compile_tables(load_records(res))["fast"].set_index("row")
    assert t.loc["FGSM-RS", "co_seeds"] == 2 and t.loc["FGSM-RS", "co_checked"] == 3
    assert t.loc["FGSM-RS", "co_epoch_min"] == 9
    assert t.loc["N-FGSM", "co_seeds"] == 0 and pd.isna(t.loc["N-FGSM", "co_epoch_min"])
    assert t.loc["FGSM-RS [ema]", "co_checked"] == 0  # the curves are the trained model's
    # no AT row on a single-step suite: the cost columns divide by plain FGSM-RS
    assert set(t["cost_base"]) == {"FGSM-RS"} and t.loc["FGSM-RS", "cost_vs_base"] == 1.0
    write_leaderboard(res, tmp_path / "out", plots=False)
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "| best epoch | CO | seeds | cost vs FGSM-RS | passes vs FGSM-RS |" in md
    assert "*CO*: catastrophic overfitting" in md
    lines = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| ")}
    assert "| 2/3 @ep 9 |" in lines["FGSM-RS"]
    assert "| – | 3/3 |" in lines["N-FGSM"] and "| – | 3/3 |" in lines["FGSM-RS [ema]"]
    csv = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert {"co_seeds", "co_checked", "co_epoch_min"} <= set(csv.columns)


def test_a_flagged_record_without_fgsm_curve_shows_the_column(tmp_path: Path) -> None:
    res = tmp_path / "results"
    write(res, co_record("AT", "at", 0, 7, fgsm_curve=False))
    write(res, make_record("AT", seed=1, suite="fast"))  # an older record: not checked
    t = compile_tables(load_records(res))["fast"]
    assert (t.loc[0, "co_seeds"], t.loc[0, "co_checked"], t.loc[0, "co_epoch_min"]) == (1, 1, 7)


def test_malformed_co_field_is_skipped(tmp_path: Path) -> None:
    res = tmp_path / "results"
    write(res, make_record())
    bad = co_record("AT", "at", 1, None)
    bad["catastrophic_overfitting"] = {"epoch": "twelve"}
    write(res, bad)
    with pytest.warns(LeaderboardWarning, match="catastrophic_overfitting"):
        assert len(load_records(res)) == 1


def test_curves_include_the_fgsm_curve_only_where_every_run_has_it():
    from leaderboard.plots import _mean_curves

    def rec(fgsm):
        curves = {"epoch": [1, 2], "train_robust": [0.2, 0.4], "val_robust": [0.2, 0.1]}
        if fgsm is not None:
            curves["val_fgsm"] = fgsm
        return {"history": {"curves": curves}}

    both = _mean_curves([rec([0.3, 0.5]), rec([0.5, 0.7])])
    assert list(both["val_fgsm"]) == [0.4, 0.6]
    assert "val_fgsm" not in _mean_curves([rec([0.3, 0.5]), rec(None)])
    assert "val_fgsm" not in _mean_curves([rec(None)])


def test_cost_uses_cpu_seconds_when_every_run_has_them(tmp_path: Path) -> None:
    """Process CPU seconds (CPU runs) replace wall seconds in the cost column only when
    every record of the suite has them; a mix falls back to wall time for all rows."""
    def with_cpu(rec: dict, cpu: float) -> dict:
        rec["cost"]["cpu_seconds_per_epoch"] = [cpu] * 10
        return rec

    both = tmp_path / "both"
    write(both, with_cpu(make_record("AT", spe=4.0), 1.0))  # wall inflated by other jobs
    write(both, with_cpu(make_record("AT+AWP", defenses=AWP, spe=2.0), 1.5))
    table = compile_tables(load_records(both))["quick"].set_index("row")
    assert table.loc["AT+AWP", "cost_vs_base"] == pytest.approx(1.5)
    mixed = tmp_path / "mixed"
    write(mixed, make_record("AT", spe=4.0))
    write(mixed, with_cpu(make_record("AT+AWP", defenses=AWP, spe=2.0), 1.5))
    table = compile_tables(load_records(mixed))["quick"].set_index("row")
    assert table.loc["AT+AWP", "cost_vs_base"] == pytest.approx(0.5)


def test_mixed_co_rule_versions_are_warned_about(tmp_path: Path) -> None:
    res = tmp_path / "results"
    write(res, co_record("FGSM-RS", "fgsm_rs", 0, 2))
    newer = co_record("FGSM-RS", "fgsm_rs", 1, None)
    newer["catastrophic_overfitting_rule"] = 2
    write(res, newer)
    with pytest.warns(LeaderboardWarning, match=r"different detector rules \(1 with no rule "
                      r"version, 1 with rule v2\).*robench recheck-co"):
        compile_tables(load_records(res))
    old = co_record("FGSM-RS", "fgsm_rs", 0, 2)
    old["catastrophic_overfitting_rule"] = 2
    write(res, old)  # re-checked (same file): every record on one rule, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeaderboardWarning)
        compile_tables(load_records(res))
