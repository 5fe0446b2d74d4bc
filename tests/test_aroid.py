"""AROID (defenses/aroid.py, _aroid_space.py, _aroid_policy.py): the search space and its
batched application, sampling, the hierarchical diversity penalty, REINFORCE with the
per-image baseline, the update schedule, the warm-up, the rewards' side effects, and the
shared invariants (resume, composition with AT and AWP, eval_models, slot conflicts)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import with_train
from invariants import (
    assert_same_state,
    check_resume_equals_uninterrupted,
    check_weights_clean_outside_update,
    model_state,
    states_differ,
    train,
)
from torch import nn

import defenses.aroid as aroid_module
from bench.clean_model import CleanRecipe, cache_dir
from bench.config import ConfigError, DefenseSpec, RunSpec, load_suite
from bench.engine import Trainer, collect_eval_models, to_float
from bench.records import load_checkpoint, read_history
from defenses import augment_ops as A
from defenses._aroid_policy import (
    PolicyNet,
    advantages,
    band_penalty,
    colour_penalty,
    diversity_penalty,
    log_prob,
    reinforce_loss,
    sample_actions,
)
from defenses._aroid_space import COLOUR, HEADS, apply_actions, identity_actions
from defenses.aroid import AROID
from defenses.registry import build_defenses

CPU = torch.device("cpu")
FAST = {"backbone": "suite", "trajectories": 2, "update_every": 2, "warmup_epochs": 0}


def spec(**params) -> DefenseSpec:
    return DefenseSpec("aroid", tuple(sorted({**FAST, **params}.items())))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 8, side: int = 32, seed: int = 0) -> torch.Tensor:
    x = torch.randint(1, 255, (n, 3, side, side), generator=gen(seed)).float() / 255
    return x.contiguous(memory_format=torch.channels_last)


def group_of(op: str) -> tuple[int, int]:
    return COLOUR.groups[COLOUR.ops.index(op)]


def hierarchical_uniform(n: int = 2) -> torch.Tensor:
    """Colour logits uniform over the ops and uniform within each op."""
    sizes = torch.tensor([COLOUR.groups[k][1] for k in COLOUR.op_of], dtype=torch.float32)
    return (-sizes.log()).expand(n, -1).clone()


# --------------------------------------------------------------------------- search space


def test_search_space_is_the_specs():
    assert HEADS == {"flip": 2, "crop": 16, "colour": 108, "erase": 11}
    sizes = dict(zip(COLOUR.ops, (k for _, k in COLOUR.groups)))
    assert sizes == {"identity": 1, "autocontrast": 1, "equalize": 1, "posterize": 5,
                     **{op: 10 for op in ("rotate", "solarize", "saturation", "contrast",
                                          "brightness", "sharpness", "shear_x", "shear_y",
                                          "translate_x", "translate_y")}}

    def mags(op):
        start, k = group_of(op)
        return COLOUR.magnitude[start:start + k]

    assert mags("rotate") == tuple(float(3 * i) for i in range(1, 11))
    assert mags("posterize") == (4.0, 5.0, 6.0, 7.0, 8.0)
    assert mags("translate_x") == tuple(float(i) for i in range(1, 11))
    for op in ("saturation", "contrast", "brightness", "sharpness"):
        assert math.isclose(mags(op)[0], 0.28) and math.isclose(mags(op)[-1], 1.9)
    assert math.isclose(mags("shear_y")[0], 0.03) and math.isclose(mags("shear_y")[-1], 0.3)
    assert mags("solarize")[0] == 25 / 256 and mags("solarize")[-1] == 1.0
    signed = {COLOUR.ops[k] for k, s in zip(COLOUR.op_of, COLOUR.signed) if s}
    assert signed == {"rotate", "shear_x", "shear_y", "translate_x", "translate_y"}


def test_identity_actions_leave_the_batch_unchanged():
    x = images()
    out = apply_actions(x, identity_actions(len(x), CPU), gen())
    assert torch.equal(out, x) and out.is_contiguous(memory_format=torch.channels_last)


def test_each_head_acts_on_its_own_image():
    x = images(n=4)
    ident = identity_actions(4, CPU)
    flipped = apply_actions(x, {**ident, "flip": torch.tensor([1, 0, 0, 1])}, gen())
    assert torch.equal(flipped[0], x[0].flip(2)) and torch.equal(flipped[1], x[1])
    cropped = apply_actions(x, {**ident, "crop": torch.tensor([0, 15, 0, 7])}, gen())
    zeros = (cropped == 0).all(1).flatten(1).sum(1)
    assert torch.equal(cropped[0], x[0]) and zeros[0] == 0 and zeros[2] == 0
    assert zeros[1] > zeros[3] > 0  # a larger shift leaves a larger empty canvas
    start, _ = group_of("brightness")
    colour = apply_actions(x, {**ident, "colour": torch.tensor([start + 4, 0, 0, 0])}, gen())
    torch.testing.assert_close(colour[0], A.brightness(x[:1], COLOUR.magnitude[start + 4])[0])
    assert torch.equal(colour[1:], x[1:])
    n = 400
    xs = images(n=n, seed=1)
    erased = apply_actions(xs, {**identity_actions(n, CPU),
                                "erase": torch.tensor([0, 2, 10, 6]).repeat(n // 4)}, gen(2))
    area = (erased == 0).all(1).flatten(1).float().mean(1).view(-1, 4)
    assert (area[:, 0] == 0).all()
    for col, k in ((1, 2), (2, 10), (3, 6)):
        hit = area[:, col][area[:, col] > 0]
        assert len(hit) > 0.5 * len(area)  # most boxes fit
        assert abs(hit.mean().item() - (0.05 * k + 0.005)) < 0.03


def test_apply_actions_is_deterministic_given_the_generator():
    x = images(n=32)
    actions = {name: torch.randint(0, k, (32,), generator=gen(3)) for name, k in HEADS.items()}
    a, b = apply_actions(x, actions, gen(4)), apply_actions(x, actions, gen(4))
    assert torch.equal(a, b) and not torch.equal(a, apply_actions(x, actions, gen(5)))
    assert a.min() >= 0 and a.max() <= 1 and a.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="CropShift up to 15 px"):
        apply_actions(images(side=12), identity_actions(8, CPU), gen())


# --------------------------------------------------------------------------- sampling


def test_sampling_follows_the_policy_and_its_generator():
    logits = {"flip": torch.tensor([[0.0, math.log(3.0)]]).expand(20000, 2),
              "erase": torch.zeros(20000, 11)}
    a = sample_actions(logits, gen(0))
    assert abs(a["flip"].float().mean().item() - 0.75) < 0.015
    counts = torch.bincount(a["erase"], minlength=11).float() / 20000
    assert (counts - 1 / 11).abs().max() < 0.01
    b = sample_actions(logits, gen(0))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lp = log_prob(logits, a)
    expected = torch.where(a["flip"] == 1, math.log(0.75), math.log(0.25)) - math.log(11)
    torch.testing.assert_close(lp, expected)


# --------------------------------------------------------------------------- diversity


def test_band_penalty_is_zero_inside_the_band_and_a_hand_computed_case():
    assert band_penalty(torch.zeros(4, 10), 0.1, 0.3) == 0
    assert band_penalty(0.01 * torch.randn(4, 10, generator=gen(0)), 0.1, 0.3) == 0
    # p = (0.7, 0.3), band [0.45, 0.65]: +log 0.7 (above), -log 0.3 (below), 2 entries
    two = torch.tensor([[0.7, 0.3]]).log()
    torch.testing.assert_close(band_penalty(two, 0.1, 0.3),
                               torch.tensor((math.log(0.7) - math.log(0.3)) / 2))
    # two rows, 3 classes, band [0.3, 0.4333]: row 1 (0.5 above, 0.25 twice below), row 2
    # inside: ONE count of 3 entries over the head (not mean above + mean below)
    rows = torch.tensor([[0.5, 0.25, 0.25], [0.34, 0.33, 0.33]]).log()
    expected = (math.log(0.5) - 2 * math.log(0.25)) / 3
    torch.testing.assert_close(band_penalty(rows, 0.1, 0.3), torch.tensor(expected))


def test_colour_penalty_is_hierarchical():
    hier = hierarchical_uniform()
    assert colour_penalty(hier, 0.1, 0.3).abs() < 1e-6
    # flat over the 108 classes is far from uniform over the ops (identity: 1/108 vs 1/14)
    assert colour_penalty(torch.zeros(2, 108), 0.1, 0.3) > 0.1
    # op-level uniform, peaked within rotate: only the within-op term fires
    start, k = group_of("rotate")
    inner = hier.clone()
    inner[:, start:start + k] = torch.log(torch.tensor([0.91] + [0.01] * 9))
    assert torch.allclose(inner.logsumexp(1), hier.logsumexp(1))
    assert colour_penalty(inner, 0.1, 0.3) > 0.1
    uniform = {"flip": torch.zeros(2, 2), "crop": torch.zeros(2, 16), "colour": hier,
               "erase": torch.zeros(2, 11)}
    assert diversity_penalty(uniform, 0.1, 0.3).abs() < 1e-6
    peaked = {**uniform, "crop": torch.tensor([[4.0] + [0.0] * 15]).expand(2, 16)}
    assert diversity_penalty(peaked, 0.1, 0.3) > 0


# The reference's diversity term re-derived with plain loops (one image, one class at a
# time), independently of the vectorised code: +log p above the band, -log p below, one
# pooled count per head; the colour head with JOINT log-probabilities at the op level
# (every class of an op outside the op band, counted once each) and within each op of
# several magnitudes (the class's probability given its op outside that op's band).


def _loop_flat(logits: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    total, count = torch.zeros(()), 0
    n = logits.shape[1]
    for row in logits:
        logp = row - torch.logsumexp(row, 0)
        for c in range(n):
            prob = math.exp(logp[c].item())
            if prob > (1 + upper) / n:
                total, count = total + logp[c], count + 1
            elif prob < (1 - lower) / n:
                total, count = total - logp[c], count + 1
    return total / count if count else total


def _loop_colour(logits: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    total, count = torch.zeros(()), 0
    n_ops = len(COLOUR.groups)
    for row in logits:
        logp = row - torch.logsumexp(row, 0)
        for start, k in COLOUR.groups:
            classes = range(start, start + k)
            mass = sum(math.exp(logp[c].item()) for c in classes)
            for c in classes:
                if mass > (1 + upper) / n_ops:
                    total, count = total + logp[c], count + 1
                elif mass < (1 - lower) / n_ops:
                    total, count = total - logp[c], count + 1
                if k > 1:
                    given_op = math.exp(logp[c].item()) / mass
                    if given_op > (1 + upper) / k:
                        total, count = total + logp[c], count + 1
                    elif given_op < (1 - lower) / k:
                        total, count = total - logp[c], count + 1
    return total / count if count else total


@pytest.mark.parametrize(("scale", "lower", "upper"), [(1.0, 0.1, 0.3), (3.0, 0.1, 0.3),
                                                       (0.3, 0.2, 0.5), (2.0, 0.5, 2.0)])
def test_diversity_matches_a_loop_re_derivation_values_and_gradients(scale, lower, upper):
    g = gen(int(scale * 10))
    logits = {name: (scale * torch.randn(3, n, generator=g)).requires_grad_(True)
              for name, n in HEADS.items()}
    ours = diversity_penalty(logits, lower, upper)
    ours_grads = torch.autograd.grad(ours, list(logits.values()))
    copies = {name: t.detach().clone().requires_grad_(True) for name, t in logits.items()}
    expected = torch.stack([_loop_colour(t, lower, upper) if name == "colour"
                            else _loop_flat(t, lower, upper)
                            for name, t in copies.items()]).mean()
    expected_grads = torch.autograd.grad(expected, list(copies.values()))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(logits, ours_grads, expected_grads):
        assert b.abs().sum() > 0, name  # every head has entries outside its band
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=name)
    colour = copies["colour"]
    torch.testing.assert_close(colour_penalty(colour, lower, upper),
                               _loop_colour(colour, lower, upper), rtol=1e-5, atol=1e-6)


def test_descending_the_penalty_flattens_a_peaked_head():
    logits = torch.zeros(3, 16)
    logits[:, 0] = 4.0
    logits.requires_grad_(True)
    opt = torch.optim.SGD([logits], lr=1.0)
    before = logits.softmax(1)[:, 0].mean().item()
    for _ in range(20):
        opt.zero_grad()
        band_penalty(logits, 0.1, 0.3).backward()
        opt.step()
    assert logits.softmax(1)[:, 0].mean().item() < 0.5 * before


# --------------------------------------------------------------------------- REINFORCE


def test_per_image_baseline_shape_and_loss_checks():
    rewards = torch.randn(5, 8, generator=gen(0))
    adv = advantages(rewards)
    assert adv.shape == (5, 8) and torch.allclose(adv.mean(1), torch.zeros(5), atol=1e-6)
    torch.testing.assert_close(adv, rewards - rewards.mean(1, keepdim=True))
    with pytest.raises(ValueError, match="must both be N x T"):
        reinforce_loss(torch.zeros(5, 8), torch.zeros(5, 7))
    with pytest.raises(ValueError, match="must both be N x T"):
        reinforce_loss(torch.zeros(40), torch.zeros(40))
    constant = reinforce_loss(torch.randn(5, 8, requires_grad=True), torch.ones(5, 8))
    assert constant == 0  # the same reward for every trajectory: no signal


def _toy_policy_probability(sign: float, head: str, cls: int, steps: int = 10,
                            lr: float = 10.0) -> tuple[float, float]:
    torch.manual_seed(0)
    policy = PolicyNet(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU()), 16)
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    x, g = torch.rand(32, 3, 8, 8, generator=gen(0)), gen(1)

    def prob() -> float:
        with torch.no_grad():
            return policy(x)[head].softmax(1)[:, cls].mean().item()

    before = prob()
    for _ in range(steps):
        logits = policy(x)
        logprobs, rewards = [], []
        for _ in range(8):
            a = sample_actions(logits, g)
            logprobs.append(log_prob(logits, a))
            rewards.append(sign * (a[head] == cls).float())
        opt.zero_grad()
        reinforce_loss(torch.stack(logprobs, 1), torch.stack(rewards, 1)).backward()
        opt.step()
    return before, prob()


def test_reinforce_raises_the_probability_of_the_rewarded_choice():
    equalize, _ = group_of("equalize")
    before, after = _toy_policy_probability(1.0, "colour", equalize)
    assert after > 1.5 * before
    before, after = _toy_policy_probability(-1.0, "colour", equalize)
    assert after < before
    before, after = _toy_policy_probability(1.0, "flip", 1, steps=5, lr=1.0)
    assert after > before + 0.1


# --------------------------------------------------------------------------- the defense


def _built(tmp_path, suite, splits, defense_spec: DefenseSpec) -> tuple[Trainer, object]:
    trainer = Trainer(RunSpec(suite.name, "at", (defense_spec,), 0), suite, splits, tmp_path,
                      device=CPU, progress=False)
    state = trainer.build()
    trainer.provide_clean_model(state)
    for d in trainer.defenses:
        d.setup(state)
    state.clean_model = None
    x, y, index = next(iter(trainer.loader))
    state.x, state.y, state.index = x, y, index
    state.raw_x = to_float(trainer.train_x_for(index), trainer.channels_last)
    state.eps = suite.train.eps
    return trainer, state


def _scripted_update(tmp_path, suite, splits, lr: float = 1e-3, lam: float = 0.4):
    """One `update_policy` with its rewards scripted from the sampled actions (spies on
    the sampler and the batch; the target and affinity models are stubbed): r_vul =
    [flip] + crop/15, affinity CE 2 [erase] on x^ and 0.5 on x (so r_aff is 1.5 or 0 after
    the clamp). Returns the policy before, after, the batch and the sampled actions."""
    trainer, state = _built(tmp_path, suite, splits, spec(lambdas=lam, beta_div=0.0,
                                                          trajectories=4, policy_lr=lr))
    (aroid,) = trainer.defenses
    before = copy.deepcopy(aroid.policy)
    drawn, sampled = [], []
    draw, sample = state.draw_batch, aroid_module.sample_actions

    def spy_draw(augment=True):
        out = draw(augment=augment)
        drawn.append(out)
        return out

    def spy_sample(logits, generator):
        out = sample(logits, generator)
        sampled.append(out)
        return out

    def vulnerability(state, x_aug, y, trajectories=1):  # the T N batch, trajectory-major
        assert len(x_aug) == len(sampled) * len(drawn[0][0]) and trajectories == len(sampled)
        return torch.cat([(a["flip"] == 1).float() + a["crop"].float() / 15 for a in sampled])

    def affinity(state, x, y, batches=1):
        if len(sampled) == 0:  # the clean batch, before any trajectory
            return torch.full((len(y),), 0.5)
        assert batches == len(sampled)
        return torch.cat([2.0 * (a["erase"] > 0).float() for a in sampled])

    state.draw_batch = spy_draw
    aroid._vulnerability, aroid._affinity_loss = vulnerability, affinity
    aroid_module.sample_actions = spy_sample
    try:
        aroid.update_policy(state)
    finally:
        aroid_module.sample_actions = sample
    (batch,) = drawn
    return before, aroid.policy, batch[0], sampled


def test_policy_update_is_the_reinforce_step_of_the_reference_formula(tmp_path, smoke_suite,
                                                                     smoke_splits):
    """The policy moves by one SGD step (lr, gradient norm clipped to 1) along the gradient
    of -mean_{i,t} log pi(a_it | x_i) (R_it - mean_t R_it), R = r_vul - lambda r_aff,
    re-derived here from the sampled actions and scripted rewards."""
    lam, lr = 0.4, 1e-3
    before, after, x, sampled = _scripted_update(tmp_path, smoke_suite, smoke_splits, lr, lam)
    assert len(sampled) == 4
    logits = before.train()(x)
    total = torch.zeros(())
    n = len(x)
    rewards = []
    for a in sampled:
        r_vul = (a["flip"] == 1).float() + a["crop"].float() / 15
        r_aff = torch.clamp(2.0 * (a["erase"] > 0).float() - 0.5, min=0.0)
        rewards.append(r_vul - lam * r_aff)
    baseline = sum(rewards) / len(rewards)
    for a, r in zip(sampled, rewards):
        for i in range(n):
            logp = sum(F.log_softmax(logits[h][i], 0)[a[h][i]] for h in HEADS)
            total = total - logp * (r[i] - baseline[i]).item()
    loss = total / (n * len(sampled))
    params = [p for p in before.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    scale = min(1.0, 1.0 / (norm.item() + 1e-6))
    for (name, p), g, q in zip(before.named_parameters(), grads, after.parameters()):
        torch.testing.assert_close(q.detach(), p.detach() - lr * scale * g, rtol=1e-4,
                                   atol=1e-7, msg=name)


def test_one_policy_step_favours_the_more_vulnerable_augmentation(tmp_path, smoke_suite,
                                                                 smoke_splits):
    """Flipped images are scripted as more vulnerable, erased ones as less affine: one
    step raises p(flip) and lowers p(erase) on the policy batch."""
    before, after, x, _ = _scripted_update(tmp_path, smoke_suite, smoke_splits, lr=0.5)
    with torch.no_grad():
        old, new = before.train()(x), after.train()(x)
    assert new["flip"].softmax(1)[:, 1].mean() > old["flip"].softmax(1)[:, 1].mean() + 0.01
    assert new["erase"].softmax(1)[:, 0].mean() > old["erase"].softmax(1)[:, 0].mean()


def test_warm_up_leaves_the_raw_batch_unchanged(tmp_path, smoke_suite, smoke_splits):
    trainer, state = _built(tmp_path, smoke_suite, smoke_splits,
                            spec(warmup_epochs=1, lambdas=0.0))
    (aroid,) = trainer.defenses
    g = aroid.generator.get_state()
    aroid.before_attack(state)
    assert state.x is state.raw_x and torch.equal(aroid.generator.get_state(), g)
    state.epoch = state.step = 4  # past the warm-up: augmented
    aroid.before_attack(state)
    assert not torch.equal(state.x, state.raw_x)


def test_warm_up_never_ended_is_plain_at_bit_for_bit(tmp_path, smoke_suite, smoke_splits):
    """With no augmentation in the suite, AROID that never leaves its warm-up is plain AT."""
    suite = replace(smoke_suite, data=replace(smoke_suite.data, augment="none"))
    plain = train(tmp_path / "plain", suite, smoke_splits)
    resting = train(tmp_path / "rest", suite, smoke_splits,
                    defenses=[spec(warmup_epochs=suite.train.epochs, lambdas=0.0)])
    assert_same_state(model_state(plain.run_dir), model_state(resting.run_dir))
    assert resting.defenses[0].updates == 0


@pytest.mark.parametrize(("every", "warmup", "expected"),
                         [(3, 1, [6, 9]), (1, 2, [8, 9, 10, 11]), (5, 0, [4, 9])])
def test_policy_updates_every_k_iterations_exactly(tmp_path, smoke_suite, smoke_splits,
                                                   every, warmup, expected):
    suite = with_train(smoke_suite, epochs=3)  # 4 batches per epoch: steps 0..11
    defense = AROID(**{**FAST, "update_every": every, "warmup_epochs": warmup, "lambdas": 0.0})
    steps: list[int] = []
    original = defense.update_policy

    def spy(state) -> None:
        steps.append(state.step)
        original(state)

    defense.update_policy = spy  # type: ignore[method-assign]
    train(tmp_path, suite, smoke_splits, instances=[defense])
    assert steps == expected and defense.updates == len(expected)


def test_policy_update_touches_only_the_policy(tmp_path, smoke_suite, smoke_splits):
    """The reward's attack runs in eval mode with logged overrides; the target's weights,
    BatchNorm statistics, gradients and mode, the data and attack streams are untouched;
    the policy moves and the second stream is used."""
    trainer, state = _built(tmp_path, smoke_suite, smoke_splits, spec(lambdas=0.0))
    (aroid,) = trainer.defenses
    target = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    policy = {k: v.clone() for k, v in aroid.policy.state_dict().items()}
    rng = {n: g.get_state() for n, g in (("data", trainer.data_gen),
                                         ("attack", trainer.attack_gen),
                                         ("stream", trainer.stream_gen))}
    aroid.update_policy(state)
    assert_same_state(target, trainer.model.state_dict())
    assert trainer.model.training and all(p.grad is None for p in trainer.model.parameters())
    assert states_differ(policy, aroid.policy.state_dict()) and aroid.updates == 1
    assert torch.equal(rng["data"], trainer.data_gen.get_state())
    assert torch.equal(rng["attack"], trainer.attack_gen.get_state())
    assert not torch.equal(rng["stream"], trainer.stream_gen.get_state())
    eps = smoke_suite.train.eps
    assert state.attack_overrides_log == [
        {"steps": 2, "step_size": eps / 4, "random_start": False, "attack_bn": "eval"}]


def test_affinity_model_is_the_clean_model_without_augmentation(tmp_path, smoke_suite,
                                                                 smoke_splits):
    """The reference's affinity model: standard training with no augmentation for 40
    epochs, lr decays at 20 and 30 (on a 200-epoch suite; 40/200 of a shorter one)."""
    paper = load_suite("cifar10-linf")
    trained = AROID().clean_model_recipe.suite_for(paper)
    assert (trained.train.epochs, trained.data.augment, trained.train.schedule) == (
        40, "none", "piecewise")
    assert [m * 40 for m in trained.train.milestones] == [20, 30]
    assert paper.data.augment == "crop_flip" and smoke_suite.data.augment == "flip"
    trainer, state = _built(tmp_path / "run", smoke_suite, smoke_splits, spec())
    (aroid,) = trainer.defenses
    (entry,) = (tmp_path / "_clean_models").iterdir()
    assert entry == cache_dir(tmp_path / "_clean_models", smoke_suite, 0, "fp32",
                              CleanRecipe(augment="none", epoch_share=0.2,
                                          milestones=(0.5, 0.75)))
    (facts,) = trainer.pretraining
    assert facts["recipe"]["augment"] == "none" and facts["epochs"] == 1  # round(0.4) -> 1
    assert facts["seconds"] > 0 and "augment none" in facts["what"]
    cached = load_checkpoint(entry / "model.pt")["model"]
    assert_same_state(aroid.affinity.state_dict(), cached)
    assert aroid.affinity_is_clean and not any(p.requires_grad
                                               for p in aroid.affinity.parameters())
    assert trainer.pretraining[0]["for"] == ["aroid"]
    cold = Trainer(RunSpec("smoke", "at", (spec(),), 0), smoke_suite, smoke_splits,
                   tmp_path / "cold", device=CPU, progress=False)
    cold_state = cold.build()  # no clean-model service: the affinity reward refuses to run
    cold.defenses[0].setup(cold_state)
    with pytest.raises(RuntimeError, match="no clean model for the affinity reward"):
        cold.defenses[0].update_policy(cold_state)


def test_lambda_follows_the_learning_rate_stage(smoke_suite):
    defense = AROID(lambdas="0.4;0.2;0.1")
    state = type("S", (), {"suite": smoke_suite, "progress": 0.0})()
    assert defense.lam(state) == 0.4
    state.progress = 0.5  # smoke's milestone: the first decay
    assert defense.lam(state) == 0.2
    cyclic = replace(smoke_suite, train=replace(smoke_suite.train, schedule="cyclic"))
    state.suite = cyclic
    assert defense.lam(state) == 0.4
    assert AROID(lambdas=0.3).lambdas == (0.3,) and AROID(lambdas=[0.1, 0]).lambdas == (0.1, 0.0)


def test_resume_equals_uninterrupted_with_policy_optimizer_and_stream(tmp_path, smoke_suite,
                                                                      smoke_splits):
    suite = with_train(smoke_suite, epochs=3)
    check_resume_equals_uninterrupted(tmp_path, suite, smoke_splits, "at", (spec(),))
    saved = load_checkpoint(tmp_path / "full" / "last.pt")
    state = saved["defenses"][0]
    assert any(k.startswith("policy.heads.colour") for k in state)
    assert any(k.startswith("affinity.") for k in state)
    extra = state["_extra_state"]
    assert extra["updates"] == 6 and extra["affinity_is_clean"]
    assert extra["optimizer"]["state"] and extra["generator"] is not None
    assert saved["pretraining"][0]["for"] == ["aroid"]


def test_trains_with_at_and_counts_its_passes(tmp_path, smoke_suite, smoke_splits):
    plain = train(tmp_path / "plain", smoke_suite, smoke_splits)
    run = train(tmp_path / "aroid", smoke_suite, smoke_splits, defenses=[spec()])
    assert states_differ(model_state(plain.run_dir), model_state(run.run_dir))
    rows, plain_rows = (read_history(r.run_dir / "history.jsonl") for r in (run, plain))
    assert all(math.isfinite(r["aroid.r_vul"]) and r["aroid.r_aff"] >= 0 for r in rows)
    # 8 batches: +1 policy forward each; 4 updates: policy fwd/bwd, 1 clean affinity
    # forward, per trajectory (T = 2) 2 target forwards + 2-step PGD + 1 affinity forward
    assert rows[-1]["forward_passes"] - plain_rows[-1]["forward_passes"] == 8 + 4 * 12
    assert rows[-1]["backward_passes"] - plain_rows[-1]["backward_passes"] == 4 * 5
    rng_plain = load_checkpoint(plain.run_dir / "last.pt")["rng"]
    rng = load_checkpoint(run.run_dir / "last.pt")["rng"]
    for stream in ("data", "attack", "torch"):
        assert torch.equal(rng_plain[stream], rng[stream]), stream


def test_composes_with_awp(tmp_path, smoke_suite, smoke_splits):
    for order in ((spec(), DefenseSpec("awp")), (DefenseSpec("awp"), spec())):
        build_defenses(order, "at", smoke_suite)  # no slot conflict
    alone = train(tmp_path / "aroid", smoke_suite, smoke_splits, defenses=[spec()])
    both = train(tmp_path / "both", smoke_suite, smoke_splits,
                 defenses=[spec(), DefenseSpec("awp")])
    assert both.spec.row_name == "AT+AROID+AWP"
    assert states_differ(model_state(alone.run_dir), model_state(both.run_dir))
    rows = read_history(both.run_dir / "history.jsonl")
    assert all(math.isfinite(r["train_loss"]) for r in rows)


def test_weights_clean_outside_around_update(tmp_path, smoke_suite, smoke_splits):
    check_weights_clean_outside_update(tmp_path, smoke_suite, smoke_splits,
                                       AROID(**{**FAST, "lambdas": 0.0}), perturbs=False)


def test_eval_models_adds_nothing(tmp_path, smoke_suite, smoke_splits):
    run = train(tmp_path, smoke_suite, smoke_splits, defenses=[spec(lambdas=0.0)])
    assert set(collect_eval_models(run.model, run.defenses, None)) == {"model"}


def test_conflicts_and_methods(smoke_suite):
    for names in (("aroid", "idbh"), ("idbh", "aroid")):
        with pytest.raises(ConfigError, match="both claim the 'augmentation' slot"):
            build_defenses(tuple(DefenseSpec(n) for n in names), "at", smoke_suite)
    for method in ("trades", "fgsm_rs", "n_fgsm", "standard"):
        with pytest.raises(ConfigError, match=f"does not compose with method '{method}'"):
            build_defenses((spec(),), method, smoke_suite)


def test_gpu_code_path_bf16_channels_last_on_cpu(tmp_path, smoke_suite, smoke_splits):
    trainer = Trainer(RunSpec("smoke", "at", (spec(),), 0), smoke_suite, smoke_splits,
                      tmp_path / "run", device=CPU, progress=False, mixed_precision=True,
                      channels_last=True)
    trainer.train()
    rows = read_history(tmp_path / "run" / "history.jsonl")
    assert all(math.isfinite(r["aroid.r_vul"]) and math.isfinite(r["train_loss"]) for r in rows)
    policy = trainer.defenses[0].policy
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in policy.parameters())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"backbone": "resnet50"}, "backbone must be 'suite'"),
    ({"trajectories": 1}, "trajectories must be an integer >= 2"),
    ({"update_every": 0}, "update_every must be an integer >= 1"),
    ({"warmup_epochs": 1.5}, "warmup_epochs must be an integer >= 0"),
    ({"lambdas": "0.4;x"}, "lambdas must be a number, a list of numbers or a string"),
    ({"lambdas": [0.4, -0.1]}, r"lambdas must be a finite number in \[0.0, inf\)"),
    ({"lambdas": []}, "lambdas must be a number"),
    ({"beta_div": float("nan")}, "beta_div must be a finite number"),
    ({"div_lower": 1.0}, r"div_lower must be a finite number in \[0.0, 1.0\)"),
    ({"policy_lr": 0}, r"policy_lr must be a finite number in \(0.0, inf\)"),
    ({"reward_steps": True}, "reward_steps must be an integer >= 1"),
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AROID(**kwargs)


def test_card_and_defaults_are_the_published_recipe():
    card = AROID.card
    assert card.paper.startswith("Li, Qiu & Spratling. AROID") and card.venue == "IJCV 2024"
    assert "2306.07197" in card.link and card.reference_code.endswith("TreeLLi/AROID")
    assert "un-augmented data" in card.extra_data and card.published_notes and card.hyperparameters
    assert "docs/defenses/aroid.md" in aroid_module.__doc__ and "aroid.md" in card.notes
    doc = (Path(__file__).parents[1] / "docs" / "defenses" / "aroid.md").read_text()
    assert doc.startswith("# AROID") and "## Differences from the authors' code" in doc
    assert aroid_module.__doc__.startswith("AROID (Li, Qiu & Spratling")
    assert AROID.__doc__.startswith("AROID (Li, Qiu & Spratling")
    d = AROID()
    assert (d.backbone, d.trajectories, d.update_every, d.warmup_epochs) == (
        "preact_resnet18", 8, 5, 5)
    assert d.lambdas == (0.4, 0.2, 0.1) and (d.beta_div, d.div_lower, d.div_upper) == (
        0.8, 0.1, 0.3)
    assert d.policy_lr == 1e-3 and d.reward_steps == 2
    assert AROID.slots == ("augmentation",) and AROID.methods == ("at",)
    assert d.capabilities == ("raw_batch", "clean_model")
    assert AROID(lambdas=0.0).capabilities == ("raw_batch",)  # no affinity, no clean model


@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_a_bad_reward_chunk_is_refused(monkeypatch, value):
    monkeypatch.setenv("ROBENCH_AROID_REWARD_CHUNK", value)
    with pytest.raises(ConfigError, match="ROBENCH_AROID_REWARD_CHUNK must be an integer >= 0"):
        AROID()


def test_reward_chunk_is_not_a_parameter_of_the_run(monkeypatch):
    monkeypatch.setenv("ROBENCH_AROID_REWARD_CHUNK", "3")
    aroid = AROID()
    assert aroid.reward_chunk == 3 and "reward_chunk" not in aroid.hparams


def test_reward_chunk_defaults_to_the_device():
    from defenses._aroid_reward import reward_chunk_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert reward_chunk_for(cpu, None, 8) == 1 and reward_chunk_for(cuda, None, 8) == 8
    assert reward_chunk_for(cpu, 0, 8) == 8 and reward_chunk_for(cuda, 3, 8) == 3
