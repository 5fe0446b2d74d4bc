"""Leaderboard compiler on synthetic schema-2 records: validation, suite versions, honest
aggregation, ranking, marking, labels, outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

from leaderboard.compile import (
    InvalidRecordError,
    LeaderboardWarning,
    RecordsNotFoundError,
    compile_tables,
    load_records,
    main,
    write_leaderboard,
)
from leaderboard.schema import pack_bits, validate_record

ROOT = Path(__file__).resolve().parents[1]
HASH = "a" * 64
OLD_HASH = "b" * 64
CURRENT = {"quick": HASH, "fast": HASH}  # the "installed" suite files of these tests
N = 100  # test images of the synthetic records
AA_LABELS = {"standard": "AutoAttack", "apgd": "APGD-CE+APGD-T",
             "reduced": "APGD-CE+APGD-T (reduced)", "none": None}


def prefix(k: int, n: int) -> str:
    """Bits of n images of which the first k are robust."""
    return pack_bits([i < k for i in range(n)])


def checkpoint(clean: float, pgd20: float, cw20: float | None = None,
               autoattack: float | None = None, worst_case: float | None = None,
               epoch: int = 1, n: int = N, n_sub: int = N) -> tuple[dict, dict]:
    """Metrics of one model and checkpoint and per-image bits that agree with them: image i
    is robust to an attack iff i < its count, so the worst case is the smallest count on the
    attack subset unless `worst_case` (no larger) is given (the Square check breaks more)."""
    cw20 = pgd20 if cw20 is None else cw20
    counts = {"clean": round(clean * n), "pgd20": round(pgd20 * n), "cw20": round(cw20 * n)}
    aa = None if autoattack is None else round(autoattack * n_sub)
    floor = min([min(c, n_sub) for c in counts.values()] + ([] if aa is None else [aa]))
    worst = floor if worst_case is None else round(worst_case * n_sub)
    assert worst <= floor, "the worst case cannot exceed any single attack"
    metrics = {"n": n, **{k: c / n for k, c in counts.items()},
               "autoattack": None if aa is None else aa / n_sub,
               "n_autoattack": None if aa is None else n_sub, "square_only": 0.0,
               "worst_case": worst / n_sub, "n_worst_case": n_sub, "epoch": epoch}
    bits = {k: prefix(c, n) for k, c in counts.items()}
    bits["square"] = prefix(worst, n_sub)
    if aa is not None:
        bits["autoattack"] = prefix(aa, n_sub)
    return metrics, bits


def flag(check: str, level: str, model: str = "model", ckpt: str = "last") -> dict:
    return {"check": check, "level": level, "message": f"{check} fired", "model": model,
            "checkpoint": ckpt}


def make_record(row_name: str = "AT", method: str = "at", defenses: list | None = None,
                seed: int = 0, suite: str = "quick", suite_hash: str = HASH,
                aa_last: float | None = 0.40, pgd_best: float = 0.55, pgd_last: float = 0.45,
                aa_best: float | None = 0.50, spe: float = 2.0, passes: int = 1000,
                created: str = "2025-01-01T00:00:00+00:00", extra_models: dict | None = None,
                flags: list | None = None, wc_best: float | None = None,
                wc_last: float | None = None, defense_params: dict | None = None,
                run_hash: str | None = None, seeds: tuple = (0, 1, 2),
                aa_version: str = "standard", n: int = N, n_sub: int | None = None,
                source_sha: str = "c" * 64, commit: str = "d" * 40) -> dict:
    """A valid schema-2 record with the given headline numbers (validated here)."""
    defenses = defenses or []
    n_sub = n if n_sub is None else n_sub
    best_epoch, epochs = 3 + seed % 5, 10
    if aa_version == "none":
        aa_best = aa_last = None
    best = checkpoint(0.80, pgd_best, autoattack=aa_best, worst_case=wc_best,
                      epoch=best_epoch, n=n, n_sub=n_sub)
    last = checkpoint(0.85, pgd_last, autoattack=aa_last, worst_case=wc_last, epoch=epochs,
                      n=n, n_sub=n_sub)
    metrics = {"model": {"best": best[0], "last": last[0]}}
    per_image = {"model": {"best": best[1], "last": last[1]}}
    for name, values in (extra_models or {}).items():
        pair = {c: checkpoint(**values[c], epoch=best_epoch if c == "best" else epochs, n=n,
                              n_sub=n_sub) for c in ("best", "last")}
        metrics[name] = {c: p[0] for c, p in pair.items()}
        per_image[name] = {c: p[1] for c, p in pair.items()}
    names = "-".join(d["name"] for d in defenses)
    if defense_params is None:
        defense_params = {d["name"]: dict(d.get("params") or {}) for d in defenses}
    attacks = ["clean", "pgd20", "cw20"] + (["autoattack"] if aa_version != "none" else [])
    rec = {
        "schema": 2, "run_id": f"{method}{names}{seed}", "row_name": row_name,
        "spec": {"suite": suite, "method": method, "defenses": defenses, "seed": seed},
        "suite": {"name": suite, "hash": suite_hash, "run_hash": run_hash or suite_hash,
                  "seeds": list(seeds), "description": "A quick suite."},
        "models": {m: {"role": "trained" if m == "model" else "extra", "ranked": m == "model"}
                   for m in metrics},
        "metrics": metrics, "per_image": per_image,
        "evaluation": {"n_images": n, "n_attack_subset": n_sub,
                       "autoattack": {"version": aa_version, "label": AA_LABELS[aa_version],
                                      "n_images": 0 if aa_version == "none" else n_sub},
                       "square": {"queries": 1000, "n_images": n_sub},
                       "worst_case": {"n_images": n_sub, "attacks": attacks + ["square"]}},
        "checkpoints": {"best": {"file": "best.pt", "sha256": "0" * 64, "epoch": best_epoch},
                        "last": {"file": "last.pt", "sha256": "1" * 64, "epoch": epochs}},
        "history": {"best_epoch": best_epoch, "epochs": epochs,
                    "curves": {"epoch": [1, 2, 3], "train_robust": [0.3, 0.5, 0.7],
                               "val_robust": [0.3, 0.4, 0.35], "train_clean": [0.5] * 3,
                               "val_clean": [0.5] * 3, "train_loss": [1.0] * 3, "lr": [0.1] * 3}},
        "catastrophic_overfitting": None,
        "cost": {"train_seconds": 10 * spe, "seconds_per_epoch": [spe] * 10,
                 "eval_seconds": 1.0, "forward_passes": passes, "backward_passes": passes,
                 "pretraining_seconds": 0.0},
        "flags": flags or [], "extra_pretraining": [],
        "cards": {d["name"]: {"name": d["name"].upper(), "paper": f"Paper on {d['name']}",
                              "link": f"https://example.org/{d['name']}"} for d in defenses},
        "defense_params": defense_params,
        "provenance": {"robench_version": "0.1.0", "git_commit": commit, "git_dirty": False,
                       "defense_sources": {d["name"]: {"class": f"defenses.{d['name']}.X",
                                                       "file": f"defenses/{d['name']}.py",
                                                       "sha256": source_sha}
                                           for d in defenses},
                       "versions": {}},
        "versions": {}, "device": "cpu", "created": created,
    }
    validate_record(rec)
    return rec


def write(results: Path, rec: dict, folder: str | None = None) -> Path:
    path = results / rec["spec"]["suite"] / (folder or rec["run_id"]) / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


def tables(results: Path, **kwargs) -> dict[str, pd.DataFrame]:
    return compile_tables(load_records(results, **kwargs), current_hashes=CURRENT)


def board(results: Path, out: Path, **kwargs) -> str:
    """Write the leaderboard (no plots) and return its Markdown."""
    write_leaderboard(results, out, plots=False, current_hashes=CURRENT, **kwargs)
    return (out / "leaderboard.md").read_text()


def md_lines(md: str) -> dict[str, str]:
    """Markdown table lines by their row cell."""
    return {line.split(" | ")[1]: line for line in md.splitlines()
            if line.startswith("| ") and " | " in line}


AWP = [{"name": "awp", "params": {"gamma": 0.01}}]
EMA = {"ema": {"best": {"clean": 0.8, "pgd20": 0.6, "autoattack": 0.55},
               "last": {"clean": 0.8, "pgd20": 0.58, "autoattack": 0.54}}}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """AT with 3 seeds; AT+AWP with 2 seeds, twice as slow, plus an EMA model (whose worst
    case beats every row) and a note-level flag."""
    res = tmp_path / "results"
    for seed, aa in enumerate([0.40, 0.42, 0.44]):
        write(res, make_record(seed=seed, aa_last=aa, pgd_last=0.45 + 0.01 * seed))
    note = [flag("aa_zero_gradients", "note")]
    for seed in (0, 1):
        write(res, make_record("AT+AWP", defenses=AWP, seed=seed, aa_last=0.50, spe=4.0,
                               passes=3000, extra_models=EMA, flags=note if seed else None))
    return res


def quick(results: Path) -> pd.DataFrame:
    return tables(results)["quick"].set_index("row")


def test_make_record_is_valid_and_bits_agree() -> None:
    """The helper itself: per-image bits agree with the numbers (else validate_record fails)."""
    rec = make_record(aa_last=0.4, wc_last=0.3, extra_models=EMA, n=64, n_sub=16)
    last = rec["metrics"]["model"]["last"]
    assert (last["worst_case"], last["n_worst_case"], last["n"]) == (0.3125, 16, 64)


# ----------------------------------------------------------------------- aggregation

def test_mean_std_gap_and_seeds(results: Path) -> None:
    t = quick(results)
    at = t.loc["AT"]
    assert at["autoattack_last_mean"] == pytest.approx(0.42)
    assert at["autoattack_last_std"] == pytest.approx(0.02)  # sample std over seeds
    assert at["gap_pgd20_mean"] == pytest.approx(0.55 - 0.46)
    assert at["gap_autoattack_mean"] == pytest.approx(0.50 - 0.42)
    # worst case = min over the attacks per image: AutoAttack here (below PGD)
    assert at["worst_case_last_mean"] == pytest.approx(0.42)
    assert at["gap_worst_case_mean"] == pytest.approx(0.50 - 0.42)
    assert at["worst_case_last_n"] == 3 and at["autoattack_last_n"] == 3
    assert at["best_epoch_mean"] == pytest.approx(4.0)
    assert at["seeds"] == "3/3" and at["n_seeds"] == 3 and at["seed_list"] == "0,1,2"
    assert t.loc["AT+AWP", "seeds"] == "2/3 ⚠"


def test_rank_order_sub_rows_and_notes(results: Path) -> None:
    """Ranked by last worst case; the EMA sub-row sits right under its row, unranked, though
    its worst case beats every row; a note-level flag goes to `notes` and marks nothing."""
    t = tables(results)["quick"]
    assert list(t["row"]) == ["AT+AWP", "↳ AT+AWP [ema]", "AT"]
    assert t["rank"].tolist()[0] == 1 and pd.isna(t["rank"].tolist()[1])
    assert t["rank"].tolist()[2] == 2
    t = t.set_index("row")
    assert t.loc["↳ AT+AWP [ema]", "worst_case_last_mean"] > t.loc["AT+AWP",
                                                                     "worst_case_last_mean"]
    assert t.loc["AT+AWP", "notes"] == "aa_zero_gradients" and t.loc["AT+AWP", "flags"] == ""
    assert t.loc["AT+AWP", "marks"] == "" and t.loc["↳ AT+AWP [ema]", "notes"] == ""


def test_ranking_uses_the_worst_case_not_autoattack(tmp_path: Path) -> None:
    """A row with the higher AutoAttack but the lower per-image worst case (Square broke
    more of its images) ranks below; ties go by row name."""
    res = tmp_path / "results"
    write(res, make_record("AT", aa_last=0.44, wc_last=0.30))
    write(res, make_record("AT+AWP", defenses=AWP, aa_last=0.40, wc_last=0.35))
    write(res, make_record("AT+CURE", defenses=[{"name": "cure", "params": {}}], aa_last=0.40,
                           wc_last=0.35))
    t = tables(res)["quick"]
    assert list(t["row"]) == ["AT+AWP", "AT+CURE", "AT"]
    assert t["rank"].tolist() == [1, 2, 3]


def test_masking_and_integrity_flags_unrank_health_only_marks(tmp_path: Path) -> None:
    res = tmp_path / "results"
    cure, dom = [{"name": "cure", "params": {}}], [{"name": "dom", "params": {}}]
    write(res, make_record("AT", wc_last=0.20))
    # masking on one seed's best checkpoint only: the whole row is not ranked
    for seed in (0, 1):
        flags = [flag("zero_gradients", "masking", ckpt="best")]
        if seed:
            flags += [flag("aa_pgd_gap", "masking", ckpt="best"), flag("aa_square", "note"),
                      flag("aa_zero_gradients", "note"),
                      flag("aa_zero_gradients", "note", ckpt="best")]
        write(res, make_record("AT+AWP", defenses=AWP, seed=seed, wc_last=0.39, flags=flags))
    write(res, make_record("AT+DOM", defenses=dom, wc_last=0.38,
                           flags=[flag("curve_mismatch", "integrity")]))
    # health keeps the rank; a masking flag on an extra model does not unrank its row
    write(res, make_record("AT+CURE", defenses=cure, wc_last=0.30, extra_models=EMA,
                           flags=[flag("near_chance", "health"),
                                  flag("huge_eps", "masking", model="ema")]))
    t = tables(res)["quick"]
    assert list(t["row"]) == ["AT+CURE", "↳ AT+CURE [ema]", "AT", "AT+AWP", "AT+DOM"]
    assert t["rank"].iloc[0] == 1 and t["rank"].iloc[2] == 2
    assert t["rank"].iloc[3:].isna().all() and pd.isna(t["rank"].iloc[1])
    t = t.set_index("row")
    assert t.loc["AT+AWP", "marks"] == "⚑" and t.loc["AT+DOM", "marks"] == "⚑"
    assert t.loc["AT+CURE", "marks"] == "†" and t.loc["AT", "marks"] == ""
    assert t.loc["↳ AT+CURE [ema]", "marks"] == "⚑"  # its own flag, shown, ranks nothing
    # distinct check names, each AutoAttack message kind under its own name
    assert t.loc["AT+AWP", "flags"] == "aa_pgd_gap, zero_gradients"
    assert t.loc["AT+AWP", "notes"] == "aa_square, aa_zero_gradients"
    assert t.loc["AT+CURE", "flags"] == "near_chance" and t.loc["AT+CURE", "notes"] == ""
    md = board(res, tmp_path / "out")
    lines = md_lines(md)
    assert lines["AT+AWP"].startswith("| ⚑ | AT+AWP |")
    # one seed each: no interval, so each could take either rank (statistics: rank ranges)
    assert lines["AT+CURE"].startswith("| 1–2 † | AT+CURE |")
    assert lines["AT"].startswith("| 1–2 | AT |")
    assert "⚑ = not ranked" in md and "† = a *health* check fired" in md


# ---------------------------------------------------------------------------- validation

def test_invalid_records_are_left_out_with_a_warning(results: Path) -> None:
    bad = results / "quick" / "broken" / "record.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    old = make_record(seed=9)
    old["schema"] = 1
    too_high = make_record(seed=8)
    too_high["metrics"]["model"]["last"]["pgd20"] = 1.7
    lying = make_record(seed=7)  # its numbers disagree with its own per-image results
    lying["metrics"]["model"]["last"]["autoattack"] = 0.45
    paths = [write(results, r, folder=f) for r, f in
             ((old, "old"), (too_high, "high"), (lying, "lying"))]
    with pytest.warns(LeaderboardWarning) as caught:
        recs = load_records(results)
    text = "\n".join(str(w.message) for w in caught)
    for path in [bad, *paths]:
        assert str(path) in text
    assert "schema" in text and "1.7" in text and "disagrees with its per-image" in text
    assert len(recs) == 5


def test_strict_mode_raises_naming_the_file(results: Path, tmp_path: Path) -> None:
    rec = make_record(seed=1)
    rec["metrics"]["model"]["best"]["pgd20"] = 1.7
    path = write(results, rec, folder="bad")
    with pytest.raises(InvalidRecordError, match=str(path)) as info:
        load_records(results, strict=True)
    assert isinstance(info.value, ValueError) and "pgd20" in str(info.value)
    with pytest.raises(InvalidRecordError, match=str(path)):
        write_leaderboard(results, tmp_path / "o", plots=False, strict=True,
                          current_hashes=CURRENT)
    with pytest.warns(LeaderboardWarning, match="skipping invalid"):
        assert len(load_records(results, strict=False)) == 5
    out = tmp_path / "o2"
    assert main(["--results", str(results), "--out", str(out), "--strict", "--no-plots"]) == 2
    assert not (out / "leaderboard.md").exists()


def test_no_records_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordsNotFoundError, match="robench run"):
        load_records(tmp_path / "empty")
    with pytest.raises(ValueError, match="does not exist"):
        load_records(tmp_path / "missing")
    assert main(["--results", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2


def test_malformed_co_field_is_skipped(tmp_path: Path) -> None:
    res = tmp_path / "results"
    write(res, make_record())
    bad = co_record("AT", "at", 1, None)
    bad["catastrophic_overfitting"] = {"epoch": "twelve"}
    write(res, bad)
    with pytest.warns(LeaderboardWarning, match="catastrophic_overfitting"):
        assert len(load_records(res)) == 1


# ------------------------------------------------------------------------ suite versions

def test_the_current_table_is_the_installed_suite_file(results: Path, tmp_path: Path) -> None:
    """Records made under another protocol hash never join the current table, even when
    they are the newest."""
    write(results, make_record(seed=0, suite_hash=OLD_HASH, aa_last=0.10,
                               created="2026-06-01T00:00:00Z"), folder="newer")
    with pytest.warns(LeaderboardWarning, match="another version of the suite file"):
        t = tables(results)
    assert set(t) == {"quick", f"quick@{OLD_HASH[:8]}"}
    assert t["quick"].attrs["hash"] == HASH and t["quick"].attrs["current"]
    assert t["quick"].set_index("row").loc["AT", "autoattack_last_mean"] == pytest.approx(0.42)
    other = t[f"quick@{OLD_HASH[:8]}"]
    assert other["autoattack_last_mean"].tolist() == [0.10] and not other.attrs["current"]
    with pytest.warns(LeaderboardWarning):
        md = board(results, tmp_path / "out")
    assert f"## quick@{OLD_HASH[:8]}" in md and "Another version of suite `quick`" in md
    assert "not comparable with the current table" in md


def test_a_suite_without_installed_file_has_no_current_table(results: Path) -> None:
    write(results, make_record(seed=0, suite_hash=OLD_HASH), folder="old")
    with pytest.warns(LeaderboardWarning, match="no installed suite file"):
        t = compile_tables(load_records(results), current_hashes={})
    assert set(t) == {f"quick@{HASH[:8]}", f"quick@{OLD_HASH[:8]}"}
    assert not any(table.attrs["current"] for table in t.values())
    assert t[f"quick@{HASH[:8]}"].attrs["status"] == "not_installed"


def test_current_hashes_default_to_the_installed_suites(tmp_path: Path) -> None:
    from bench.config import load_suite

    installed = load_suite("smoke")
    res = tmp_path / "results"
    write(res, make_record(suite="smoke", suite_hash=installed.protocol_hash,
                           seeds=installed.seeds))
    write(res, make_record(suite="smoke", suite_hash=OLD_HASH, seeds=installed.seeds,
                           created="2026-06-01T00:00:00Z"), folder="older-file")
    with pytest.warns(LeaderboardWarning, match="another version"):
        t = compile_tables(load_records(res))
    assert set(t) == {"smoke", f"smoke@{OLD_HASH[:8]}"}
    assert t["smoke"].attrs["hash"] == installed.protocol_hash
    assert t["smoke"].attrs["seeds"] == list(installed.seeds)


def test_duplicate_seed_is_deduplicated(results: Path) -> None:
    write(results, make_record(seed=0, aa_last=0.40), folder="copy")
    with pytest.warns(LeaderboardWarning, match="duplicate run AT seed 0"):
        t = quick(results)
    assert t.loc["AT", "n_seeds"] == 3
    assert t.loc["AT", "autoattack_last_mean"] == pytest.approx(0.42)


# ------------------------------------------------------------------- honest aggregation

def test_different_effective_settings_are_never_averaged(tmp_path: Path) -> None:
    """Rows are keyed by the EFFECTIVE parameters and the run hash, not the command line."""
    res = tmp_path / "results"
    plain = [{"name": "awp", "params": {}}]
    # same command line, different effective gamma (e.g. a changed default)
    write(res, make_record("AT+AWP", defenses=plain,
                           defense_params={"awp": {"gamma": 0.01, "warmup": 5}}))
    write(res, make_record("AT+AWP", defenses=plain, seed=1, aa_last=0.2,
                           defense_params={"awp": {"gamma": 0.005, "warmup": 5}}), folder="b")
    t = tables(res)["quick"].set_index("row")
    assert set(t.index) == {"AT+AWP (gamma=0.01)", "AT+AWP (gamma=0.005)"}  # what differs
    assert t.loc["AT+AWP (gamma=0.005)", "autoattack_last_mean"] == pytest.approx(0.2)
    assert t.loc["AT+AWP (gamma=0.01)", "params"] == "awp(gamma=0.01, warmup=5)"
    # same effective parameters, different suite settings for the defense (run hash)
    res2 = tmp_path / "results2"
    write(res2, make_record("AT+AWP", defenses=AWP, run_hash="e" * 64))
    write(res2, make_record("AT+AWP", defenses=AWP, seed=1, run_hash="f" * 64), folder="b")
    assert set(tables(res2)["quick"]["row"]) == {"AT+AWP #eeeeee", "AT+AWP #ffffff"}
    # different command lines, same effective parameters: one row of two seeds
    res3 = tmp_path / "results3"
    write(res3, make_record("AT+AWP", defenses=AWP))
    write(res3, make_record("AT+AWP", defenses=plain, seed=1,
                            defense_params={"awp": {"gamma": 0.01}}), folder="b")
    t3 = tables(res3)["quick"]
    assert t3["row"].tolist() == ["AT+AWP"] and t3.loc[0, "n_seeds"] == 2


def test_mixed_sources_or_commits_in_one_row_are_warned_about(tmp_path: Path) -> None:
    res = tmp_path / "results"
    write(res, make_record("AT+AWP", defenses=AWP, seed=0))
    write(res, make_record("AT+AWP", defenses=AWP, seed=1, source_sha="9" * 64))
    with pytest.warns(LeaderboardWarning, match="different source files of defense 'awp'"):
        tables(res)
    res2 = tmp_path / "results2"
    write(res2, make_record(seed=0))
    write(res2, make_record(seed=1, commit="e" * 40))
    with pytest.warns(LeaderboardWarning, match="2 different git commits"):
        tables(res2)
    res3 = tmp_path / "results3"  # same sources and commit: silent
    write(res3, make_record("AT+AWP", defenses=AWP, seed=0))
    write(res3, make_record("AT+AWP", defenses=AWP, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeaderboardWarning)
        tables(res3)


def test_seeds_the_suite_does_not_ask_for_are_kept_apart(tmp_path: Path) -> None:
    res = tmp_path / "results"
    for seed in (0, 1):
        write(res, make_record(seed=seed, aa_last=0.40))
    write(res, make_record(seed=7, aa_last=0.60, pgd_last=0.7, wc_last=0.6))
    write(res, make_record(seed=9, aa_last=0.50, pgd_last=0.7, wc_last=0.5))
    t = tables(res)["quick"]
    assert t["row"].tolist() == ["AT", "AT (seeds 7, 9)"]
    official, other = t.iloc[0], t.iloc[1]
    assert official["seeds"] == "2/3 ⚠" and official["n_seeds"] == 2
    assert official["autoattack_last_mean"] == pytest.approx(0.40) and official["rank"] == 1
    assert not other["official"] and pd.isna(other["rank"]) and "○" in other["marks"]
    assert other["autoattack_last_mean"] == pytest.approx(0.55) and other["seed_list"] == "7,9"
    md = board(res, tmp_path / "out")
    main_table, apart = md.split("### Runs with seeds the suite does not ask for (not ranked)")
    assert "| AT (seeds 7, 9) |" in apart and "AT (seeds" not in main_table
    assert md_lines(md)["AT (seeds 7, 9)"].startswith("| ○ |")


def test_a_cell_with_fewer_seeds_says_so(tmp_path: Path) -> None:
    res = tmp_path / "results"
    for seed, aa in enumerate([0.40, 0.42, None]):
        write(res, make_record(seed=seed, aa_last=aa, pgd_last=0.45))
    t = tables(res)["quick"].set_index("row")
    at = t.loc["AT"]
    assert at["autoattack_last_mean"] == pytest.approx(0.41) and at["autoattack_last_n"] == 2
    assert at["gap_autoattack_n"] == 2 and at["autoattack_best_n"] == 3
    assert at["worst_case_last_n"] == 3 and at["n_seeds"] == 3
    lines = md_lines(board(res, tmp_path / "out"))
    # t interval, 1 degree of freedom: 41 ± 12.7062 * 1.41421 / sqrt(2) = 41 ± 12.71
    assert "| 41.00 ± 1.41 [28.29, 53.71] (2/3) |" in lines["AT"]
    assert "| 50.00 ± 0.00 [50.00, 50.00] |" in lines["AT"]  # AutoAttack best: every seed, no count
    csv = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert csv.loc[0, "autoattack_last_n"] == 2
    # an extra model one seed lacks: its cells count the seeds it has, out of the row's
    res2 = tmp_path / "results2"
    write(res2, make_record("AT+AWP", defenses=AWP, seed=0, extra_models=EMA))
    write(res2, make_record("AT+AWP", defenses=AWP, seed=1))
    ema = tables(res2)["quick"].set_index("row").loc["↳ AT+AWP [ema]"]
    assert ema["worst_case_last_n"] == 1 and ema["n_seeds"] == 2
    assert "| 54.00 (1/2) |" in md_lines(board(res2, tmp_path / "out2"))["↳ AT+AWP [ema]"]


def test_null_autoattack_shows_a_dash_and_ranks_by_worst_case(tmp_path: Path) -> None:
    res = tmp_path / "results"
    write(res, make_record(aa_last=None, aa_best=None, pgd_last=0.30))
    write(res, make_record("AT+AWP", defenses=AWP, aa_last=None, aa_best=None, pgd_last=0.35))
    t = tables(res)["quick"]
    assert list(t["row"]) == ["AT+AWP", "AT"]
    assert t["autoattack_last_mean"].isna().all() and t["gap_autoattack_mean"].isna().all()
    assert (t["autoattack_last_n"] == 0).all()
    assert "| – |" in board(res, tmp_path / "out")


# ------------------------------------------------------------------------------- labels

def test_attack_columns_say_what_ran_on_how_many_images(tmp_path: Path) -> None:
    res = tmp_path / "results"
    write(res, make_record(aa_version="apgd", n=400, n_sub=200))
    md = board(res, tmp_path / "out")
    assert "| APGD-CE+APGD-T best (200 img) | APGD-CE+APGD-T last (200 img) |" in md
    assert "| worst case best (200 img) | worst case last (200 img) |" in md
    assert "AutoAttack best" not in md and "AutoAttack last" not in md
    assert "APGD-CE+APGD-T (AutoAttack version `apgd`) on the first 200 of the 400 test" in md
    assert "PGD-20 and CW-20 (CW-20 in the CSV/JSON files only) ran on all 400 test" in md
    assert "Square check (1000 queries) on the first 200 of the 400 test images" in md
    assert ("only if every attack failed on it (clean classification, PGD-20, CW-20, "
            "APGD-CE+APGD-T and the Square check (1000 queries))") in md
    # a record claiming the standard label for the APGD pair is not believed
    forged = tmp_path / "forged"
    rec = make_record(aa_version="apgd", n=400, n_sub=200)
    rec["evaluation"]["autoattack"]["label"] = "AutoAttack"
    write(forged, rec)
    assert "| APGD-CE+APGD-T best (200 img) |" in board(forged, tmp_path / "out1")
    standard = tmp_path / "standard"
    write(standard, make_record())
    md = board(standard, tmp_path / "out2")
    assert "| AutoAttack best | AutoAttack last | worst case best | worst case last |" in md
    assert "img)" not in md
    none = tmp_path / "none"
    write(none, make_record(aa_version="none"))
    md = board(none, tmp_path / "out3")
    assert "AutoAttack (not run) last" in md and "AutoAttack was not run" in md


# ----------------------------------------------------------------------- kept behaviour

def test_cost_ratio_vs_at(results: Path, tmp_path: Path) -> None:
    t = quick(results)
    assert t.loc["AT", "cost_vs_base"] == pytest.approx(1.0)
    assert t.loc["AT+AWP", "cost_vs_base"] == pytest.approx(2.0)
    assert t.loc["AT+AWP", "passes_vs_base"] == pytest.approx(3.0)
    assert set(t["cost_base"]) == {"AT"}
    assert "| cost vs AT | passes vs AT |" in board(results, tmp_path / "board")
    lone = tmp_path / "lone"
    write(lone, make_record("AT+AWP", defenses=AWP))
    assert tables(lone)["quick"]["cost_vs_base"].isna().all()


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
    md = board(results, tmp_path / "out")
    assert "extra pretraining |" in md and "(standard training, 10 epochs) (20 s) |" in md


def test_cost_uses_cpu_seconds_when_every_run_has_them(tmp_path: Path) -> None:
    """Process CPU seconds (CPU runs) replace wall seconds in the cost column only when
    every record of the suite has them; a mix falls back to wall time for all rows."""
    def with_cpu(rec: dict, cpu: float) -> dict:
        rec["cost"]["cpu_seconds_per_epoch"] = [cpu] * 10
        return rec

    both = tmp_path / "both"
    write(both, with_cpu(make_record("AT", spe=4.0), 1.0))  # wall inflated by other jobs
    write(both, with_cpu(make_record("AT+AWP", defenses=AWP, spe=2.0), 1.5))
    table = tables(both)["quick"].set_index("row")
    assert table.loc["AT+AWP", "cost_vs_base"] == pytest.approx(1.5)
    mixed = tmp_path / "mixed"
    write(mixed, make_record("AT", spe=4.0))
    write(mixed, with_cpu(make_record("AT+AWP", defenses=AWP, spe=2.0), 1.5))
    table = tables(mixed)["quick"].set_index("row")
    assert table.loc["AT+AWP", "cost_vs_base"] == pytest.approx(0.5)


def test_written_files_markdown_csv_and_json(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    paths = write_leaderboard(results, out, current_hashes=CURRENT)
    names = [p.name for p in paths]
    assert names[:6] == ["leaderboard.md", "leaderboard.csv", "leaderboard.json",
                         "leaderboard.tex", "reproduction.md", "reproduction.json"]
    assert "curves_quick.png" in names and all(p.exists() for p in paths)
    md = (out / "leaderboard.md").read_text()
    assert "## quick" in md and "A quick suite." in md and HASH[:12] in md
    # AT+AWP's interval [45, 45] lies inside AT's [37.03, 46.97]: tied, ranks 1–2
    for cell in ("| 1–2 | AT+AWP |", "| 1–2 | AT |", "|  | ↳ AT+AWP [ema] |", "2/3 ⚠",
                 "42.00 ± 2.00", "2.00×", "| aa_zero_gradients |"):
        assert cell in md
    assert "**AWP** (`awp`)" in md and "https://example.org/awp" in md
    written = pd.concat(tables(results).values(), ignore_index=True)
    back = pd.read_csv(out / "leaderboard.csv")
    assert list(back.columns) == list(written.columns) and back.columns[0] == "suite"
    assert {"rank", "official", "marks", "worst_case_last_mean", "autoattack_last_n"} <= set(
        back.columns)
    numeric = [c for c in written.select_dtypes("number").columns if c != "rank"]
    pd.testing.assert_frame_equal(back[numeric], written[numeric], check_dtype=False)
    assert back["row"].tolist() == written["row"].tolist()
    assert back["rank"].tolist()[0] == 1 and pd.isna(back["rank"][1])  # empty when unranked
    raw = (out / "leaderboard.csv").read_text().splitlines()
    assert raw[2].startswith("quick,,↳ AT+AWP [ema],")
    doc = json.loads((out / "leaderboard.json").read_text())
    assert doc["schema"] == 2
    assert doc["suites"]["quick"]["hash"] == HASH and len(doc["rows"]) == 3
    assert [r["rank"] for r in doc["rows"]] == [1, None, 2]
    assert all(r["official"] is True for r in doc["rows"])
    assert doc["suites"]["quick"]["evaluation"]["autoattack"]["version"] == "standard"


def test_curves_are_drawn_for_the_official_rows_only(tmp_path: Path) -> None:
    from leaderboard.grouping import prepare
    from leaderboard.plots import curve_rows

    res = tmp_path / "results"
    for seed in (0, 1, 7):
        write(res, make_record(seed=seed, extra_models=EMA))
    group = prepare(load_records(res), current_hashes=CURRENT)["quick"]
    rows = curve_rows(group)
    assert list(rows) == ["AT"] and [r["spec"]["seed"] for r in rows["AT"]] == [0, 1]
    paths = write_leaderboard(res, tmp_path / "out", current_hashes=CURRENT)
    assert [p.name for p in paths][6:] == ["curves_quick.png", "leaderboard.html"]


def test_markdown_escapes_pipes() -> None:
    from leaderboard.markdown import md_table

    text = md_table(["a|b"], [["c|d"]])
    assert "a\\|b" in text and "c\\|d" in text


def test_cli(results: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LeaderboardWarning)  # 'quick' is not installed
        assert main(["--results", str(results), "--out", str(tmp_path / "o"),
                     "--no-plots"]) == 0
    assert "leaderboard.md" in capsys.readouterr().out


def test_import_is_light() -> None:
    code = ("import sys, leaderboard.compile; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'defenses', 'bench')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ------------------------------------------------------------- catastrophic overfitting

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
    t = tables(results)
    assert "co_seeds" not in t["quick"].columns
    assert "co_seeds" not in t["fast"].columns  # checked, PGD only, nothing flagged
    assert "| CO |" not in board(results, tmp_path / "out")


def test_co_column_counts_seeds_and_earliest_epoch(tmp_path: Path) -> None:
    res = tmp_path / "results"
    for seed, epoch in enumerate([12, 9, None]):
        write(res, co_record("FGSM-RS", "fgsm_rs", seed, epoch, aa_last=0.0,
                             extra_models=EMA))
    for seed in range(3):
        write(res, co_record("N-FGSM", "n_fgsm", seed, None))
    t = tables(res)["fast"].set_index("row")
    assert t.loc["FGSM-RS", "co_seeds"] == 2 and t.loc["FGSM-RS", "co_checked"] == 3
    assert t.loc["FGSM-RS", "co_epoch_min"] == 9
    assert t.loc["N-FGSM", "co_seeds"] == 0 and pd.isna(t.loc["N-FGSM", "co_epoch_min"])
    assert t.loc["↳ FGSM-RS [ema]", "co_checked"] == 0  # the curves are the trained model's
    # no AT row on a single-step suite: the cost columns divide by plain FGSM-RS
    assert set(t["cost_base"]) == {"FGSM-RS"} and t.loc["FGSM-RS", "cost_vs_base"] == 1.0
    md = board(res, tmp_path / "out")
    assert "| best epoch | CO | seeds | cost vs FGSM-RS | passes vs FGSM-RS |" in md
    assert "*CO*: catastrophic overfitting" in md
    lines = md_lines(md)
    assert "| 2/3 @ep 9 |" in lines["FGSM-RS"]
    assert "| – | 3/3 |" in lines["N-FGSM"] and "| – | 3/3 |" in lines["↳ FGSM-RS [ema]"]
    csv = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert {"co_seeds", "co_checked", "co_epoch_min"} <= set(csv.columns)


def test_a_flagged_record_without_fgsm_curve_shows_the_column(tmp_path: Path) -> None:
    res = tmp_path / "results"
    write(res, co_record("AT", "at", 0, 7, fgsm_curve=False))
    rec = make_record("AT", seed=1, suite="fast")
    del rec["catastrophic_overfitting"]  # an older record: not checked
    write(res, rec)
    t = tables(res)["fast"]
    assert (t.loc[0, "co_seeds"], t.loc[0, "co_checked"], t.loc[0, "co_epoch_min"]) == (1, 1, 7)


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


def test_mixed_co_rule_versions_are_warned_about(tmp_path: Path) -> None:
    res = tmp_path / "results"
    write(res, co_record("FGSM-RS", "fgsm_rs", 0, 2))
    newer = co_record("FGSM-RS", "fgsm_rs", 1, None)
    newer["catastrophic_overfitting_rule"] = 2
    write(res, newer)
    with pytest.warns(LeaderboardWarning, match=r"different detector rules \(1 with no rule "
                      r"version, 1 with rule v2\).*robench recheck-co"):
        tables(res)
    old = co_record("FGSM-RS", "fgsm_rs", 0, 2)
    old["catastrophic_overfitting_rule"] = 2
    write(res, old)  # re-checked (same file): every record on one rule, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeaderboardWarning)
        tables(res)


def test_the_board_labels_each_autoattack_version_as_the_evaluator_names_it() -> None:
    from attacks.autoattack import VERSIONS, attack_set_label
    from leaderboard.tables import AA_LABELS as BOARD_LABELS

    assert {v: BOARD_LABELS[v] for v in VERSIONS} == {v: AA_LABELS[v] for v in VERSIONS}
    assert all(attack_set_label(v) == AA_LABELS[v] for v in VERSIONS)
