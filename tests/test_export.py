"""`robench export RUN_DIR --robustbench OUT`: a RobustBench-style entry, a plain state_dict
and the architecture, checked against a real smoke run (trained and evaluated here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.config import ModelConfig, RunSpec, load_suite
from bench.data import DatasetInfo, build_splits
from bench.engine import Trainer
from bench.evaluate import evaluate_run
from bench.export import eps_text, eps_value
from bench.models import build_model

ROOT = Path(__file__).resolve().parents[1]
# the fields of a RobustBench model_info entry (written out here, not read from the code)
ROBUSTBENCH_FIELDS = {"link", "name", "authors", "additional_data", "number_forward_passes",
                      "dataset", "venue", "architecture", "eps", "clean_acc", "reported",
                      "autoattack_acc", "footnote", "unreliable"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One evaluated smoke run of plain AT, seed 0 (its best epoch is 1, its last 2)."""
    torch.set_num_threads(1)
    suite = load_suite("smoke")
    spec = RunSpec("smoke", "at", (), 0)
    folder = tmp_path_factory.mktemp("export") / "results" / "smoke" / spec.run_id
    Trainer(spec, suite, build_splits(suite.data, None, suite.curves.size), folder,
            device=torch.device("cpu"), progress=False).train()
    evaluate_run(folder, suite, build_splits(suite.data, None, suite.curves.size,
                                             with_test=True),
                 device=torch.device("cpu"), progress=False)
    return folder


def export(run_dir: Path, out: Path, *extra: str) -> tuple[dict, dict, dict]:
    assert main(["export", str(run_dir), "--robustbench", str(out), *extra]) == 0
    (entry_path,) = [p for p in out.glob("*.json") if not p.name.endswith(".architecture.json")]
    entry = json.loads(entry_path.read_text())
    arch = json.loads((out / entry["robench"]["architecture_file"]).read_text())
    weights = torch.load(out / entry["robench"]["state_dict"], weights_only=True)
    return entry, arch, weights


def clean_accuracy(arch: dict, weights: dict, splits) -> float:
    """Rebuild the described architecture by hand, load the weights (strict), and count
    correct test images, as the evaluator does: images / 255, argmax, fp32 on CPU."""
    d, m = arch["dataset"], arch["model"]
    info = DatasetInfo(d["name"], d["num_classes"], d["channels"], d["size"],
                       tuple(d["mean"]), tuple(d["std"]))
    model = build_model(ModelConfig(m["name"], m["kwargs"]), info)
    model.load_state_dict(weights, strict=True)
    model.eval()
    x = splits.test.x.float() / 255
    with torch.no_grad():
        correct = (model(x).argmax(1) == splits.test.y).sum().item()
    return correct / len(splits.test.y)


@pytest.mark.parametrize("tag", ["last", "best"])
def test_exported_model_reproduces_the_records_clean_accuracy(run_dir, tmp_path, smoke_splits,
                                                              tag):
    record = json.loads((run_dir / "record.json").read_text())
    assert record["checkpoints"]["best"]["epoch"] != record["checkpoints"]["last"]["epoch"]
    entry, arch, weights = export(run_dir, tmp_path / "out",
                                  *(["--checkpoint", "best"] if tag == "best" else []))
    # a plain state_dict: exactly the trained model's tensors of that checkpoint
    ckpt = torch.load(run_dir / f"{tag}.pt", weights_only=True)
    assert weights.keys() == ckpt["model"].keys()
    assert all(torch.equal(weights[k], ckpt["model"][k]) for k in weights)
    # the normalisation it was trained with: the dataset's mean and std
    assert arch["dataset"]["mean"] == pytest.approx(smoke_splits.info.mean, abs=1e-6)
    assert arch["dataset"]["std"] == pytest.approx(smoke_splits.info.std, abs=1e-6)
    acc = clean_accuracy(arch, weights, smoke_splits)
    m = record["metrics"]["model"][tag]
    assert acc == m["clean"] == entry["robench"]["clean"]
    assert entry["clean_acc"] == f"{100 * acc:.2f}"
    assert entry["robench"]["epoch"] == record["checkpoints"][tag]["epoch"] == m["epoch"]
    assert entry["robench"]["checkpoint"] == tag


def test_the_entry_has_every_field(run_dir, tmp_path):
    entry, arch, _ = export(run_dir, tmp_path / "out")
    record = json.loads((run_dir / "record.json").read_text())
    assert ROBUSTBENCH_FIELDS <= set(entry)
    assert entry["threat_model"] == "Linf"
    assert entry["eps"] == "0.1" and eps_value(entry["eps"]) == 0.1  # smoke: eps 0.1
    assert entry["robench"]["eps"] == 0.1
    assert entry["dataset"] == "synthetic" and entry["number_forward_passes"] == 1
    assert entry["additional_data"] is False and entry["reported"] == ""
    assert entry["architecture"] == "SmallCNN (batchnorm=True, conv_layers=2, " \
        "convs_per_block=1, fc=32, width=8)"
    aa = record["metrics"]["model"]["last"]["autoattack"]
    assert entry["autoattack_acc"] == f"{100 * aa:.2f}"
    assert entry["robench"]["n_autoattack"] == 64 and entry["robench"]["n_clean"] == 64
    assert entry["robench"]["autoattack_version"] == "reduced"
    assert entry["robench"]["evaluated_by"] == "ROBench"
    assert arch["model"]["name"] == "small_cnn" and arch["model"]["kwargs"]["width"] == 8
    assert (arch["dataset"]["num_classes"], arch["dataset"]["channels"],
            arch["dataset"]["size"]) == (10, 1, 16)


def test_eps_is_written_in_pixel_fractions():
    assert eps_text(8 / 255) == "8/255" and eps_value("8/255") == 8 / 255
    assert eps_text(2 / 255) == "2/255"
    assert eps_text(0.1) == "0.1" and eps_value("0.1") == 0.1


def test_card_fields_and_the_published_number(run_dir, tmp_path):
    """A record of an AWP row whose card publishes a matching AutoAttack number (edited
    into a copy of the record: the export reads cards from the record, never from code)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    record = json.loads((copy / "record.json").read_text())
    record["spec"]["defenses"] = [{"name": "awp", "params": {}}]
    record["defense_params"] = {"awp": {"gamma": 0.01}}
    published = {"value": 51.234, "metric": "autoattack", "checkpoint": "best",
                 "selection": "test", "method": "at", "defenses": ["awp"],
                 "params": {"awp": {"gamma": 0.01}}, "suite": "smoke"}
    record["cards"] = {"awp": {"name": "AWP", "paper": "Wu, Xia & Wang. Adversarial Weight "
                               "Perturbation Helps Robust Generalization", "venue": "NeurIPS 2020",
                               "link": "https://arxiv.org/abs/2004.05884",
                               "extra_data": "none", "published": [published]}}
    (copy / "record.json").write_text(json.dumps(record))
    entry, _, _ = export(copy, tmp_path / "last")
    assert entry["name"] == "Adversarial Weight Perturbation Helps Robust Generalization"
    assert entry["authors"] == "Wu, Xia & Wang" and entry["venue"] == "NeurIPS 2020"
    assert entry["link"] == "https://arxiv.org/abs/2004.05884"
    # a best-on-test number is compared with ROBench's last checkpoint only
    assert entry["reported"] == "51.23"
    entry, _, _ = export(copy, tmp_path / "best", "--checkpoint", "best")
    assert entry["reported"] == ""
    record["defense_params"] = {"awp": {"gamma": 0.005}}  # another variant: no match
    record["cards"]["awp"]["extra_data"] = "500k unlabeled images"
    (copy / "record.json").write_text(json.dumps(record))
    entry, _, _ = export(copy, tmp_path / "other")
    assert entry["reported"] == "" and entry["additional_data"] is True


@pytest.mark.parametrize("case", ["missing", "not_a_record", "tampered", "out_is_a_file"])
def test_bad_run_folder_is_one_clear_line(run_dir, tmp_path, capsys, case):
    folder = tmp_path / "run"
    if case != "missing":
        shutil.copytree(run_dir, folder)
    if case == "not_a_record":
        (folder / "record.json").write_text("{}")
    if case == "tampered":
        (folder / "last.pt").write_bytes((folder / "best.pt").read_bytes())
    if case == "out_is_a_file":
        (tmp_path / "out").write_text("")
    assert main(["export", str(folder), "--robustbench", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robench: error: ") and "\n" not in err
    assert {"missing": "no record.json", "not_a_record": "schema",
            "tampered": "sha256 differs", "out_is_a_file": "a file is there"}[case] in err
    assert not (tmp_path / "out").is_dir() or not any((tmp_path / "out").iterdir())


def test_export_imports_no_defense_code(run_dir, tmp_path):
    code = ("import sys; from bench.cli import main; "
            f"assert main(['export', {str(run_dir)!r}, '--robustbench', "
            f"{str(tmp_path / 'out')!r}]) == 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'defenses'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PYTHONPATH": str(ROOT),
                                                     "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip().splitlines()[-1] == "[]"
