"""Records you can verify: what a record carries, `robench verify` (schema, checkpoint
hashes, re-evaluation), and an evaluator that never imports defense code."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.config import DefenseSpec, RunSpec, load_suite
from bench.data import build_splits
from bench.engine import Trainer
from bench.evaluate import evaluate_run
from leaderboard.schema import pack_bits, unpack_bits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A results folder with one evaluated smoke run of AT+FOMO (an extra model)."""
    torch.set_num_threads(1)
    suite = load_suite("smoke")
    results = tmp_path_factory.mktemp("verified") / "results"
    spec = RunSpec("smoke", "at", (DefenseSpec("fomo"),), 0)
    run_dir = results / "smoke" / spec.run_id
    Trainer(spec, suite, build_splits(suite.data, None, suite.curves.size), run_dir,
            progress=False).train()
    evaluate_run(run_dir, suite, build_splits(suite.data, None, suite.curves.size,
                                              with_test=True), progress=False)
    return results


@pytest.fixture
def copy(finished, tmp_path) -> tuple[Path, Path]:
    results = tmp_path / "results"
    shutil.copytree(finished, results)
    (record,) = results.glob("smoke/*/record.json")
    return results, record


def test_the_record_carries_what_verification_needs(copy):
    _, path = copy
    record = json.loads(path.read_text())
    for tag in ("best", "last"):
        data = (path.parent / f"{tag}.pt").read_bytes()
        assert record["checkpoints"][tag]["sha256"] == hashlib.sha256(data).hexdigest()
    prov = record["provenance"]
    source = (ROOT / "defenses" / "fomo.py").read_bytes()
    assert prov["defense_sources"]["fomo"]["sha256"] == hashlib.sha256(source).hexdigest()
    assert prov["robench_version"] and prov["versions"]["torch"] == torch.__version__
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40
    assert record["suite"]["file_hash"] == load_suite("smoke").source_hash
    assert record["evaluation"]["precision"] == "fp32" and record["evaluation"]["threads"] == 1
    assert record["models"] == {"model": {"role": "trained", "ranked": True},
                                "fomo.stable": {"role": "extra", "ranked": False}}
    assert record["defense_params"]["fomo"]["rho"] == 0.1 and record["cards"]["fomo"]["paper"]


def test_verify_passes_on_an_untouched_folder_and_reproduces_it(copy, capsys):
    results, path = copy
    assert main(["verify", str(results), "--reevaluate", "1"]) == 0
    out = capsys.readouterr().out
    assert f"ok       {path}" in out and "1 re-evaluated, 1 reproduced exactly" in out


def _rewrite(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def test_verify_refuses_a_number_outside_zero_one(copy, capsys):
    results, path = copy
    _rewrite(path, lambda r: r["metrics"]["model"]["last"].update(pgd20=1.7))
    assert main(["verify", str(results)]) == 2
    assert "metrics['model']['last'].pgd20: must be a fraction in [0, 1]" in capsys.readouterr().out


def test_verify_refuses_a_number_its_own_per_image_results_contradict(copy, capsys):
    results, path = copy

    def inflate(record):
        m = record["metrics"]["model"]["last"]
        m["pgd20"] = min(m["clean"], m["pgd20"] + 0.25)
    _rewrite(path, inflate)
    assert main(["verify", str(results)]) == 2
    assert "disagrees with its per-image results" in capsys.readouterr().out


def test_verify_refuses_an_image_robust_but_wrong_without_attack(copy, capsys):
    """Counts unchanged: one clean-correct image robust to PGD-20 is swapped for a
    misclassified one; robustness of a misclassified image is not robustness."""
    results, path = copy

    def swap(record):
        m = record["metrics"]["model"]["last"]
        bits = record["per_image"]["model"]["last"]
        clean, pgd = unpack_bits(bits["clean"], m["n"]), unpack_bits(bits["pgd20"], m["n"])
        pgd[pgd.index(True)] = False
        pgd[clean.index(False)] = True
        bits["pgd20"] = pack_bits(pgd)
    _rewrite(path, swap)
    assert main(["verify", str(results)]) == 2
    assert ("per_image['model']['last']['pgd20']: an image counted robust must also be "
            "classified correctly without attack") in capsys.readouterr().out


def test_verify_refuses_a_swapped_checkpoint(copy, capsys):
    results, path = copy
    shutil.copy2(path.parent / "best.pt", path.parent / "last.pt")
    assert main(["verify", str(results)]) == 2
    assert "last.pt is not the checkpoint that" in capsys.readouterr().out


def test_reevaluation_catches_a_forged_but_consistent_record(copy, capsys):
    """Bits and numbers changed together pass the schema; evaluating again does not."""
    results, path = copy

    def forge(record):
        m = record["metrics"]["model"]["last"]
        bits = record["per_image"]["model"]["last"]
        clean = unpack_bits(bits["clean"], m["n"])
        pgd = [c for c in clean]  # every clean-correct image now "robust" to PGD-20
        bits["pgd20"] = pack_bits(pgd)
        m["pgd20"] = sum(pgd) / m["n"]
        assert m["pgd20"] > 0
    _rewrite(path, forge)
    assert main(["verify", str(results)]) == 0  # self-consistent: the schema cannot tell
    assert main(["verify", str(results), "--reevaluate", "1"]) == 2
    assert "DIFFERS" in capsys.readouterr().out


def test_the_evaluator_never_imports_defense_code(copy):
    results, path = copy
    probe = ("import sys\nfrom bench.cli import main\n"
             f"assert main(['evaluate', {str(path.parent)!r}, '--quiet', '--threads', '1']) == 0\n"
             "loaded = sorted(m for m in sys.modules if m == 'defenses' or "
             "m.startswith('defenses.'))\nprint(loaded)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_weights_that_do_not_fit_the_architecture_are_refused(copy, capsys):
    _, path = copy
    last = torch.load(path.parent / "last.pt", weights_only=True)
    last["eval_models"]["fomo.stable"]["net.extra.weight"] = torch.zeros(3)
    torch.save(last, path.parent / "last.pt")
    assert main(["evaluate", str(path.parent), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'fomo.stable' does not fit the suite's architecture" in err
    assert len(err.strip().splitlines()) == 1


def test_a_checkpoint_of_an_older_robench_is_refused_with_its_remedy(copy, capsys):
    _, path = copy
    last = torch.load(path.parent / "last.pt", weights_only=True)
    del last["defense_params"]
    torch.save(last, path.parent / "last.pt")
    assert main(["evaluate", str(path.parent), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "written by an older ROBench" in err and "delete the run folder" in err
