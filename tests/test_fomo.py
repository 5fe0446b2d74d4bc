"""FOMO (defenses/fomo.py, defenses/_fomo_ops.py): eligible layers, the forgotten fraction,
re-initialisation and momentum reset, the EMA of the stable model, the consistency term,
the schedule, the random stream, and the shared invariants (zero strength, clean weights,
resume, methods, eval_models, parameters, card)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from conftest import with_train
from invariants import (
    assert_equal_nested,
    assert_same_state,
    check_resume_equals_uninterrupted,
    check_weights_clean_outside_update,
    model_state,
    states_differ,
    train,
)
from torch import nn

from bench.config import ConfigError, DefenseSpec, ModelConfig, RunSpec
from bench.engine import Trainer, collect_eval_models
from bench.models import PreActResNet18, SmallCNN
from bench.records import load_checkpoint, read_history
from bench.state import TrainState
from defenses._fomo_ops import (
    consistency_loss,
    eligible_kernels,
    ema_update_,
    fan_in,
    forgetting_masks,
    reinitialise_,
    reset_optimizer_state_,
)
from defenses.fomo import FOMO, RECONSTRUCTION, first_decay_fraction, forgetting_epochs
from defenses.registry import build_defenses

CPU = torch.device("cpu")
# forgetting after every epoch but the last, consistency from the first forgetting on
STRONG = {"rho": 0.5, "period": 1, "until": 1.0}


def spec(**params) -> DefenseSpec:
    return DefenseSpec("fomo", tuple(sorted(params.items())))


def stepped_trainer(tmp_path, suite, splits, fomo: FOMO) -> tuple[Trainer, TrainState]:
    """A trainer after one training step with `fomo` (momentum buffers exist)."""
    trainer = Trainer(RunSpec(suite.name, "at", (), 0), suite, splits, tmp_path, device=CPU,
                      progress=False)
    state = trainer.build()
    fomo.bind_random_stream(0, CPU)
    trainer.defenses = [fomo]
    fomo.setup(state)
    trainer.train_step(state, *next(iter(trainer.loader)))
    return trainer, state


# --------------------------------------------------------------------------- eligible layers


def test_eligible_kernels_of_preact_resnet18_are_layer3_layer4_and_linear():
    names = [n for n, _ in eligible_kernels(PreActResNet18(width=4))]
    expected = [f"{layer}.{block}.conv{i}.weight" for layer in ("layer3", "layer4")
                for block in (0, 1) for i in (1, 2)] + ["linear.weight"]
    assert names == expected
    with_shortcuts = [n for n, _ in eligible_kernels(PreActResNet18(width=4),
                                                     skip_shortcuts=False)]
    assert len(with_shortcuts) == 11 and "layer4.0.shortcut.weight" in with_shortcuts


def test_eligible_kernels_round_up_and_never_include_biases_or_batchnorm():
    model = SmallCNN(in_channels=3, size=16, width=4, conv_layers=3, fc=8)  # 3 conv + 2 linear
    names = [n for n, _ in eligible_kernels(model, 0.5)]
    assert names == ["features.8.weight", "classifier.1.weight", "classifier.3.weight"]
    assert [n for n, _ in eligible_kernels(model, 1.0)][0] == "features.0.weight"
    assert len(eligible_kernels(model, 0.2)) == 1


# --------------------------------------------------------------------------- forgetting


@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("rho", [0.0, 0.1, 0.37, 1.0])
def test_masks_mark_exactly_the_fraction(rho, per_layer):
    shapes = [torch.Size([8, 4, 3, 3]), torch.Size([10, 33]), torch.Size([7, 5, 1, 1])]
    masks = forgetting_masks(shapes, rho, torch.Generator().manual_seed(0), per_layer)
    assert [m.shape for m in masks] == shapes and all(m.dtype == torch.bool for m in masks)
    if per_layer:
        for m in masks:
            assert int(m.sum()) == math.floor(rho * m.numel() + 0.5)
    total = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == (
        math.floor(rho * total + 0.5) if not per_layer
        else sum(math.floor(rho * m.numel() + 0.5) for m in masks))


def test_masks_are_fresh_each_time_and_reproducible_from_the_stream():
    shapes = [torch.Size([64, 32])]
    gen = torch.Generator().manual_seed(0)
    first, second = forgetting_masks(shapes, 0.1, gen)[0], forgetting_masks(shapes, 0.1, gen)[0]
    assert not torch.equal(first, second)
    again = forgetting_masks(shapes, 0.1, torch.Generator().manual_seed(0))[0]
    assert torch.equal(first, again)


@pytest.mark.parametrize("init", ["default", "zeros"])
def test_reinitialise_changes_only_masked_entries(init):
    w = torch.full((16, 8, 3, 3), 5.0).contiguous(memory_format=torch.channels_last)
    mask = forgetting_masks([w.shape], 0.25, torch.Generator().manual_seed(1))[0]
    reinitialise_(w, mask, torch.Generator().manual_seed(2), init)
    assert torch.equal(w[~mask], torch.full_like(w[~mask], 5.0))
    bound = 1 / math.sqrt(fan_in(w))
    if init == "zeros":
        assert torch.equal(w[mask], torch.zeros_like(w[mask]))
    else:  # PyTorch's default kaiming_uniform(a=sqrt(5)) range
        assert bound == 1 / math.sqrt(72) and w[mask].abs().max() <= bound
        assert w[mask].std() > 0.3 * bound
    assert w.is_contiguous(memory_format=torch.channels_last)


def test_forget_touches_only_eligible_entries_and_resets_their_momentum(
        tmp_path, smoke_suite, smoke_splits):
    fomo = FOMO(rho=0.3)
    trainer, state = stepped_trainer(tmp_path, smoke_suite, smoke_splits, fomo)
    model = trainer.model
    eligible = {n for n, _ in fomo.eligible(model)}
    assert eligible == {"net.classifier.1.weight", "net.classifier.3.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    momentum = {n: trainer.optimizer.state[p]["momentum_buffer"].clone()
                for n, p in model.named_parameters()}
    assert all(m.abs().min() > 0 for n, m in momentum.items() if n in eligible)
    global_rng = torch.get_rng_state()
    masks = fomo.forget(state)
    assert torch.equal(torch.get_rng_state(), global_rng)  # only the defense's own stream
    masks_by_name = dict(zip([n for n, _ in fomo.eligible(model)], masks, strict=True))
    for name, p in model.named_parameters():
        buf = trainer.optimizer.state[p]["momentum_buffer"]
        if name not in eligible:
            assert torch.equal(p, before[name]) and torch.equal(buf, momentum[name]), name
            continue
        mask = masks_by_name[name]
        assert int(mask.sum()) == math.floor(0.3 * p.numel() + 0.5)
        assert torch.equal(p[~mask], before[name][~mask])
        assert (p[mask] != before[name][mask]).float().mean() > 0.99
        assert torch.equal(buf[mask], torch.zeros_like(buf[mask]))
        assert torch.equal(buf[~mask], momentum[name][~mask])
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert state.pop_logs()["fomo.forgotten"] == pytest.approx(0.3, abs=1e-3)


def test_reset_skips_parameters_without_optimizer_state():
    p = nn.Parameter(torch.ones(3, 3))
    reset_optimizer_state_(torch.optim.SGD([p], lr=0.1, momentum=0.9), [p],
                           [torch.ones(3, 3, dtype=torch.bool)])  # no step yet: no-op


# --------------------------------------------------------------------------- consolidation


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))


def test_ema_update_formula_and_batchnorm_buffers_copied():
    torch.manual_seed(0)
    working, stable = bn_net(), bn_net()
    working.train()(torch.randn(8, 3, 4, 4))  # moves the running statistics
    s0 = [p.detach().clone() for p in stable.parameters()]
    ema_update_(stable, working, 0.9)
    for s, old, w in zip(stable.parameters(), s0, working.parameters()):
        torch.testing.assert_close(s, 0.9 * old + 0.1 * w, rtol=1e-6, atol=1e-7)
    for s, w in zip(stable.buffers(), working.buffers()):
        assert torch.equal(s, w)  # running mean, var and num_batches_tracked
    assert int(stable[1].num_batches_tracked) == 1


def test_ema_gate_false_leaves_the_stable_model_exactly_and_true_updates_it():
    torch.manual_seed(0)
    working, stable = bn_net(), bn_net()
    working.train()(torch.randn(8, 3, 4, 4))
    reference = copy.deepcopy(stable)
    ema_update_(stable, working, 0.9, gate=torch.tensor(False))
    assert_same_state(stable.state_dict(), reference.state_dict())
    ema_update_(stable, working, 0.9, gate=torch.tensor(True))
    ema_update_(reference, working, 0.9)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(stable.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def test_after_step_updates_the_stable_model_from_the_working_one(tmp_path, smoke_suite,
                                                                 smoke_splits):
    fomo = FOMO(ema_decay=0.5)
    trainer, state = stepped_trainer(tmp_path, smoke_suite, smoke_splits, fomo)
    for (name, s), w in zip(fomo.stable.named_parameters(), trainer.model.parameters()):
        assert not s.requires_grad and not torch.equal(s, w), name
    assert all(torch.equal(s, w) for s, w in zip(fomo.stable.buffers(),
                                                 trainer.model.buffers()))
    fresh = FOMO()
    fresh.bind_random_stream(0, CPU)
    assert torch.equal(fomo.generator.get_state(), fresh.generator.get_state())  # no draws


def test_update_probability_zero_keeps_the_initial_model(tmp_path, smoke_suite, smoke_splits):
    fomo = FOMO(ema_update_prob=0.0)
    trainer = Trainer(RunSpec(smoke_suite.name, "at", (), 0), smoke_suite, smoke_splits,
                      tmp_path, device=CPU, progress=False)
    state = trainer.build()
    fomo.bind_random_stream(0, CPU)
    fomo.setup(state)
    initial = copy.deepcopy(fomo.stable.state_dict())
    start = fomo.generator.get_state()
    trainer.defenses = [fomo]
    trainer.train_step(state, *next(iter(trainer.loader)))
    assert_same_state(fomo.stable.state_dict(), initial)
    assert not torch.equal(fomo.generator.get_state(), start)  # the gate was drawn


def old_ema_update_(stable, working, decay, gate=None) -> None:
    """The per-tensor EMA update the foreach form replaced, written out again."""
    with torch.no_grad():
        if gate is None:
            for s, w in zip(stable.parameters(), working.parameters()):
                s.mul_(decay).add_(w, alpha=1 - decay)
            for s, w in zip(stable.buffers(), working.buffers()):
                s.copy_(w)
            return
        keep = torch.where(gate, decay, 1.0)
        for s, w in zip(stable.parameters(), working.parameters()):
            s.mul_(keep).add_(w.detach() * (1 - keep))
        for s, w in zip(stable.buffers(), working.buffers()):
            s.copy_(torch.where(gate, w, s))


@pytest.mark.parametrize("gate", [None, True, False])
def test_ema_update_is_the_per_tensor_update_bit_for_bit(gate):
    torch.manual_seed(3)
    working, stable = PreActResNet18(num_classes=10, width=4), PreActResNet18(
        num_classes=10, width=4)
    working.train()(torch.randn(4, 3, 8, 8))  # running statistics and counters move
    stable = stable.to(memory_format=torch.channels_last)
    new, old = copy.deepcopy(stable), copy.deepcopy(stable)
    g = None if gate is None else torch.tensor(gate)
    for _ in range(3):
        ema_update_(new, working, 0.999, g)
        old_ema_update_(old, working, 0.999, g)
    assert_same_state(new.state_dict(), old.state_dict())
    assert states_differ(new.state_dict(), stable.state_dict()) == (gate is not False)


def test_engine_results_equal_the_per_tensor_update_bit_for_bit(tmp_path, smoke_suite,
                                                              smoke_splits, monkeypatch):
    import defenses.fomo as module
    params = spec(**STRONG, ema_update_prob=0.5)
    new = train(tmp_path / "new", smoke_suite, smoke_splits, defenses=[params])
    monkeypatch.setattr(module, "ema_update_", old_ema_update_)
    old = train(tmp_path / "old", smoke_suite, smoke_splits, defenses=[params])
    a, b = load_checkpoint(new.run_dir / "last.pt"), load_checkpoint(old.run_dir / "last.pt")
    assert_same_state(a["model"], b["model"])
    assert_equal_nested(a["defenses"], b["defenses"])


# --------------------------------------------------------------------------- relearning


@pytest.mark.parametrize("kind", ["mse", "kl"])
def test_consistency_is_zero_when_the_models_agree(kind):
    logits = torch.randn(6, 10, requires_grad=True)
    assert consistency_loss(logits, logits.detach().clone(), kind) == 0
    other = torch.randn(6, 10)
    loss = consistency_loss(logits, other, kind)
    assert loss > 0
    loss.backward()
    assert logits.grad.abs().sum() > 0
    if kind == "mse":
        torch.testing.assert_close(loss, ((logits - other) ** 2).mean())


def test_consistency_term_runs_in_the_relearning_phase_only(tmp_path, smoke_suite,
                                                           smoke_splits):
    fomo = FOMO(**STRONG, lam=0.5)
    trainer, state = stepped_trainer(tmp_path, smoke_suite, smoke_splits, fomo)
    assert fomo.forget_at == [1]
    state.epoch = 0
    assert fomo.add_losses(state) is None
    state.epoch = 1
    fwd = state.counter.forward
    term = fomo.add_losses(state)["consistency"]
    assert state.counter.forward == fwd + 1 and fomo.stable.training is False
    with torch.no_grad():
        target = fomo.stable(state.x_adv)
    torch.testing.assert_close(term, 0.5 * ((state.logits.float() - target) ** 2).mean())
    assert FOMO(**STRONG, lam=0.0).consistency_active(state) is False
    always = FOMO(rho=0.0, consistency_phase="always")
    state.epoch = 0
    assert always.consistency_active(state) is True


def bf16_consistency(tmp_path, suite, splits) -> tuple[FOMO, Trainer, TrainState]:
    """FOMO (relearning phase, lam 1) under bf16 autocast on CPU, a stable model 1e-3 away
    from the working one, the method's training forward on x_adv done (bf16)."""
    fomo = FOMO(**STRONG, lam=1.0)
    trainer = Trainer(RunSpec(suite.name, "at", (), 0), suite, splits, tmp_path,
                      device=CPU, progress=False, mixed_precision=True)
    state = trainer.build()
    fomo.bind_random_stream(0, CPU)
    fomo.setup(state)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in fomo.stable.parameters():
            p.add_(1e-3 * p.abs().mean() * torch.randn_like(p))
    x, y, _ = next(iter(trainer.loader))
    state.x, state.y, state.epoch = x, y, 1
    state.x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    trainer.model.train()
    with state.autocast():
        state.logits = trainer.model(state.x_adv).float()
    return fomo, trainer, state


def test_consistency_under_bf16_compares_fp32_forwards(tmp_path, smoke_suite, smoke_splits):
    """The MSE the loss adds against an fp64 re-computation: within 1% where the bf16
    forwards (the previous way) are off by more than the value itself (a network without
    BatchNorm, so that the train-mode working model and the eval-mode stable model are
    near-identical functions). One extra forward, counted."""
    model = ModelConfig("small_cnn", {**smoke_suite.model.kwargs, "batchnorm": False})
    fomo, trainer, state = bf16_consistency(tmp_path, replace(smoke_suite, model=model),
                                            smoke_splits)
    working, stable = copy.deepcopy(trainer.model), copy.deepcopy(fomo.stable)
    fwd = state.counter.forward
    term = fomo.add_losses(state)["consistency"]
    assert state.counter.forward == fwd + 2 and term.requires_grad
    with torch.no_grad():
        w64, s64 = working.double().train(), stable.double().eval()
        truth = float(((w64(state.x_adv.double()) - s64(state.x_adv.double())) ** 2).mean())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = float(((state.logits - stable(state.x_adv).float()) ** 2).mean())
    assert truth > 0
    assert abs(float(term.detach()) - truth) < 0.01 * truth
    assert abs(bf16 - truth) > truth


def test_bf16_consistency_puts_the_batchnorm_statistics_back(tmp_path, smoke_suite,
                                                            smoke_splits):
    suite = replace(smoke_suite, model=ModelConfig("preact_resnet18", {"width": 4}))
    fomo, trainer, state = bf16_consistency(tmp_path, suite, smoke_splits)
    buffers = copy.deepcopy(dict(trainer.model.named_buffers()))
    term = fomo.add_losses(state)["consistency"]
    assert states_differ(dict(trainer.model.named_buffers()), buffers)  # the extra forward
    (term + state.logits.sum()).backward()  # both graphs intact
    fomo.after_backward(state)
    assert_same_state(dict(trainer.model.named_buffers()), buffers)
    fomo.after_backward(state)  # nothing saved: a no-op


# --------------------------------------------------------------------------- schedule


def test_schedule_defaults_follow_the_suite(smoke_suite):
    assert forgetting_epochs(200, 20, 0.5) == [20, 40, 60, 80]
    assert forgetting_epochs(10, 3, 1.0) == [3, 6, 9]
    assert forgetting_epochs(2, 1, 0.5) == []
    assert first_decay_fraction(with_train(smoke_suite, milestones=(0.75, 0.5))) == 0.5
    assert first_decay_fraction(with_train(smoke_suite, schedule="cyclic",
                                           cyclic_peak=0.4)) == 0.4
    assert first_decay_fraction(with_train(smoke_suite, schedule="constant")) == 1.0


def test_resolved_period_and_until_are_recorded(tmp_path, smoke_suite, smoke_splits):
    suite = with_train(smoke_suite, epochs=30, milestones=(0.5, 0.75))
    (fomo,) = build_defenses((DefenseSpec("fomo"),), "at", suite)
    trainer = Trainer(RunSpec(suite.name, "at", (), 0), suite, smoke_splits, tmp_path,
                      device=CPU, progress=False)
    fomo.setup(trainer.build())
    assert (fomo.period, fomo.until, fomo.forget_at) == (3, 0.5, [3, 6, 9, 12])
    assert (fomo.hparams["period"], fomo.hparams["until"]) == (3, 0.5)


# --------------------------------------------------------------------------- invariants


# zero strength (rho = lam = 0) is plain AT bit for bit: tests/test_zero_strength.py


def test_weights_clean_outside_around_update(tmp_path, smoke_suite, smoke_splits):
    check_weights_clean_outside_update(tmp_path, smoke_suite, smoke_splits, FOMO(**STRONG),
                                       perturbs=False)


def test_resume_equals_uninterrupted_including_stable_model_and_stream(
        tmp_path, smoke_suite, smoke_splits):
    suite = with_train(smoke_suite, epochs=3)
    defense = spec(**STRONG, ema_update_prob=0.5, per_layer=False)
    check_resume_equals_uninterrupted(tmp_path, suite, smoke_splits, "at", (defense,))
    full = load_checkpoint(tmp_path / "full" / "last.pt")["defenses"][0]
    assert any(k.startswith("stable.") for k in full) and "_extra_state" in full
    rows = read_history(tmp_path / "full" / "history.jsonl")
    assert ["fomo.forgotten" in r for r in rows] == [True, True, False]


def test_gpu_code_path_bf16_channels_last_on_cpu(tmp_path, smoke_suite, smoke_splits):
    """The CUDA configuration (bf16 autocast, channels_last) through the engine, on a
    network with BatchNorm: the relearning epoch trains (finite losses), counts two extra
    forwards per batch (the stable model's and the working model's fp32 forward), and the
    fp32 working-model forward leaves BatchNorm's counter as the training forwards set it."""
    suite = replace(smoke_suite, model=ModelConfig("preact_resnet18", {"width": 4}))
    runs = {}
    for name, defenses in (("plain", ()), ("fomo", (spec(**STRONG),))):
        trainer = Trainer(RunSpec(suite.name, "at", defenses, 0), suite, smoke_splits,
                          tmp_path / name, device=CPU, progress=False, mixed_precision=True,
                          channels_last=True)
        trainer.train()
        runs[name] = trainer
    rows = read_history(tmp_path / "fomo" / "history.jsonl")
    plain_rows = read_history(tmp_path / "plain" / "history.jsonl")
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert math.isfinite(rows[1]["loss.fomo.consistency"])
    batches = len(runs["fomo"].loader)
    assert rows[1]["forward_passes"] - plain_rows[1]["forward_passes"] == 2 * batches
    counters = [(n, b) for n, b in runs["fomo"].model.named_buffers()
                if n.endswith("num_batches_tracked")]
    plain_counters = dict(runs["plain"].model.named_buffers())
    assert counters and all(torch.equal(b, plain_counters[n]) for n, b in counters)


def test_trains_with_at_and_refuses_other_methods(tmp_path, smoke_suite, smoke_splits):
    plain = train(tmp_path / "plain", smoke_suite, smoke_splits)
    trainer = train(tmp_path / "fomo", smoke_suite, smoke_splits, defenses=[spec(**STRONG)])
    rows, plain_rows = (read_history(t.run_dir / "history.jsonl") for t in (trainer, plain))
    assert rows[0]["fomo.forgotten"] == pytest.approx(0.5, abs=1e-3)
    assert "loss.fomo.consistency" not in rows[0] and rows[1]["loss.fomo.consistency"] > 0
    extra = rows[1]["forward_passes"] - plain_rows[1]["forward_passes"]
    assert extra == len(trainer.loader)  # one stable forward per batch while relearning
    assert rows[1]["backward_passes"] == plain_rows[1]["backward_passes"]
    assert states_differ(model_state(plain.run_dir), model_state(trainer.run_dir))
    for method in ("trades", "fgsm_rs", "standard"):
        with pytest.raises(ConfigError, match=f"does not compose with method '{method}'"):
            build_defenses((DefenseSpec("fomo"),), method, smoke_suite)


def test_eval_models_returns_the_stable_model(tmp_path, smoke_suite, smoke_splits):
    trainer = train(tmp_path, smoke_suite, smoke_splits, defenses=[spec(**STRONG)])
    (fomo,) = trainer.defenses
    models = collect_eval_models(trainer.model, trainer.defenses, None)
    assert set(models) == {"model", "fomo.stable"} and models["fomo.stable"] is fomo.stable
    assert states_differ(fomo.stable.state_dict(), trainer.model.state_dict())
    saved = load_checkpoint(tmp_path / "last.pt")["defenses"][0]
    assert_equal_nested({k[len("stable."):]: v for k, v in saved.items()
                         if k.startswith("stable.")}, fomo.stable.state_dict())
    # as evaluate.py restores it: a fresh defense, setup, then the checkpoint
    fresh = Trainer(trainer.spec, smoke_suite, smoke_splits, tmp_path / "x", device=CPU,
                    progress=False)
    state = fresh.build()
    for d in fresh.defenses:
        d.setup(state)
        d.load_state_dict(saved)
    restored = collect_eval_models(fresh.model, fresh.defenses, state)["fomo.stable"]
    assert_same_state(restored.state_dict(), fomo.stable.state_dict())


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rho": 1.5}, r"fomo: rho .* in \[0.0, 1.0\]"),
    ({"rho": "0.1"}, r"fomo: rho .* number"),
    ({"period": 0}, r"fomo: period must be an integer >= 1"),
    ({"period": 2.5}, r"fomo: period must be an integer >= 1"),
    ({"until": -0.1}, r"fomo: until .* in \[0.0, 1.0\]"),
    ({"eligible_fraction": 0.0}, r"fomo: eligible_fraction .* in \(0.0, 1.0\]"),
    ({"skip_shortcuts": "yes"}, "fomo: skip_shortcuts must be true or false"),
    ({"per_layer": 1}, "fomo: per_layer must be true or false"),
    ({"init": "normal"}, r"fomo: init must be one of \['default', 'zeros'\]"),
    ({"ema_decay": 1.1}, r"fomo: ema_decay .* in \[0.0, 1.0\]"),
    ({"ema_update_prob": float("nan")}, r"fomo: ema_update_prob .* finite"),
    ({"lam": -1}, r"fomo: lam .* >= 0.0"),
    ({"consistency": "l1"}, r"fomo: consistency must be one of \['mse', 'kl'\]"),
    ({"consistency_phase": "late"}, r"consistency_phase must be one of \['relearn', 'always'\]"),
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        FOMO(**kwargs)


def test_parameters_are_overridable_and_unknown_ones_refused(smoke_suite):
    (fomo,) = build_defenses((spec(rho=0.2, lam=0.0, init="zeros"),), "at", smoke_suite)
    assert (fomo.rho, fomo.lam, fomo.init) == (0.2, 0.0, "zeros")
    with pytest.raises(ConfigError, match=r"no parameter\(s\) \['gamma'\]"):
        build_defenses((spec(gamma=1.0),), "at", smoke_suite)


def test_card_is_marked_reconstructed_with_every_parameter():
    card = FOMO.card
    assert card.notes.startswith("RECONSTRUCTED") and "no official code" in card.notes
    assert card.reference_code.startswith("none")
    assert set(FOMO.params) <= set(RECONSTRUCTION)
    block = card.hyperparameters["ROBench reconstruction (defaults, not published)"]
    assert block is RECONSTRUCTION
    numbers = {(p.metric, p.checkpoint): p.value for p in card.published}
    assert numbers == {("autoattack", "best"): 51.37, ("autoattack", "last"): 51.28}
    assert {p.selection for p in card.published} == {"validation"}  # the 9:1 split
    assert card.hyperparameters["published training setup"]["epochs"] == 200
