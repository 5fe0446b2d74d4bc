"""Tests for attacks/autoattack.py, the adapter around the official AutoAttack (pyautoattack)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import fit_briefly, make_prototype_data
from torch import nn

from attacks import robust_accuracy
from attacks.autoattack import (
    REDUCED_N_ITER,
    REDUCED_N_TARGET_CLASSES,
    STANDARD_ATTACKS,
    autoattack_settings,
    build_autoattack,
    run_autoattack,
)

EPS = 8 / 255


@pytest.fixture(scope="module")
def trained():
    """A small CNN with BatchNorm, trained for a few seconds; returns (model, x_test, y_test)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = make_prototype_data(4000, g)
    x_test, y_test = make_prototype_data(64, g)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip
    fit_briefly(model, x_train, y_train, g)
    return model, x_test, y_test


def test_standard_settings_are_the_official_ones(trained):
    """Guards against a dependency change silently weakening the evaluation."""
    model, _, _ = trained
    s = autoattack_settings(build_autoattack(model, eps=EPS, device="cpu"))
    assert STANDARD_ATTACKS == ("apgd-ce", "apgd-t", "fab-t", "square")
    assert s["attacks_to_run"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert s["version"] == "standard" and s["reduced"] is False
    assert s["norm"] == "Linf" and s["eps"] == pytest.approx(EPS)
    assert s["apgd"]["n_iter"] == 100 and s["apgd"]["n_restarts"] == 1
    assert s["apgd_targeted"]["n_iter"] == 100
    assert s["apgd_targeted"]["n_target_classes"] == 9
    assert s["apgd_targeted"]["loss"] == "dlr-targeted"
    assert s["fab"]["n_target_classes"] == 9
    assert s["square"]["n_queries"] == 5000


def test_reduced_settings_are_labelled(trained):
    model, _, _ = trained
    adversary = build_autoattack(model, eps=EPS, version="reduced", device="cpu")
    s = autoattack_settings(adversary)
    assert s["version"] == "reduced" and s["reduced"] is True
    assert s["attacks_to_run"] == ["apgd-ce", "apgd-t"]
    assert s["apgd"]["n_iter"] == s["apgd_targeted"]["n_iter"] == REDUCED_N_ITER
    assert s["apgd_targeted"]["n_target_classes"] == REDUCED_N_TARGET_CLASSES
    # APGD's step-size checkpoints follow the reduced iteration count
    assert adversary.apgd.n_iter_2 == max(int(0.22 * REDUCED_N_ITER), 1)
    with pytest.raises(ValueError):
        build_autoattack(model, eps=EPS, version="plus", device="cpu")


def test_apgd_version_keeps_the_standard_apgd_settings(trained):
    model, x, y = trained
    adversary = build_autoattack(model, eps=EPS, version="apgd", device="cpu")
    s = autoattack_settings(adversary)
    assert s["version"] == "apgd" and s["reduced"] is True
    assert s["attacks_to_run"] == ["apgd-ce", "apgd-t"]
    assert s["apgd"]["n_iter"] == 100 and s["apgd"]["n_restarts"] == 1
    assert s["apgd_targeted"]["n_iter"] == 100
    assert s["apgd_targeted"]["n_target_classes"] == 9


def _record_state(model: nn.Module) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    seen: list[tuple[bool, bool]] = []

    def hook(module, args):
        seen.append((module.training, any(p.requires_grad for p in module.parameters())))

    return seen, model.register_forward_pre_hook(hook)


def test_run_reduced_restores_model_and_captures_log(trained, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    model, x, y = trained
    x, y = x[:16], y[:16]
    model.train()
    model[0].bias.requires_grad_(False)  # a mixed set of flags must come back as it was
    flags = [p.requires_grad for p in model.parameters()]
    rng = torch.get_rng_state()
    seen, handle = _record_state(model)
    log_path = tmp_path / "aa.log"
    try:
        res = run_autoattack(
            model, x, y, eps=EPS, version="reduced", batch_size=8, log_path=str(log_path)
        )
        flags_after = [p.requires_grad for p in model.parameters()]
    finally:
        handle.remove()
        model[0].bias.requires_grad_(True)
    assert seen and all(s == (False, False) for s in seen)  # eval mode, frozen, throughout
    assert model.training
    assert flags_after == flags and flags[1] is False
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    model.eval()

    assert 0.0 <= res.robust_accuracy <= res.clean_accuracy <= 1.0
    assert res.clean_accuracy > 0.5 and res.robust_accuracy < res.clean_accuracy
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == torch.float32
    assert (res.x_adv - x).abs().max().item() <= EPS + 1e-5
    assert res.settings["version"] == "reduced"
    assert "apgd-ce" in res.log and "robust accuracy" in res.log
    assert res.warnings == []
    assert res.seconds > 0
    assert log_path.read_text() == res.log
    # nothing leaks to stdout or to the application's log handlers unless verbose
    assert capsys.readouterr().out == ""
    assert not [r for r in caplog.records if r.name.startswith("auto-attack")]


def test_run_standard_on_few_images(trained):
    model, x, y = trained
    model.eval()
    x, y = x[:8], y[:8]
    res = run_autoattack(model, x, y, eps=EPS, version="standard")
    assert res.settings["attacks_to_run"] == list(STANDARD_ATTACKS)
    assert res.robust_accuracy <= res.clean_accuracy
    pgd_acc = robust_accuracy(
        model,
        x,
        y,
        eps=EPS,
        step_size=EPS / 4,
        steps=20,
        generator=torch.Generator().manual_seed(0),
    )
    assert res.robust_accuracy <= pgd_acc + 1e-9
    for attack in STANDARD_ATTACKS:
        if res.robust_accuracy > 0:
            assert f"running {attack}" in res.log
    assert "max Linf perturbation" in res.log
    assert (res.x_adv - x).abs().max().item() <= EPS + 1e-5
    assert res.warnings == []


def test_autoattack_checks_are_captured(trained):
    """A model that outputs probabilities trips AutoAttack's own range check."""
    model, x, y = trained
    model.eval()
    prob_model = nn.Sequential(model, nn.Softmax(dim=1))
    res = run_autoattack(prob_model, x[:8], y[:8], eps=EPS, version="reduced")
    assert any("probability distribution" in w for w in res.warnings)
    assert "probability distribution" in res.log
