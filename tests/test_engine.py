"""The engine's invariants (DESIGN.md): zero strength reproduces the plain
method bit for bit, weights are clean outside `around_update`, resume equals an
uninterrupted run, slots are single-owner, non-finite losses stop the run."""

from __future__ import annotations

import pytest
import torch
from conftest import with_train
from invariants import (
    PROBE_CARD,
    assert_same_state,
    check_resume_equals_uninterrupted,
    check_weights_clean_outside_update,
    check_zero_strength_is_plain,
    model_state,
    train,
)

from bench.config import ConfigError, DefenseSpec, RunSpec
from bench.engine import NonFiniteLossError, Trainer, learning_rate
from bench.errors import DefenseError
from bench.records import load_checkpoint, read_history
from bench.state import kernel_parameters
from defenses.base import Defense
from defenses.registry import build_defenses


@pytest.mark.parametrize("method", ["at", "trades"])
def test_zero_strength_awp_is_plain_method_bit_for_bit(tmp_path, smoke_suite, smoke_splits,
                                                      method):
    check_zero_strength_is_plain(
        tmp_path, smoke_suite, smoke_splits, method,
        zero=DefenseSpec("awp", (("gamma", 0.0), ("warmup", 0.0))),
        real=DefenseSpec("awp", (("gamma", 0.05), ("warmup", 0.0))))


def test_awp_warmup_never_reached_is_plain_at(tmp_path, smoke_suite, smoke_splits):
    plain = train(tmp_path / "plain", smoke_suite, smoke_splits)
    late = train(tmp_path / "late", smoke_suite, smoke_splits,
                 defenses=[DefenseSpec("awp", (("gamma", 0.05), ("warmup", 1.0)))])
    assert_same_state(model_state(plain.run_dir), model_state(late.run_dir))


class RandomConsumer(Defense):
    """Draws from its own stream and the second batch stream, changes nothing."""

    name = "random_consumer"
    card = PROBE_CARD

    def before_attack(self, state):
        torch.rand(5, generator=self.generator)
        state.draw_batch()


def test_defense_randomness_never_shifts_data_or_attack(tmp_path, smoke_suite, smoke_splits):
    plain = train(tmp_path / "plain", smoke_suite, smoke_splits)
    noisy = train(tmp_path / "noisy", smoke_suite, smoke_splits, instances=[RandomConsumer()])
    assert_same_state(model_state(plain.run_dir), model_state(noisy.run_dir))


def test_weights_clean_outside_around_update(tmp_path, smoke_suite, smoke_splits):
    from defenses.awp import AWP

    check_weights_clean_outside_update(tmp_path, smoke_suite, smoke_splits,
                                       AWP(gamma=0.05, warmup=0.0))


def test_awp_restores_weights_without_a_step(smoke_suite, smoke_splits, tmp_path):
    from defenses.awp import AWP

    spec = RunSpec("smoke", "at", (), 0)
    trainer = Trainer(spec, smoke_suite, smoke_splits, tmp_path, progress=False)
    state = trainer.build()
    x, y, _ = next(iter(trainer.loader))
    state.x, state.y = x, y
    state.x_adv = trainer.method.attack(state)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    buffers = {n: b.clone() for n, b in trainer.model.named_buffers()}
    with AWP(gamma=0.05, warmup=0.0).around_update(state):
        moved = [not torch.equal(before[n], p) for n, p in kernel_parameters(trainer.model)]
        assert all(moved)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)
    for name, b in trainer.model.named_buffers():  # BN statistics untouched by the ascent
        assert torch.equal(b, buffers[name]), name


@pytest.mark.parametrize("defenses", [(), (DefenseSpec("awp"),)])
def test_resume_equals_uninterrupted(tmp_path, smoke_suite, smoke_splits, defenses):
    check_resume_equals_uninterrupted(tmp_path, with_train(smoke_suite, epochs=3),
                                      smoke_splits, "at", defenses)


class ObjectiveA(Defense):
    name = "objective_a"
    card = PROBE_CARD
    slots = ("objective",)


class ObjectiveB(Defense):
    name = "objective_b"
    card = PROBE_CARD
    slots = ("objective",)


def test_conflicting_slot_is_refused(smoke_suite, monkeypatch):
    import defenses.base as base

    monkeypatch.setitem(base._REGISTRY, "objective_a", ObjectiveA)
    monkeypatch.setitem(base._REGISTRY, "objective_b", ObjectiveB)
    with pytest.raises(ConfigError, match=r"objective_a.*objective_b.*'objective' slot"):
        build_defenses((DefenseSpec("objective_a"), DefenseSpec("objective_b")), "at",
                       smoke_suite)
    assert len(build_defenses((DefenseSpec("objective_a"),), "at", smoke_suite)) == 1


def test_unknown_names_list_the_valid_ones(smoke_suite):
    with pytest.raises(ConfigError, match=r"unknown defense 'nope'.*awp"):
        build_defenses((DefenseSpec("nope"),), "at", smoke_suite)
    with pytest.raises(ConfigError, match=r"no parameter\(s\) \['gama'\].*gamma"):
        build_defenses((DefenseSpec("awp", (("gama", 0.1),)),), "at", smoke_suite)
    with pytest.raises(ConfigError, match=r"does not compose with method 'fgsm_rs'"):
        build_defenses((DefenseSpec("awp"),), "fgsm_rs", smoke_suite)
    from bench.config import check_method

    with pytest.raises(ConfigError, match=r"unknown method 'pgd'.*'at'"):
        check_method("pgd")


def test_method_defaults_for_trades_awp(smoke_suite):
    (awp,) = build_defenses((DefenseSpec("awp"),), "trades", smoke_suite)
    assert awp.gamma == 0.005 and awp.warmup == 0.05
    (awp,) = build_defenses((DefenseSpec("awp", (("gamma", 0.02),)),), "trades", smoke_suite)
    assert awp.gamma == 0.02


class NaNAtEpoch2(Defense):
    name = "nan_probe"
    card = PROBE_CARD

    def add_losses(self, state):
        if state.epoch == 1:
            return {"bad": state.per_sample_loss.mean() * float("nan")}
        return None


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, smoke_suite,
                                                              smoke_splits):
    with pytest.raises(NonFiniteLossError, match=r"epoch 2.*non-finite defense loss terms: "
                       r"defense 'nan_probe' .* returned nan_probe.bad.*kept: the checkpoint "
                       r"after epoch 1"):
        train(tmp_path, smoke_suite, smoke_splits, instances=[NaNAtEpoch2()])
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert len(read_history(tmp_path / "history.jsonl")) == 1


@pytest.mark.parametrize("method", ["at", "trades", "fgsm_rs", "n_fgsm", "standard"])
def test_every_method_trains_and_logs_curves(tmp_path, smoke_suite, smoke_splits, method):
    suite = with_train(smoke_suite, epochs=1)
    trainer = train(tmp_path, suite, smoke_splits, method=method)
    (row,) = read_history(trainer.run_dir / "history.jsonl")
    for key in ("train_robust", "val_robust", "train_clean", "val_clean", "train_loss"):
        assert 0 <= row[key] <= (1 if key != "train_loss" else 100), key
    assert row["forward_passes"] > 0 and row["backward_passes"] > 0
    assert (trainer.run_dir / "best.pt").exists()


def test_piecewise_and_cyclic_schedules(smoke_suite):
    s = with_train(smoke_suite, epochs=10, lr=0.1, milestones=(0.5, 0.75))
    assert learning_rate(s, 0) == 0.1 and learning_rate(s, 4.99) == 0.1
    assert learning_rate(s, 5) == pytest.approx(0.01)
    assert learning_rate(s, 7.5) == pytest.approx(0.001)
    c = with_train(smoke_suite, epochs=10, lr=0.2, schedule="cyclic", cyclic_peak=0.4)
    assert learning_rate(c, 0) == 0 and learning_rate(c, 4) == pytest.approx(0.2)
    assert learning_rate(c, 7) == pytest.approx(0.1)
    w = with_train(smoke_suite, epochs=10, lr=0.1, warmup_epochs=2)
    assert learning_rate(w, 1) == pytest.approx(0.05)


def test_mismatched_run_folder_is_refused(tmp_path, smoke_suite, smoke_splits):
    from bench.engine import RunMismatchError

    suite = with_train(smoke_suite, epochs=2)
    train(tmp_path, suite, smoke_splits, stop=1)
    other = RunSpec(suite.name, "trades", (), 0)
    with pytest.raises(RunMismatchError, match="another run"):
        Trainer(other, suite, smoke_splits, tmp_path, progress=False).train()


def test_gpu_code_path_bf16_channels_last_on_cpu(tmp_path, smoke_suite, smoke_splits):
    """The CUDA configuration (bf16 autocast, channels_last) exercised on the CPU:
    it trains, the curves are finite, and the weights stay fp32."""
    spec = RunSpec(smoke_suite.name, "trades", (DefenseSpec("awp"),), 0)
    trainer = Trainer(spec, smoke_suite, smoke_splits, tmp_path, progress=False,
                      mixed_precision=True, channels_last=True)
    trainer.train()
    assert trainer.autocast_dtype == torch.bfloat16
    x, _, _ = next(iter(trainer.loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    rows = read_history(tmp_path / "history.jsonl")
    assert len(rows) == 2 and all(0 <= r["val_robust"] <= 1 for r in rows)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_suite_overrides_sit_between_defaults_and_run_parameters(smoke_suite):
    from dataclasses import replace

    suite = replace(smoke_suite, defense_overrides={"awp": {"gamma": 0.003}})
    (awp,) = build_defenses((DefenseSpec("awp"),), "at", suite)
    assert awp.gamma == 0.003 and awp.warmup == 0.0
    (awp,) = build_defenses((DefenseSpec("awp"),), "trades", suite)
    assert awp.gamma == 0.003 and awp.warmup == 0.05  # method default kept, gamma from suite
    (awp,) = build_defenses((DefenseSpec("awp", (("gamma", 0.02),)),), "at", suite)
    assert awp.gamma == 0.02
    bad = replace(smoke_suite, defense_overrides={"awp": {"gama": 1}})
    expected = r"suite 'smoke' \[defenses.awp\]: defense 'awp' has no parameter\(s\) \['gama'\]"
    with pytest.raises(ConfigError, match=expected):
        build_defenses((DefenseSpec("awp"),), "at", bad)


def test_history_and_record_state_the_cpu_thread_count(tmp_path, smoke_suite, smoke_splits):
    from bench.evaluate import evaluate_run

    torch.set_num_threads(1)
    trainer = train(tmp_path, smoke_suite, smoke_splits)
    assert [r["cpu_threads"] for r in read_history(trainer.run_dir / "history.jsonl")] == [1, 1]
    record = evaluate_run(trainer.run_dir, smoke_suite, smoke_splits, progress=False)
    assert record["cost"]["train_cpu_threads"] == [1]


class ConstantPredictor(torch.nn.Module):
    """The uniform predictor: the same logits for every input (what an untrained run
    collapses to); a dummy parameter keeps the attacks' input gradients defined."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 10, device=x.device)
        logits[:, 3] = 1.0
        return logits + self.scale * x.flatten(1).mean(1, keepdim=True)


@pytest.mark.parametrize("model_kind", ["constant", "trained"])
def test_a_model_at_chance_is_flagged(model_kind, smoke_suite, smoke_splits):
    from dataclasses import replace

    from conftest import fit_briefly

    from bench.evaluate import evaluate_model
    from bench.models import build_model

    suite = replace(smoke_suite, eval=replace(smoke_suite.eval, autoattack="none",
                                              sanity_checks=False, pgd_steps=2, cw_steps=2))
    x = smoke_splits.test.x.float() / 255
    y = smoke_splits.test.y
    if model_kind == "constant":
        model = ConstantPredictor()
    else:
        torch.manual_seed(0)
        model = build_model(suite.model, smoke_splits.info)
        train_x = smoke_splits.train.x.float() / 255
        fit_briefly(model, train_x, smoke_splits.train.y, torch.Generator().manual_seed(0),
                    epochs=10)
    result = evaluate_model(model, x, y, suite, 0, "m", False, num_classes=10)
    metrics, flags = result.metrics, result.flags
    near_chance = [f for f in flags if f["check"] == "near_chance"]
    if model_kind == "constant":
        assert metrics["clean"] == pytest.approx((y == 3).float().mean().item())
        assert len(near_chance) == 1 and "did not learn" in near_chance[0]["message"]
    else:
        assert metrics["clean"] > 0.3 and not near_chance


class ReplacesBatchWantsCleanLogits(Defense):
    """Replaces the batch in before_attack (as an augmentation defense does) and asks
    for clean logits."""

    name = "clean_logits_probe"
    card = PROBE_CARD
    capabilities = ("clean_logits",)

    def before_attack(self, state):
        state.x = 1.0 - state.x


def test_clean_logits_are_of_the_batch_the_defenses_left(tmp_path, smoke_suite, smoke_splits):
    trainer = Trainer(RunSpec("smoke", "at", (), 0), smoke_suite, smoke_splits, tmp_path,
                      progress=False)
    state = trainer.build()
    trainer.defenses = [ReplacesBatchWantsCleanLogits()]
    trainer.capabilities = {"clean_logits"}
    x, y, index = next(iter(trainer.loader))
    inputs_seen = []
    handle = trainer.model.register_forward_hook(
        lambda module, inputs, output: inputs_seen.append(inputs[0].detach().clone()))
    trainer.train_step(state, x, y, index)
    handle.remove()
    assert torch.equal(inputs_seen[0], 1.0 - x)  # the clean pass saw the replaced batch
    assert state.clean_logits is not None and state.clean_logits.shape[0] == len(y)


class TermProbe(Defense):
    """Asks for per-term gradients: the loss itself (whose gradient must be the training
    gradient, bit for bit) and a second term; records what the engine gave."""

    name = "term_probe"
    card = PROBE_CARD
    capabilities = ("term_grads",)

    def __init__(self, shape_error: bool = False) -> None:
        super().__init__()
        self.shape_error = shape_error
        self.checked = 0

    def gradient_terms(self, state):
        if self.shape_error:
            return {"bad": state.per_sample_loss}
        return {"loss": state.per_sample_loss.mean(), "square": state.logits.pow(2).mean()}

    def after_backward(self, state):
        params = list(state.model.parameters())
        assert set(state.term_grads) == {"term_probe.loss", "term_probe.square"}
        for term, p in zip(state.term_grads["term_probe.loss"], params, strict=True):
            assert torch.equal(term, p.grad)
        assert any(g.abs().sum() > 0 for g in state.term_grads["term_probe.square"])
        self.checked += 1


def test_term_grads_are_per_term_and_leave_training_unchanged(tmp_path, smoke_suite,
                                                              smoke_splits):
    plain = train(tmp_path / "plain", smoke_suite, smoke_splits)
    probe = TermProbe()
    probed = train(tmp_path / "probed", smoke_suite, smoke_splits, instances=[probe])
    assert probe.checked == smoke_suite.train.epochs * len(probed.loader)
    assert_same_state(model_state(plain.run_dir), model_state(probed.run_dir))
    rows = [read_history(t.run_dir / "history.jsonl")[-1] for t in (plain, probed)]
    extra = rows[1]["backward_passes"] - rows[0]["backward_passes"]
    assert extra == 2 * probe.checked  # one backward per term
    with pytest.raises(DefenseError, match=r"defense 'term_probe' .* in gradient_terms at epoch "
                                           r"1, step 0 .* term 'bad' is \(64,\); each term "
                                           r"must be a floating-point scalar"):
        train(tmp_path / "bad", smoke_suite, smoke_splits, instances=[TermProbe(True)])


def test_an_instance_may_only_narrow_its_capabilities(smoke_suite, monkeypatch):
    import defenses.base as base

    class Greedy(Defense):
        name = "greedy"
        card = PROBE_CARD
        capabilities = ("clean_logits",)

        def __init__(self):
            super().__init__()
            self.capabilities = ("clean_logits", "term_grads")

    monkeypatch.setitem(base._REGISTRY, "greedy", Greedy)
    with pytest.raises(ConfigError, match=r"may only narrow .* adds \['term_grads'\]"):
        build_defenses((DefenseSpec("greedy"),), "at", smoke_suite)


def test_cpu_runs_record_the_process_cpu_seconds_of_each_epoch(tmp_path, smoke_suite,
                                                               smoke_splits):
    trainer = train(tmp_path, smoke_suite, smoke_splits)
    rows = read_history(trainer.run_dir / "history.jsonl")
    assert rows and all(row["cpu_seconds"] > 0 for row in rows)


class SkipsAttack(Defense):
    """Sets `state.x_adv` in `before_attack` on the steps `skip(step)` picks: the clean
    batch itself, or (`bad`) a batch of the wrong shape."""

    name = "skips_attack"
    card = PROBE_CARD

    def __init__(self, skip=lambda step: True, bad: bool = False) -> None:
        super().__init__()
        self.skip, self.bad = skip, bad
        self.entered_with: list[object] = []

    def before_attack(self, state):
        self.entered_with.append(state.x_adv)
        if self.skip(state.step):
            state.x_adv = state.x[:1] if self.bad else state.x


def test_a_hook_that_sets_x_adv_replaces_the_attack(tmp_path, smoke_suite, smoke_splits,
                                                    monkeypatch):
    """AT whose every attack a hook replaces by the clean batch is standard training, bit for
    bit and pass for pass (no attack runs, none is counted); x_adv is None on entry to
    before_attack at every step, so a hook that skips every other step gets the attack on
    the others."""
    standard = train(tmp_path / "standard", smoke_suite, smoke_splits, method="standard")
    skipped = train(tmp_path / "skipped", smoke_suite, smoke_splits, method="at",
                    instances=[SkipsAttack()])
    assert_same_state(model_state(standard.run_dir), model_state(skipped.run_dir))
    rows = [read_history(t.run_dir / "history.jsonl")[-1] for t in (standard, skipped)]
    for key in ("forward_passes", "backward_passes"):
        assert rows[0][key] == rows[1][key], key

    calls = []
    original = Trainer.train_step

    def counting(self, state, x, y, index):
        attack = self.method.attack
        self.method.attack = lambda s, **kw: (calls.append(s.step), attack(s, **kw))[1]
        try:
            return original(self, state, x, y, index)
        finally:
            self.method.attack = attack
    monkeypatch.setattr(Trainer, "train_step", counting)
    every_other = SkipsAttack(skip=lambda step: step % 2 == 0)
    mixed = train(tmp_path / "mixed", smoke_suite, smoke_splits, method="at",
                  instances=[every_other])
    steps = smoke_suite.train.epochs * len(mixed.loader)
    assert calls == list(range(1, steps, 2))
    assert every_other.entered_with == [None] * steps
    with pytest.raises(DefenseError, match=r"defense 'skips_attack' .* in before_attack at "
                                           r"epoch 1, step 0 .* set state.x_adv to something "
                                           r"other than a batch shaped like state.x"):
        train(tmp_path / "bad", smoke_suite, smoke_splits, instances=[SkipsAttack(bad=True)])


def test_cudnn_autotuning_is_on_for_cuda_training_only():
    from bench.engine import configure_backend

    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        configure_backend(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        configure_backend(torch.device("cuda"))  # only sets a flag: no device needed
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = saved


def test_curves_run_without_cudnn_autotuning(tmp_path, smoke_suite, smoke_splits, monkeypatch):
    """The evaluator's recheck of the curves does not autotune: neither do the curves."""
    import bench.engine as engine_module

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seen = []
    original = engine_module.curve_point

    def spy(*args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine_module, "curve_point", spy)
    spec = RunSpec(smoke_suite.name, "at", (), 0)
    Trainer(spec, smoke_suite, smoke_splits, tmp_path, progress=False).train(
        stop_after_epochs=1)
    assert seen == [False, False] and torch.backends.cudnn.benchmark is True
