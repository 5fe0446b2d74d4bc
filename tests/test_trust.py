"""Submissions that try to change a reported number, through the real launcher: each ends
with exactly the plain run's test numbers and flags, or is refused, or is flagged. Plus the
masking checks on models masked through their weights alone, and `robench verify`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import fit_briefly, make_prototype_data

from bench.config import DefenseSpec, RunSpec, load_suite
from bench.errors import RunFailedError
from bench.runner import run_one

ROOT = Path(__file__).resolve().parents[1]

# At import (in whatever process imports it) it notes where it runs and patches every
# evaluation function and threshold it can reach; in setup it hooks the live model so that
# eval-mode outputs are scaled by 1e4 (a saturated softmax: PGD-CE would see no gradient).
# Training itself is untouched, so an honest evaluation must equal the plain AT run's.
EVAL_TRICKS = """
import copy, json, os, sys
import torch
with open({marker!r}, "a") as f:
    f.write(json.dumps({{"pid": os.getpid(), "argv0": sys.argv[0]}}) + "\\n")
import attacks.autoattack, bench.evaluate, bench.sanity
bench.sanity.HUGE_EPS_MAX_ACC = 1.0
bench.sanity.AA_GAP_FLAG = 10.0
bench.sanity.near_chance_flag = lambda *args: []
bench.evaluate.correct_under_pgd = lambda model, x, y, *a, **k: torch.ones_like(y, dtype=bool)
from defenses.base import Defense, DefenseCard

class Tricks(Defense):
    card = DefenseCard(name="Tricks", paper="-", venue="-", link="-")
    extra_models = ("better",)

    def setup(self, state):
        self.better = copy.deepcopy(state.model)
        state.model.register_forward_hook(
            lambda module, inputs, out: out if module.training else out * 1e4)

    def eval_models(self, state):
        return {{"better": self.better}}
"""

FOREIGN_ARCHITECTURE = """
import torch
from defenses.base import Defense, DefenseCard

class Foreign(Defense):
    card = DefenseCard(name="Foreign", paper="-", venue="-", link="-")
    extra_models = ("other",)

    def setup(self, state):
        layer = torch.nn.LazyLinear(10) if LAZY else torch.nn.Linear(768, 10)
        self.other = torch.nn.Sequential(torch.nn.Flatten(), layer)

    def eval_models(self, state):
        return {"other": self.other}
"""

# replaces the engine's curve function in the training process: the validation curve says
# the last epoch is the best, whatever the weights (a zero best-to-last gap on the board)
CURVE_TAMPER = """
import bench.engine
from bench.curves import CurvePoint
from defenses.base import Defense, DefenseCard

real = bench.engine.curve_point
def fake(model, x, y, suite, seed, dtype, batch=500, fgsm=False):
    point = real(model, x, y, suite, seed, dtype, batch, fgsm)
    return CurvePoint(0.9 + 0.01 * fake.calls, point.clean, point.fgsm)
fake.calls = 0
bench.engine.curve_point = fake

class Tamper(Defense):
    card = DefenseCard(name="Tamper", paper="-", venue="-", link="-")

    def on_epoch_end(self, state):
        fake.calls += 1
"""


def _model_view(record: dict, model: str = "model") -> dict:
    flags = sorted((f["check"], f["level"], f["checkpoint"], f["message"])
                   for f in record["flags"] if f["model"] == model)
    return {"metrics": record["metrics"][model], "per_image": record["per_image"][model],
            "flags": flags, "curves": record["history"]["curves"]["val_robust"],
            "best_epoch": record["history"]["best_epoch"]}


def test_evaluation_tricks_change_nothing_and_never_run_in_the_launcher(tmp_path):
    """Through `run_full_evaluation.py`: the submission's module runs only in training
    processes; its patches, hook and extra model leave the trained model's record equal to
    the plain AT run's, and its extra model is a sub-row that is never ranked."""
    marker = tmp_path / "where.jsonl"
    module = tmp_path / "tricks.py"
    module.write_text(EVAL_TRICKS.format(marker=str(marker)))
    results = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "scripts" / "run_full_evaluation.py"), "--suite", "smoke",
           "--defenses", f"{module}:Tricks", "--results", str(results), "--quiet",
           "--threads", "1"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err
    records = {json.loads(p.read_text())["row_name"]: json.loads(p.read_text())
               for p in results.glob("smoke/*/record.json")}
    plain, tricks = records["AT"], records["AT+Tricks"]
    assert _model_view(tricks) == _model_view(plain)
    assert tricks["models"]["tricks.better"] == {"role": "extra", "ranked": False}
    where = [json.loads(line) for line in marker.read_text().splitlines()]
    assert where and launcher.pid not in {w["pid"] for w in where}
    assert all(w["argv0"].endswith(os.path.join("bench", "worker.py")) for w in where)
    board = (results / "leaderboard" / "leaderboard.csv").read_text()
    assert "↳ AT+Tricks [tricks.better]" in board


@pytest.mark.parametrize("lazy", [False, True])
def test_an_extra_model_of_another_architecture_is_refused(tmp_path, smoke_suite, lazy):
    module = tmp_path / "foreign.py"
    module.write_text(f"LAZY = {lazy}\n" + FOREIGN_ARCHITECTURE)
    spec = RunSpec("smoke", "at", (DefenseSpec(f"{module}:Foreign"),), 0)
    with pytest.raises(RunFailedError) as info:
        run_one(spec, tmp_path / "results", progress=False, suite=smoke_suite, threads=1)
    message = str(info.value)
    assert "\n" not in message and "eval_models" in message and str(module) in message
    assert "not of the suite's architecture" in message
    assert not list((tmp_path / "results").glob("smoke/*/record.json"))


def test_a_tampered_validation_curve_is_caught_and_unranks_the_row(tmp_path, smoke_suite):
    module = tmp_path / "tamper.py"
    module.write_text(CURVE_TAMPER)
    spec = RunSpec("smoke", "at", (DefenseSpec(f"{module}:Tamper"),), 0)
    result = run_one(spec, tmp_path / "results", progress=False, suite=smoke_suite, threads=1)
    record = json.loads(result.record_path.read_text())
    assert record["history"]["best_epoch"] == smoke_suite.train.epochs  # the fake chose it
    mismatch = [f for f in record["flags"] if f["check"] == "curve_mismatch"]
    assert {f["checkpoint"] for f in mismatch} == {"best", "last"}
    assert all(f["level"] == "integrity" for f in mismatch)
    from leaderboard.compile import compile_tables, load_records

    table = compile_tables(load_records(tmp_path / "results"),
                           current_hashes={"smoke": smoke_suite.protocol_hash})["smoke"]
    row = table.set_index("row").loc["AT+Tamper"]
    assert "curve_mismatch" in row["flags"] and pd.isna(row["rank"])


# ---- masking checks on models masked through their weights alone -------------------------


def _masked(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fc = [k for k in state if k.endswith("weight") and state[k].ndim == 2][-1]
    if kind == "logits_x1e4":
        state[fc] *= 1e4
        state[fc.replace("weight", "bias")] *= 1e4
    elif kind == "logits_x100":
        state[fc] *= 100
        state[fc.replace("weight", "bias")] *= 100
    elif kind == "bn_var":  # the last BatchNorm divides by ~1e-4 of its running std
        var = [k for k in state if k.endswith("running_var")][-1]
        state[var] *= 1e-8
    masked = type(model)(model.net, model.normalize.mean.flatten().tolist(),
                         model.normalize.std.flatten().tolist())
    masked.load_state_dict(state)
    return masked.eval()


@pytest.fixture(scope="module")
def honest():
    """A small CNN of the smoke suite's architecture, trained on clean prototype data."""
    from bench.data import DatasetInfo
    from bench.models import build_model

    smoke = load_suite("smoke")
    info = DatasetInfo("prototypes", 10, 3, 16, (0.5,) * 3, (0.25,) * 3)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = make_prototype_data(3000, g)
    x_test, y_test = make_prototype_data(64, g)
    model = build_model(smoke.model, info)
    fit_briefly(model, x_train, y_train, g, epochs=4)
    suite = replace(smoke, eval=replace(smoke.eval, square_queries=300))
    return model.eval(), x_test, y_test, suite


@pytest.mark.parametrize("kind", ["honest", "logits_x1e4", "logits_x100", "bn_var"])
def test_weight_masked_models_are_flagged_and_the_honest_one_is_not(honest, kind):
    import copy

    from bench.evaluate import evaluate_model

    model, x, y, suite = honest
    model = copy.deepcopy(model) if kind == "honest" else _masked(copy.deepcopy(model), kind)
    result = evaluate_model(model, x, y, suite, 0, kind, False, num_classes=10)
    masking = {f["check"] for f in result.flags if f["level"] == "masking"}
    assert result.metrics["clean"] > 0.8
    if kind == "honest":
        assert not masking
    else:
        # the argmax is the honest model's, the cross-entropy gradient is gone
        assert "zero_gradients" in masking
        assert "aa_pgd_gap" in {f["check"] for f in result.flags if f["level"] == "health"}
        assert result.metrics["pgd20"] > result.metrics["worst_case"] + 0.3


def test_worst_case_is_the_per_image_and_of_every_attack(honest):
    from bench.evaluate import evaluate_model

    model, x, y, suite = honest
    result = evaluate_model(_masked(model, "logits_x100"), x, y, suite, 0, "m", False, 10)
    bits = {k: v.tolist() for k, v in result.per_image.items()}
    n = result.metrics["n_worst_case"]
    expected = sum(all(bits[a][i] for a in ("clean", "pgd20", "cw20", "autoattack", "square"))
                   for i in range(n)) / n
    assert result.metrics["worst_case"] == pytest.approx(expected)
    assert result.metrics["worst_case"] <= min(result.metrics["cw20"], result.metrics["autoattack"])


def test_autoattack_dynamic_check_counter_is_reset_for_each_model(honest):
    """pyautoattack counts calls in a module-global dict and never resets it: once a model
    fired its dynamic-defense check, every later model was flagged."""
    from pyautoattack import checks

    from attacks.autoattack import run_autoattack

    model, x, y, _ = honest
    checks.funcs["grad"] = 3  # as left behind by an earlier, dynamic model
    result = run_autoattack(model, x[:16], y[:16], eps=0.1, version="reduced", device="cpu")
    assert not any("dynamic" in w for w in result.warnings)


class Rounded(torch.nn.Module):
    """The honest model behind input rounding: zero input gradient everywhere (not possible
    through a suite's architecture, but what the gradient-free check is there for)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 4) / 4)


def test_the_square_check_catches_gradients_that_are_useless_everywhere(honest):
    from bench.evaluate import evaluate_model

    model, x, y, suite = honest
    result = evaluate_model(Rounded(model).eval(), x, y, suite, 0, "rounded", False, 10)
    masking = {f["check"] for f in result.flags if f["level"] == "masking"}
    assert "square_beats_gradients" in masking and "zero_gradients" in masking
    m = result.metrics
    assert m["square_only"] > 0.1 and m["worst_case"] <= m["autoattack"] - m["square_only"]


def test_the_standard_version_s_own_square_gain_is_read_from_its_log():
    from bench.evaluate import square_gain_in_log

    log = ("initial accuracy: 80.00%\nrobust accuracy after APGD-CE: 50.00% (total time 1 s)\n"
           "robust accuracy after APGD-T: 46.00% (total time 2 s)\n"
           "robust accuracy after FAB-T: 45.60% (total time 3 s)\n"
           "robust accuracy after SQUARE: 41.20% (total time 9 s)\n")
    assert square_gain_in_log(log) == pytest.approx(0.044)
    assert square_gain_in_log(log.rsplit("robust accuracy after SQUARE", 1)[0]) is None


@pytest.mark.parametrize("change", ["drop a key", "add a key", "reshape", "not tensors"])
def test_the_evaluator_loads_only_weights_that_fit_the_architecture_exactly(honest, change):
    """A state_dict missing a layer would leave that layer at its random initialisation
    (a model nobody trained); an extra key, a wrong shape or a non-tensor value is refused
    the same way: one error naming the checkpoint, nothing evaluated."""
    from bench.data import DatasetInfo
    from bench.evaluate import model_from_weights
    from bench.records import RecordError

    model, _, _, suite = honest
    info = DatasetInfo("prototypes", 10, 3, 16, (0.5,) * 3, (0.25,) * 3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = model_from_weights(suite, info, weights, "model", Path("last.pt"), torch.device("cpu"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())
    first = next(k for k, v in weights.items() if v.dim() > 1)
    if change == "drop a key":
        del weights[first]
    elif change == "add a key":
        weights["extra.weight"] = torch.zeros(3)
    elif change == "reshape":
        weights[first] = weights[first].flatten()
    else:
        weights[first] = weights[first].tolist()
    with pytest.raises(RecordError, match=r"last\.pt: 'model' (does not fit|is not a state_dict)"):
        model_from_weights(suite, info, weights, "model", Path("last.pt"), torch.device("cpu"))


class _WrongOnlyWhenUnperturbed(torch.nn.Module):
    """Misclassifies each stored image exactly, classifies anything else correctly, with a
    zero input gradient: an attack's random start alone makes it 'correct'."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("x0", x.clone())
        self.register_buffer("y0", y.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat, stored = x.flatten(1), self.x0.flatten(1)
        nearest = torch.cdist(flat.detach(), stored).argmin(1)
        exact = (flat.detach() == stored[nearest]).all(1)
        label = torch.where(exact, (self.y0[nearest] + 1) % 10, self.y0[nearest])
        return 10.0 * torch.nn.functional.one_hot(label, 10).float() + (flat * 0.0).sum(1, True)


def test_an_image_wrong_without_attack_is_never_counted_robust(honest):
    from bench.evaluate import evaluate_model

    _, x, y, suite = honest
    model = _WrongOnlyWhenUnperturbed(x[:8], y[:8]).eval()
    result = evaluate_model(model, x[:8], y[:8], suite, 0, "t", False, num_classes=10)
    # the attacks' random start alone lands every image on its correct class
    assert model(x[:8] + 1e-3).argmax(1).eq(y[:8]).all()
    assert result.metrics["clean"] == 0.0
    assert result.metrics["pgd20"] == 0.0 and result.metrics["cw20"] == 0.0
    assert result.metrics["worst_case"] == 0.0
