"""Suite hashes: what invalidates a run and what splits a leaderboard."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.config import (
    ConfigError,
    DefenseSpec,
    RunSpec,
    Suite,
    list_suites,
    load_suite,
    parse_suite,
)
from bench.engine import RunMismatchError
from bench.runner import run_dir_for, run_one

BASE = """
name = "h"
description = "{description}"
# {comment}
seeds = [0]
[data]
dataset = "synthetic"
[model]
name = "small_cnn"
[train]
epochs = {epochs}
{overrides}
"""


def suite(description="d", comment="c", epochs=2, overrides=""):
    text = BASE.format(description=description, comment=comment, epochs=epochs,
                       overrides=overrides)
    return parse_suite(text, "h", "test")


def test_comments_description_and_defense_tables_do_not_change_the_protocol():
    base = suite()
    assert suite(description="other", comment="edited").protocol_hash == base.protocol_hash
    tuned = suite(overrides="[defenses.dom_re]\ntau = 0.3")
    assert tuned.protocol_hash == base.protocol_hash
    assert suite(epochs=3).protocol_hash != base.protocol_hash


def test_adding_a_base_method_changes_neither_hash():
    base, more = suite(), parse_suite('methods = ["at", "trades"]\n' + BASE.format(
        description="d", comment="c", epochs=2, overrides=""), "h", "test")
    assert more.methods == ("at", "trades")
    assert more.protocol_hash == base.protocol_hash
    assert more.run_hash(["awp"]) == base.run_hash(["awp"])


def test_a_defense_table_invalidates_only_that_defense_s_runs():
    base, tuned = suite(), suite(overrides="[defenses.dom_re]\ntau = 0.3")
    assert tuned.run_hash([]) == base.run_hash([])
    assert tuned.run_hash(["awp"]) == base.run_hash(["awp"])
    assert tuned.run_hash(["dom_re"]) != base.run_hash(["dom_re"])
    assert tuned.overrides_for(["dom_re", "awp"]) == {"dom_re": {"tau": 0.3}}


@pytest.mark.parametrize("name", list_suites())
def test_every_shipped_suite_loads(name):
    loaded = load_suite(name)
    assert loaded.methods and len(loaded.protocol_hash) == 64


def test_a_finished_run_from_another_suite_version_is_refused(tmp_path):
    smoke = load_suite("smoke")
    spec = RunSpec("smoke", "at", (), 0)
    record = run_one(spec, tmp_path, progress=False, suite=smoke).record_path
    assert run_one(spec, tmp_path, progress=False, suite=smoke).seconds == 0.0  # reused
    doc = json.loads(record.read_text())
    doc["suite"]["run_hash"] = "0" * 64
    record.write_text(json.dumps(doc))
    with pytest.raises(RunMismatchError, match="another version of suite 'smoke'"):
        run_one(spec, tmp_path, progress=False, suite=smoke)
    shutil.rmtree(run_dir_for(spec, tmp_path))


FROZEN = """
name = "frozen"
seeds = [0, 1]
methods = ["fgsm_rs", "n_fgsm"]
[data]
dataset = "synthetic"
train_size = 256
[model]
name = "small_cnn"
width = 8
[train]
epochs = 3
eps = "8/255"
[curves]
size = 64
{fgsm}
[eval]
autoattack = "none"
"""
# protocol_hash of FROZEN without an fgsm line (first computed before `[curves] fgsm` existed;
# recomputed once when the methods list left the hash)
FROZEN_HASH = "a1523439eb1f65892f0165a0ef024f3d446820d1892d9c7ee85106b1e8c497fa"


def test_the_fgsm_curve_option_changes_no_existing_hash():
    assert parse_suite(FROZEN.format(fgsm=""), "f", "t").protocol_hash == FROZEN_HASH
    explicit_off = parse_suite(FROZEN.format(fgsm="fgsm = false"), "f", "t")
    assert explicit_off.protocol_hash == FROZEN_HASH
    assert parse_suite(FROZEN.format(fgsm="fgsm = true"), "f", "t").protocol_hash != FROZEN_HASH


def test_resources_are_read_and_never_change_the_hash():
    base = parse_suite(FROZEN.format(fgsm=""), "f", "t")
    asked = parse_suite(FROZEN.format(fgsm="") + "\n[resources]\ncpus = 4\ngpus = \"1/4\"\n",
                        "f", "t")
    assert (asked.resources.cpus, asked.resources.gpus) == (4.0, 0.25)
    assert (base.resources.cpus, base.resources.gpus) == (1.0, 1.0)
    assert asked.protocol_hash == base.protocol_hash == FROZEN_HASH
    assert Suite.from_dict(json.loads(json.dumps(asked.to_dict()))).resources == asked.resources
    with pytest.raises(ConfigError, match=r"\[resources\]: cpus must be > 0"):
        parse_suite(FROZEN.format(fgsm="") + "\n[resources]\ncpus = 0\n", "f", "t")


@pytest.mark.parametrize("name", list_suites())
def test_shipped_suite_hashes_are_the_hashes_without_the_optional_fields(name):
    """A suite with the option at its default hashes as it did before the field existed."""
    import hashlib

    loaded = load_suite(name)
    if loaded.curves.fgsm:
        pytest.skip("the suite turns the FGSM curve on")
    protocol = {k: v for k, v in loaded.to_dict().items()
                if k not in ("description", "defense_overrides", "source_hash", "methods")}
    del protocol["curves"]["fgsm"]
    protocol.pop("resources")  # what a run asks of a Ray cluster: never hashed
    assert protocol["data"].pop("injected_feature") == 0.0  # at its default: not hashed
    assert protocol.pop("clean_model") == {"epochs": 0}  # at its default: not hashed
    if protocol["eval"]["square_queries"] == 1000:  # at its default: not hashed
        del protocol["eval"]["square_queries"]
    if protocol["train"]["cyclic_momentum"] == ():  # at its default: not hashed
        del protocol["train"]["cyclic_momentum"]
    legacy = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()
    assert loaded.protocol_hash == legacy


def test_fgsm_option_must_be_a_boolean():
    from bench.config import ConfigError

    with pytest.raises(ConfigError, match="fgsm must be true or false"):
        parse_suite(FROZEN.format(fgsm='fgsm = "yes"'), "f", "t")


@pytest.mark.parametrize("name, eps, step", [("cifar10-fast", 8 / 255, 1.25),
                                             ("cifar10-fast-16", 16 / 255, 1.25),
                                             ("fmnist-fast", 0.2, 1.25)])
def test_single_step_suites(name, eps, step):
    """The catastrophic-overfitting suites: single-step methods, the FGSM curve, the
    cyclic schedule; FGSM-RS steps 1.25 eps (Wong, Rice & Kolter); the CPU suite's stated
    stressor is an injected class feature, which the GPU suites do not have."""
    s = load_suite(name)
    assert s.methods == ("fgsm_rs", "n_fgsm") and s.curves.fgsm
    assert s.train.eps == pytest.approx(eps)
    assert (s.train.fgsm_step_size or 1.25 * s.train.eps) == pytest.approx(step * s.train.eps)
    assert s.data.injected_feature == (0.1 if name == "fmnist-fast" else 0.0)
    assert (s.train.epochs, s.train.schedule, s.train.lr, s.train.batch_size) == (
        30, "cyclic", 0.2, 128)
    if name.startswith("cifar10"):
        assert s.model.name == "preact_resnet18" and s.eval.autoattack == "standard"
        assert (s.data.train_size, s.data.val_size, s.data.test_size) == (0, 1000, 0)
        assert s.train.weight_decay == pytest.approx(5e-4) and s.data.augment == "crop_flip"


def test_evaluating_under_another_suite_version_is_refused(tmp_path):
    from dataclasses import replace

    from invariants import train

    from bench.data import build_splits
    from bench.evaluate import evaluate_run

    smoke = load_suite("smoke")
    splits = build_splits(smoke.data, None, smoke.curves.size, with_test=True)
    trainer = train(tmp_path, smoke, splits)
    changed = replace(smoke, eval=replace(smoke.eval, pgd_steps=7))
    with pytest.raises(RunMismatchError, match="trained under another version"):
        evaluate_run(trainer.run_dir, changed, splits, progress=False)
    assert not (trainer.run_dir / "record.json").exists()


def test_resuming_under_another_suite_version_is_refused(tmp_path):
    from dataclasses import replace

    from invariants import train

    from bench.data import build_splits

    smoke = load_suite("smoke")
    splits = build_splits(smoke.data, None, smoke.curves.size)
    train(tmp_path, smoke, splits, stop=1)
    longer = replace(smoke, train=replace(smoke.train, epochs=3))
    with pytest.raises(RunMismatchError, match="delete the run folder to start over"):
        train(tmp_path, longer, splits)


@pytest.mark.parametrize("name", list_suites())
def test_a_suite_travels_to_a_child_process_unchanged(name):
    """The launcher sends suites as JSON (Suite.to_dict); the child rebuilds the same suite,
    hashes included, so a check against the installed file means the same in both."""
    suite = load_suite(name)
    again = Suite.from_dict(json.loads(json.dumps(suite.to_dict())))
    assert again == suite
    assert again.protocol_hash == suite.protocol_hash and again.source_hash == suite.source_hash
    names = list(suite.defense_overrides) or ["awp"]
    assert again.run_hash(names) == suite.run_hash(names)


def test_resuming_after_a_defense_default_changed_is_refused(tmp_path, monkeypatch):
    """A half-finished run made under other defaults (e.g. an older ROBench) must not go on
    under the new ones: the resumed run would mix two settings under one row."""
    from invariants import train

    from bench.data import build_splits
    from defenses.hr import HR

    smoke = load_suite("smoke")
    splits = build_splits(smoke.data, None, smoke.curves.size)
    hr = DefenseSpec("hr", ())
    train(tmp_path, smoke, splits, defenses=(hr,), stop=1)
    monkeypatch.setattr(HR, "params", {**HR.params, "alpha": HR.params["alpha"] + 0.25})
    with pytest.raises(RunMismatchError, match=r"other parameters for AT\+HR.*hr\.alpha: "):
        train(tmp_path, smoke, splits, defenses=(hr,))


def test_a_finished_run_made_under_other_defaults_is_not_reused(tmp_path):
    from bench.runner import Launch, plan_with_params_in_child
    from defenses.hr import HR

    smoke = load_suite("smoke")
    specs, expected = plan_with_params_in_child("smoke", ["hr"], None, [0], Launch())
    spec = next(s for s in specs if s.defense_names == ["hr"])
    # the plan hands the launcher the parameters the run will have: HR's defaults here
    # (the smoke suite sets none for it)
    assert expected[spec.run_id] == {"hr": json.loads(json.dumps(HR.params))}
    assert smoke.defense_overrides.get("hr") is None
    launch = Launch(tmp_path, progress=False, expected_params=expected)
    assert run_one(spec, suite=smoke, launch=launch).seconds > 0
    assert run_one(spec, suite=smoke, launch=launch).seconds == 0.0  # reused
    newer = {spec.run_id: {"hr": {**expected[spec.run_id]["hr"], "r": 0.5}}}
    with pytest.raises(RunMismatchError, match=r"other parameters for AT\+HR than .* \(hr\.r: "
                                               r"0\.2 -> 0\.5\)"):
        run_one(spec, suite=smoke, launch=Launch(tmp_path, progress=False,
                                                 expected_params=newer))


KNOB = """\
from defenses.base import Defense, DefenseCard


class Knob(Defense):
    card = DefenseCard(name="Knob", paper="a test")
    params = {"k": 1}
"""


def test_a_single_run_does_not_reuse_a_record_made_under_other_defaults(tmp_path):
    """`robench run` (no plan): the launcher asks a child for the run's parameters."""
    module = tmp_path / "knob.py"
    module.write_text(KNOB)
    smoke = load_suite("smoke")
    spec = RunSpec("smoke", "at", (DefenseSpec(f"{module}:Knob", ()),), 0)
    results = tmp_path / "results"
    assert run_one(spec, results, progress=False, suite=smoke).seconds > 0
    assert run_one(spec, results, progress=False, suite=smoke).seconds == 0.0  # reused
    module.write_text(KNOB.replace('"k": 1', '"k": 2'))  # the defense's default changed
    with pytest.raises(RunMismatchError, match=r"other parameters for AT\+Knob .*knob\.k: "
                                               r"1 -> 2"):
        run_one(spec, results, progress=False, suite=smoke)
