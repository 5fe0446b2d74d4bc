"""CURE (defenses/cure.py, defenses/_cure_ops.py): the objectives, the consistency term,
the conserve masks (paper: prominence from per-term gradients; rgp: |grad| of the total
loss, classifier left alone), the stochastic revision, the warm start from the clean-model
service, and the shared invariants (zero strength, resume, methods, eval_models)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import with_train
from invariants import (
    PROBE_CARD,
    assert_same_state,
    check_resume_equals_uninterrupted,
    check_weights_clean_outside_update,
    check_zero_strength_is_plain,
    model_state,
    states_differ,
    train,
)
from torch import nn

import bench.clean_model as service
from bench.config import ConfigError, DefenseSpec, RunSpec
from bench.engine import Trainer, collect_eval_models
from bench.records import load_checkpoint, read_history
from defenses._cure_ops import (
    conserved_count,
    consistency,
    last_linear_parameters,
    prominence,
    revise_,
    revision_decay,
    rgp_objective,
    trades_objective,
    update_mask,
)
from defenses.base import Defense
from defenses.cure import CURE, PER_ARCHITECTURE
from defenses.registry import build_defenses

CPU = torch.device("cpu")


def spec(**params) -> DefenseSpec:
    return DefenseSpec("cure", tuple(sorted(params.items())))


class GradRecorder(Defense):
    """Copies the parameter gradients and the term gradients in `after_backward`."""

    name = "grad_recorder"
    card = PROBE_CARD

    def __init__(self) -> None:
        super().__init__()
        self.grads: list[torch.Tensor] = []
        self.terms: dict[str, list[torch.Tensor]] = {}

    def after_backward(self, state) -> None:
        self.grads = [p.grad.detach().clone() for p in state.model.parameters()]
        self.terms = {k: [g.clone() for g in v] for k, v in state.term_grads.items()}


def stepped(tmp_path, suite, splits, defenses: list[Defense]) -> tuple[Trainer, object]:
    """One TRADES training step with `defenses` (no clean model: no warm start)."""
    trainer = Trainer(RunSpec(suite.name, "trades", (), 0), suite, splits, tmp_path,
                      device=CPU, progress=False)
    state = trainer.build()
    trainer.defenses = defenses
    trainer._bind_defenses()
    for d in defenses:
        d.bind_random_stream(0, CPU)
        d.setup(state)
    trainer.train_step(state, *next(iter(trainer.loader)))
    return trainer, state


# --------------------------------------------------------------------------- conserve


@pytest.mark.parametrize("percent", [0.0, 20.0, 37.5, 50.0, 100.0])
def test_masks_conserve_exactly_the_fraction_per_layer(percent):
    gen = torch.Generator().manual_seed(0)
    for shape in [(8, 4, 3, 3), (10, 33), (7,), (1,)]:
        score = torch.rand(shape, generator=gen)
        keep = update_mask(score, percent)
        n = score.numel()
        assert keep.shape == score.shape and keep.dtype == torch.bool
        assert int((~keep).sum()) == conserved_count(percent, n) == math.floor(
            percent * n / 100 + 0.5)
        if 0 < int((~keep).sum()) < n:  # the conserved ones are the least prominent
            assert score[~keep].max() <= score[keep].min()


def test_mask_selection_equals_a_stable_sort_with_many_ties():
    gen = torch.Generator().manual_seed(2)
    for trial in range(60):
        n = int(torch.randint(1, 200, (1,), generator=gen))
        score = torch.randint(0, 4 + trial % 7, (n,), generator=gen).float()  # many ties
        percent = float(torch.rand((), generator=gen)) * 100
        reference = torch.ones(n, dtype=torch.bool)
        reference[torch.argsort(score, stable=True)[:conserved_count(percent, n)]] = False
        assert torch.equal(update_mask(score, percent), reference), (n, percent)


def test_masks_break_ties_by_position_and_ignore_memory_format():
    score = torch.zeros(10)
    assert torch.equal(update_mask(score, 30.0), torch.arange(10) >= 3)
    score = torch.rand(6, 5, 3, 3, generator=torch.Generator().manual_seed(1))
    channels_last = score.contiguous(memory_format=torch.channels_last)
    assert torch.equal(update_mask(score, 20.0), update_mask(channels_last, 20.0))


def test_prominence_formula():
    gc, ga = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([-3.0, 1.0, -4.0])
    torch.testing.assert_close(prominence(gc, ga, 0.2),
                               torch.tensor([0.2 + 2.4, 0.4 + 0.8, 3.2]))


def expected_masked(raw: torch.Tensor, score: torch.Tensor, percent: float) -> torch.Tensor:
    order = torch.argsort(score.reshape(-1), stable=True)
    keep = torch.ones(raw.numel(), dtype=torch.bool)
    keep[order[:conserved_count(percent, raw.numel())]] = False
    return torch.where(keep.view(raw.shape), raw, torch.zeros_like(raw))


def test_paper_mode_masks_every_layer_by_the_prominence_of_the_term_gradients(
        tmp_path, smoke_suite, smoke_splits):
    before, after = GradRecorder(), GradRecorder()
    cure = CURE(percent=30.0, alpha_c=0.25, warm_start=False)
    trainer, _ = stepped(tmp_path, smoke_suite, smoke_splits, [before, cure, after])
    clean, adv = before.terms["cure.ce_clean"], before.terms["cure.ce_adv"]
    assert len(clean) == len(before.grads) and any(
        not torch.equal(a, b) for a, b in zip(clean, adv))
    for raw, masked, gc, ga in zip(before.grads, after.grads, clean, adv, strict=True):
        score = 0.25 * gc.abs() + 0.75 * ga.abs()
        assert torch.equal(masked, expected_masked(raw, score, 30.0))


def test_rgp_mode_masks_by_the_total_gradient_and_leaves_the_classifier(
        tmp_path, smoke_suite, smoke_splits):
    before, after = GradRecorder(), GradRecorder()
    cure = CURE(percent=40.0, mode="rgp", warm_start=False)
    assert cure.capabilities == ()  # no per-term gradients, no clean model
    trainer, state = stepped(tmp_path, smoke_suite, smoke_splits, [before, cure, after])
    assert state.term_grads == {} and before.terms == {}
    classifier = {id(p) for p in last_linear_parameters(trainer.model)}
    names = [n for n, p in trainer.model.named_parameters() if id(p) in classifier]
    assert names == ["net.classifier.3.weight", "net.classifier.3.bias"]
    for p, raw, masked in zip(trainer.model.parameters(), before.grads, after.grads):
        if id(p) in classifier:
            assert torch.equal(raw, masked)
        else:
            assert torch.equal(masked, expected_masked(raw, raw.abs(), 40.0))


def test_percent_zero_leaves_the_gradients(tmp_path, smoke_suite, smoke_splits):
    before, after = GradRecorder(), GradRecorder()
    cure = CURE(percent=0.0, warm_start=False)
    assert cure.capabilities == ()
    stepped(tmp_path, smoke_suite, smoke_splits, [before, cure, after])
    assert all(torch.equal(a, b) for a, b in zip(before.grads, after.grads))


# --------------------------------------------------------------------------- objectives


def test_objectives_and_consistency_match_their_formulas():
    gen = torch.Generator().manual_seed(0)
    lc, la, rc, ra = (torch.randn(6, 10, generator=gen) for _ in range(4))
    y = torch.randint(0, 10, (6,), generator=gen)
    kl = F.kl_div(F.log_softmax(la, 1), F.log_softmax(lc, 1), log_target=True,
                  reduction="none").sum(1)  # KL(p(x) || p(x_adv))
    torch.testing.assert_close(trades_objective(lc, la, y, 1.0),
                               F.cross_entropy(lc, y, reduction="none") + kl)
    torch.testing.assert_close(rgp_objective(lc, la, y, 0.2),
                               0.2 * F.cross_entropy(lc, y, reduction="none")
                               + 0.8 * F.cross_entropy(la, y, reduction="none"))

    def kl_batchmean(student, target):  # KL(p_target || p_student)
        return F.kl_div(F.log_softmax(student, 1), F.log_softmax(target, 1), log_target=True,
                        reduction="batchmean")
    lc.requires_grad_(True)
    rc.requires_grad_(True)
    value = consistency(lc, la, rc, ra)
    torch.testing.assert_close(value, kl_batchmean(lc, rc) + kl_batchmean(la, ra))
    value.backward()
    assert lc.grad.abs().sum() > 0 and rc.grad is None  # the revision side is detached
    assert consistency(la, la, la, la) == 0


def test_consistency_term_is_zero_while_the_revision_equals_the_student(
        tmp_path, smoke_suite, smoke_splits):
    cure = CURE(gamma=0.5, warm_start=False)
    trainer, state = stepped(tmp_path, smoke_suite, smoke_splits, [cure])
    cure.revision.load_state_dict(trainer.model.state_dict())
    state.x_adv = trainer.method.attack(state)
    cure.objective_loss(state)
    forwards = state.counter.forward
    assert cure.add_losses(state)["consistency"] == 0
    assert state.counter.forward == forwards + 2 and cure.revision.training
    with torch.no_grad():
        next(cure.revision.parameters()).add_(0.5)
    assert cure.add_losses(state)["consistency"] > 0
    assert CURE(gamma=0.0).add_losses(state) is None


# --------------------------------------------------------------------------- revise


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))


def test_revision_update_formula_parameters_only():
    torch.manual_seed(0)
    student, revision = bn_net(), bn_net()
    student.train()(torch.randn(8, 3, 4, 4))  # moves the student's running statistics
    kept = copy.deepcopy(revision.state_dict())
    revise_(revision, student, 0.9, torch.tensor(False))
    assert_same_state(revision.state_dict(), kept)
    revise_(revision, student, 0.9, torch.tensor(True))
    for r, old, s in zip(revision.parameters(), [kept[k] for k, _ in
                                                 revision.named_parameters()],
                         student.parameters()):
        torch.testing.assert_close(r, 0.9 * old + 0.1 * s)
    for name, buf in revision.named_buffers():  # BN statistics are not averaged
        assert torch.equal(buf, kept[name]), name
    assert revision_decay("paper", 0.999, 1) == 0.999
    assert [revision_decay("rgp", 0.999, t) for t in (1, 3)] == [0.5, 0.75]
    assert revision_decay("rgp", 0.999, 10**6) == 0.999


def test_revision_happens_with_probability_r_from_the_defense_stream(
        tmp_path, smoke_suite, smoke_splits):
    trainer = Trainer(RunSpec("smoke", "trades", (), 0), smoke_suite, smoke_splits, tmp_path,
                      device=CPU, progress=False)
    state = trainer.build()
    cure = CURE(revision_rate=0.3, warm_start=False)
    cure.bind_random_stream(0, CPU)
    cure.setup(state)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)  # the student differs from the revision model: updates show
    twin = CURE(revision_rate=0.3)
    twin.bind_random_stream(0, CPU)
    global_rng = torch.get_rng_state()
    changed, expected = [], []
    for _ in range(2000):
        first = next(cure.revision.parameters()).clone()
        cure.after_step(state)
        changed.append(not torch.equal(first, next(cure.revision.parameters())))
        expected.append(bool(torch.rand((), generator=twin.generator) < 0.3))
        state.step += 1
    assert changed == expected  # the gate is drawn once per step from the own stream
    rate = sum(changed) / len(changed)
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 2000)
    assert state.pop_logs()["cure.revised"] == pytest.approx(rate)
    assert torch.equal(torch.get_rng_state(), global_rng)


# --------------------------------------------------------------------------- warm start


def test_warm_start_from_the_clean_model_service(tmp_path, smoke_suite, smoke_splits):
    trainer = Trainer(RunSpec("smoke", "trades", (spec(),), 0), smoke_suite, smoke_splits,
                      tmp_path / "run", device=CPU, progress=False)
    state = trainer.build()
    (cure,) = trainer.defenses
    assert cure.capabilities == ("term_grads", "clean_model")
    trainer.provide_clean_model(state)
    cure.setup(state)
    entry = service.cache_dir(tmp_path / "_clean_models", smoke_suite, 0, "fp32")
    cached = load_checkpoint(entry / "model.pt")["model"]
    assert_same_state(trainer.model.state_dict(), cached)
    assert_same_state(cure.revision.state_dict(), cached)
    assert not any(p.requires_grad for p in cure.revision.parameters())
    assert trainer.pretraining[0]["for"] == ["cure"]
    cold = Trainer(RunSpec("smoke", "trades", (spec(warm_start=False),), 0), smoke_suite,
                   smoke_splits, tmp_path / "cold", device=CPU, progress=False)
    cold_state = cold.build()
    cold.provide_clean_model(cold_state)
    assert cold_state.clean_model is None and cold.pretraining == []


# --------------------------------------------------------------------------- invariants


def test_zero_strength_is_plain_trades_bit_for_bit(tmp_path, smoke_suite, smoke_splits):
    beta = smoke_suite.train.trades_beta
    check_zero_strength_is_plain(
        tmp_path, smoke_suite, smoke_splits, "trades",
        zero=spec(percent=0.0, gamma=0.0, beta=beta, warm_start=False),
        real=spec(warm_start=False))


def test_weights_clean_outside_around_update(tmp_path, smoke_suite, smoke_splits):
    check_weights_clean_outside_update(tmp_path / "run", smoke_suite, smoke_splits,
                                       CURE(warm_start=False), method="trades", perturbs=False)


@pytest.mark.parametrize("mode", ["paper", "rgp"])
def test_resume_equals_uninterrupted_including_revision_model_and_stream(
        tmp_path, smoke_suite, smoke_splits, mode):
    suite = with_train(smoke_suite, epochs=3)
    defense = spec(mode=mode, revision_rate=0.5, percent=30.0)
    check_resume_equals_uninterrupted(tmp_path, suite, smoke_splits, "trades", (defense,))
    saved = load_checkpoint(tmp_path / "full" / "last.pt")
    state = saved["defenses"][0]
    assert any(k.startswith("revision.") for k in state) and "_extra_state" in state
    assert saved["pretraining"][0]["for"] == ["cure"]  # warm-started, cached once
    assert len(list((tmp_path / "_clean_models").iterdir())) == 1


def test_trains_with_trades_and_refuses_other_methods(tmp_path, smoke_suite, smoke_splits):
    plain = train(tmp_path / "plain", smoke_suite, smoke_splits, method="trades")
    cured = train(tmp_path / "cure", smoke_suite, smoke_splits, method="trades",
                  defenses=[spec()])
    rows = read_history(cured.run_dir / "history.jsonl")
    plain_rows = read_history(plain.run_dir / "history.jsonl")
    assert rows[0]["loss.cure.consistency"] >= 0 and 0 <= rows[0]["cure.revised"] <= 1
    batches = len(cured.loader)
    assert rows[0]["forward_passes"] - plain_rows[0]["forward_passes"] == 2 * batches
    assert rows[0]["backward_passes"] - plain_rows[0]["backward_passes"] == 2 * batches
    assert states_differ(model_state(plain.run_dir), model_state(cured.run_dir))
    for method in ("at", "fgsm_rs", "n_fgsm", "standard"):
        with pytest.raises(ConfigError, match=f"does not compose with method '{method}'"):
            build_defenses((spec(),), method, smoke_suite)


def test_eval_models_returns_the_student_and_the_revision_model(tmp_path, smoke_suite,
                                                                 smoke_splits):
    trainer = train(tmp_path / "run", smoke_suite, smoke_splits, method="trades",
                    defenses=[spec(revision_rate=1.0)])
    (cure,) = trainer.defenses
    models = collect_eval_models(trainer.model, trainer.defenses, None)
    assert set(models) == {"model", "cure.revision"} and models["cure.revision"] is cure.revision
    assert states_differ(cure.revision.state_dict(), trainer.model.state_dict())
    saved = load_checkpoint(tmp_path / "run" / "last.pt")["defenses"][0]
    fresh = Trainer(trainer.spec, smoke_suite, smoke_splits, tmp_path / "x", device=CPU,
                    progress=False)
    state = fresh.build()  # as evaluate.py restores it: setup, then the checkpoint
    for d in fresh.defenses:
        d.setup(state)
        d.load_state_dict(saved)
    restored = collect_eval_models(fresh.model, fresh.defenses, state)["cure.revision"]
    assert_same_state(restored.state_dict(), cure.revision.state_dict())


def test_gpu_code_path_bf16_channels_last_on_cpu(tmp_path, smoke_suite, smoke_splits):
    """The CUDA configuration (bf16 autocast, channels_last): the clean model is trained and
    cached under that precision, CURE trains on it with finite losses and fp32 weights."""
    trainer = Trainer(RunSpec("smoke", "trades", (spec(percent=30.0),), 0), smoke_suite,
                      smoke_splits, tmp_path / "run", device=CPU, progress=False,
                      mixed_precision=True, channels_last=True)
    trainer.train()
    (entry,) = (tmp_path / "_clean_models").iterdir()
    assert entry == service.cache_dir(tmp_path / "_clean_models", smoke_suite, 0, "bfloat16")
    facts = load_checkpoint(entry / "model.pt")["facts"]
    assert facts["recipe"] == {"method": "standard", "epochs": 2, "precision": "bfloat16"}
    rows = read_history(tmp_path / "run" / "history.jsonl")
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["loss.cure.consistency"])
               for r in rows)
    (cure,) = trainer.defenses
    for module in (trainer.model, cure.revision):
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all()
                   for p in module.parameters())


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"percent": 101}, r"cure: percent .* in \[0.0, 100.0\]"),
    ({"alpha_c": -0.1}, r"cure: alpha_c .* in \[0.0, 1.0\]"),
    ({"gamma": float("nan")}, r"cure: gamma must be a finite number >= 0.0"),
    ({"beta": "1"}, r"cure: beta must be a finite number"),
    ({"revision_rate": 1.5}, r"cure: revision_rate .* in \[0.0, 1.0\]"),
    ({"revision_decay": True}, r"cure: revision_decay must be a finite number"),
    ({"mode": "soft"}, r"cure: mode must be one of \['paper', 'rgp'\]"),
    ({"warm_start": "yes"}, "cure: warm_start must be true or false"),
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CURE(**kwargs)


def test_card_and_defaults_are_the_papers():
    card = CURE.card
    assert card.venue == "ICLR 2024" and "2401.14948" in card.link
    assert card.reference_code == "https://github.com/NeurAI-Lab/CURE"
    assert "clean data" in card.extra_data and "clean-model service" in card.extra_data
    prn = PER_ARCHITECTURE["PreActResNet-18, CIFAR-10"]
    assert {k: CURE.params[k] for k in prn} == prn
    assert (CURE.params["revision_rate"], CURE.params["revision_decay"]) == (0.2, 0.999)
    assert CURE.params["beta"] == 1.0 and CURE.params["mode"] == "paper"
    assert [(p.metric, p.value) for p in card.published
            if p.label == "CURE" and p.architecture == "ResNet-18"] == [
        ("clean", 86.76), ("pgd20", 54.92), ("autoattack", 49.69)]
    assert CURE.methods == ("trades",) and CURE.slots == ("objective", "update")
