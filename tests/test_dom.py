"""DOM_RE and DOM_DA (defenses/dom.py): the removal rule and the engine's loss, the
augmentation rounds, the warm-up, the random stream, resume, composition, parameters."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import with_train
from invariants import (
    assert_same_state,
    check_resume_equals_uninterrupted,
    check_zero_strength_is_plain,
    model_state,
    states_differ,
    train,
)
from torch import nn
from torchvision import transforms as T

from bench.config import ConfigError, DefenseSpec, RunSpec
from bench.engine import Trainer
from bench.records import load_checkpoint, read_history
from bench.state import TrainState, seeded_global_rng
from defenses.dom import DomRE
from defenses.dom_da import DomDA
from defenses.registry import build_defenses

CPU = torch.device("cpu")


def spec(name: str, **params) -> DefenseSpec:
    return DefenseSpec(name, tuple(sorted(params.items())))


def built_trainer(tmp_path, suite, splits, method: str = "at") -> tuple[Trainer, TrainState]:
    """A trainer with its state and the first batch loaded, as `train_step` sees it."""
    trainer = Trainer(RunSpec(suite.name, method, (), 0), suite, splits, tmp_path,
                      device=CPU, progress=False)
    state = trainer.build()
    state.x, state.y, state.index = next(iter(trainer.loader))
    trainer.model.train()
    return trainer, state


def clean_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def threshold_between(losses: torch.Tensor) -> float:
    """A tau halfway between the two middle losses: about half the batch on each side."""
    ordered = losses.sort().values
    k = len(ordered) // 2
    return float((ordered[k - 1] + ordered[k]) / 2)


# --------------------------------------------------------------------------- DOM_RE


def test_re_zeroes_removed_examples_and_divides_by_the_full_batch(tmp_path, smoke_suite,
                                                                   smoke_splits):
    trainer, state = built_trainer(tmp_path, smoke_suite, smoke_splits)
    clean = clean_losses(trainer.model, state.x, state.y)
    re = DomRE(tau=threshold_between(clean), warmup=0.0)
    re.bind_random_stream(0, CPU)
    trainer.defenses = [re]
    re.before_attack(state)
    keep = clean >= re.tau
    assert 0 < int(keep.sum()) < len(keep)
    assert torch.equal(re.sample_weights(state), keep.float())
    state.x_adv = trainer.method.attack(state)
    loss = trainer._loss(state)
    per_sample = state.per_sample_loss.float()
    torch.testing.assert_close(loss, (per_sample * keep).sum() / len(keep))
    assert not torch.isclose(loss, per_sample[keep].mean())  # not the mean over kept ones


def test_re_warmup_is_a_fraction_of_training(tmp_path, smoke_suite, smoke_splits):
    trainer, state = built_trainer(tmp_path, smoke_suite, smoke_splits)  # 2 epochs x 4
    re = DomRE(tau=100.0, warmup=0.5)
    state.epoch, state.step = 0, 3  # progress 3/8
    re.before_attack(state)
    assert re.sample_weights(state) is None and state.counter.forward == 0
    state.epoch, state.step = 1, 4  # progress 4/8
    re.before_attack(state)
    assert torch.equal(re.sample_weights(state), torch.zeros(len(state.y)))
    assert state.counter.forward == 1  # the one extra forward per batch


@pytest.mark.parametrize("update_bn", [True, False])
def test_natural_forward_updates_batchnorm_statistics_only_if_asked(
        tmp_path, smoke_suite, smoke_splits, update_bn):
    trainer, state = built_trainer(tmp_path, smoke_suite, smoke_splits)
    before = {n: b.clone() for n, b in trainer.model.named_buffers()}
    DomRE(tau=1.0, warmup=0.0, update_bn=update_bn).before_attack(state)
    changed = [not torch.equal(before[n], b) for n, b in trainer.model.named_buffers()]
    assert any(changed) == update_bn


# --------------------------------------------------------------------------- DOM_DA


class MeanBrightness(nn.Module):
    """Class-0 logit 20 * (0.5 - mean pixel), the others 0: for y = 0 the loss grows with
    the brightness (0.16 at mean 0.3, 0.80 at 0.4, 2.3 at 0.5, 4.2 at 0.6)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return F.pad((self.scale * (0.5 - m))[:, None], (0, 9))


def hand_state(smoke_suite, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> TrainState:
    state = TrainState(suite=smoke_suite, spec=RunSpec("smoke", "at", (), 0), device=CPU,
                       model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                       epochs=1, batches_per_epoch=1, autocast_dtype=None, channels_last=True)
    state.x, state.y = x, y
    return state


def brighten(images: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the transform: +51 on uint8 (+0.2)."""
    return (images.to(torch.int16) + 51).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize(("rounds", "beta", "expected"), [
    # uint8 levels of A (not flagged), B (leaves in round 1), C and D (flagged throughout)
    (3, 0.5, [153, 128, 128, 101]),  # C: 26 -> blend 51.5 -> blend 76.75 -> aug 77+51
    (2, 0.5, [153, 128, 102, 76]),   # D: 0 -> blend 25.5 -> last round: aug 25+51
    (3, 0.0, [153, 128, 77, 51]),    # beta 0: blending keeps x, the last round takes aug(x)
])
def test_da_rounds_compound_blend_and_the_last_round_takes_the_augmented_image(
        smoke_suite, rounds, beta, expected):
    levels = torch.tensor([153, 77, 26, 0], dtype=torch.uint8)
    x = (levels[:, None, None, None].expand(4, 3, 4, 4).float() / 255).contiguous(
        memory_format=torch.channels_last)
    state = hand_state(smoke_suite, MeanBrightness(), x, torch.zeros(4, dtype=torch.long))
    da = DomDA(tau=1.0, warmup=0.0, beta=beta, rounds=rounds)
    da.bind_random_stream(0, CPU)
    da.augment_uint8 = brighten  # type: ignore[method-assign]
    da.before_attack(state)
    want = torch.tensor(expected, dtype=torch.uint8)[:, None, None, None].expand(4, 3, 4, 4)
    assert torch.equal(state.x, want.float() / 255)
    assert state.x.is_contiguous(memory_format=torch.channels_last)
    # the natural forward, then one forward per round but the last (which decides nothing)
    assert state.counter.forward == 1 + (rounds - 1)


def test_da_augments_exactly_the_flagged_examples(tmp_path, smoke_suite, smoke_splits):
    trainer, state = built_trainer(tmp_path, smoke_suite, smoke_splits)
    x = state.x
    clean = clean_losses(trainer.model, x, state.y)
    da = DomDA(tau=threshold_between(clean), warmup=0.0, beta=0.5, rounds=1)
    da.bind_random_stream(0, CPU)
    da.before_attack(state)
    flagged = clean <= da.tau
    changed = (state.x != x).flatten(1).any(1)
    assert 0 < int(flagged.sum()) < len(flagged)
    assert not changed[~flagged].any()  # the others are untouched, bit for bit
    assert changed[flagged].float().mean() > 0.8  # (RandAugment may draw an identity)
    # one round: the flagged images took aug(x) outright (uint8 levels), no blend
    levels = state.x[flagged] * 255
    assert torch.equal(levels, levels.round())


@pytest.mark.parametrize("per_image", [False, True])
def test_da_randomness_comes_only_from_its_own_stream(tmp_path, smoke_suite, smoke_splits,
                                                      per_image):
    trainer, state = built_trainer(tmp_path, smoke_suite, smoke_splits)
    x, y = state.x, state.y
    da = DomDA(tau=100.0, warmup=0.0, aug="augmix", beta=0.5, rounds=2, per_image=per_image)
    da.bind_random_stream(0, CPU)
    start = da.generator.get_state()
    outputs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        da.generator.set_state(start)
        state.x, state.y = x, y
        da.before_attack(state)
        assert torch.equal(torch.get_rng_state(), before)  # the global generator restored
        outputs.append(state.x)
    assert torch.equal(outputs[0], outputs[1])  # independent of the global generator
    assert not torch.equal(da.generator.get_state(), start)  # drawn from its own stream
    state.x = x
    da.before_attack(state)  # the stream moved on: other augmentations
    assert not torch.equal(state.x, outputs[0])


def test_da_draws_operations_per_image_or_per_call(smoke_suite):
    image = torch.randint(0, 256, (1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    x = (image.expand(8, 3, 16, 16).float() / 255).contiguous()
    generator = torch.Generator().manual_seed(0)
    for per_image in (True, False):
        da = DomDA(tau=1.0, warmup=0.0, per_image=per_image)
        with seeded_global_rng(generator, CPU):
            out = da.augment(x)
        same = all(torch.equal(out[0], out[i]) for i in range(1, 8))
        assert same != per_image


def reference_rounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tau: float,
                     beta: float, rounds: int, transform: nn.Module) -> tuple[torch.Tensor, list]:
    """The reference's augmentation loop, written out: flag the low-loss images; in each
    round call the transform ONCE on the sub-batch still flagged (one draw of operations
    and magnitudes for all of them), blend, release those whose augmented loss >= tau, and
    in the last round give every flagged image aug(x). Returns the batch and the sizes of
    the sub-batches, round by round."""
    def to_uint8(t):
        return (t * 255.999).to(torch.uint8)  # torchvision's float -> uint8 conversion

    flagged = clean_losses(model, x, y) <= tau
    x = x.clone()
    sizes = []
    for n in range(1, rounds + 1):
        idx = flagged.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        sizes.append(idx.numel())
        aug = transform(to_uint8(x[idx])).float() / 255
        leave = clean_losses(model, aug, y[idx]) >= tau
        if n == rounds:
            x[idx] = aug
            break
        x[idx] = (1 - beta) * x[idx] + beta * aug
        x[idx[leave]] = aug[leave]
        flagged[idx[leave]] = False
    return x, sizes


@pytest.mark.parametrize(("aug", "seed"), [("randaugment", 6), ("augmix", 3)])
def test_da_default_transforms_each_round_s_sub_batch_with_one_draw(smoke_suite, aug, seed):
    """By default (per_image = false), as the reference: one transform call per round on
    the flagged sub-batch; the same images and seed give the reference loop's batch."""
    g = torch.Generator().manual_seed(3)
    texture = torch.rand(16, 3, 16, 16, generator=g)
    levels = torch.linspace(0.55, 1.25, 16)[:, None, None, None]
    x = ((texture * levels).clamp(0, 1) * 255).round() / 255  # mean brightness 0.3 .. 0.6
    y = torch.zeros(16, dtype=torch.long)
    model = MeanBrightness()
    da = DomDA(tau=1.0, warmup=0.0, aug=aug, beta=0.3, rounds=3)
    assert da.per_image is False
    da.bind_random_stream(seed, CPU)  # (a seed whose rounds release some images)
    stream = torch.Generator().manual_seed(0)
    stream.set_state(da.generator.get_state())
    state = hand_state(smoke_suite, model, x, y)
    da.before_attack(state)
    with seeded_global_rng(stream, CPU):
        want, sizes = reference_rounds(model, x, y, 1.0, 0.3, 3,
                                       T.AugMix() if aug == "augmix" else T.RandAugment())
    assert len(sizes) >= 2 and sizes[0] > sizes[-1] > 0  # some leave, some stay: real rounds
    torch.testing.assert_close(state.x, want, rtol=0, atol=1e-6)
    per_image = DomDA(tau=1.0, warmup=0.0, aug=aug, beta=0.3, rounds=3, per_image=True)
    per_image.bind_random_stream(seed, CPU)
    state = hand_state(smoke_suite, model, x, y)
    per_image.before_attack(state)
    assert not torch.equal(state.x, want)  # the option draws per image: another batch


class IdentityDA(DomDA):
    """DOM_DA whose 'transform' returns the images but draws from the global generator
    (as torchvision's do)."""

    def augment_uint8(self, images: torch.Tensor) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        torch.rand(7)
        return images.clone()


def test_da_never_shifts_data_attack_or_global_randomness(tmp_path, smoke_suite, smoke_splits):
    """Every image flagged and replaced by an identity 'augmentation' that consumes the
    global generator: the run equals plain AT bit for bit, random states included."""
    plain = train(tmp_path / "plain", smoke_suite, smoke_splits)
    da = IdentityDA(tau=100.0, warmup=0.0, beta=0.0, rounds=1, update_bn=False)
    train(tmp_path / "da", smoke_suite, smoke_splits, instances=[da])
    assert da.calls > 0
    assert_same_state(model_state(plain.run_dir), model_state(tmp_path / "da"))
    rng_plain = load_checkpoint(plain.run_dir / "last.pt")["rng"]
    rng_da = load_checkpoint(tmp_path / "da" / "last.pt")["rng"]
    for stream in ("data", "stream", "attack", "torch"):
        assert torch.equal(rng_plain[stream], rng_da[stream]), stream


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("name", ["dom_re", "dom_da"])
def test_warmup_never_reached_is_the_plain_method_bit_for_bit(tmp_path, smoke_suite,
                                                              smoke_splits, name):
    check_zero_strength_is_plain(tmp_path, smoke_suite, smoke_splits, "at",
                                 zero=spec(name, warmup=1.0, tau=2.3),
                                 real=spec(name, warmup=0.0, tau=2.3))


def test_re_at_tau_zero_without_bn_updates_only_observes(tmp_path, smoke_suite, smoke_splits):
    """tau = 0 keeps every example (a cross-entropy is >= 0): with update_bn = false the run
    is plain AT bit for bit plus the logged natural loss (a way to measure the loss scale)."""
    plain = train(tmp_path / "plain", smoke_suite, smoke_splits)
    observer = train(tmp_path / "observer", smoke_suite, smoke_splits,
                     defenses=[spec("dom_re", warmup=0.0, tau=0.0, update_bn=False)])
    assert_same_state(model_state(plain.run_dir), model_state(observer.run_dir))
    rows = read_history(observer.run_dir / "history.jsonl")
    assert all(r["dom_re.kept"] == 1.0 and r["dom_re.natural_loss"] > 0 for r in rows)


@pytest.mark.parametrize("defense", [
    spec("dom_re", warmup=0.0, tau=2.3),
    spec("dom_da", warmup=0.0, tau=2.3),
    spec("dom_da", warmup=0.0, tau=2.3, aug="augmix", per_image=False),
    spec("dom_da", warmup=0.0, tau=2.3, aug="augmix", per_image=True, static_shapes=True),
])
def test_resume_equals_uninterrupted(tmp_path, smoke_suite, smoke_splits, defense):
    check_resume_equals_uninterrupted(tmp_path, with_train(smoke_suite, epochs=3),
                                      smoke_splits, "at", (defense,))


@pytest.mark.parametrize("method", ["at", "fgsm_rs", "standard"])
@pytest.mark.parametrize("name", ["dom_re", "dom_da"])
def test_composes_with_at_fgsm_rs_and_standard(tmp_path, smoke_suite, smoke_splits,
                                               method, name):
    suite = with_train(smoke_suite, epochs=1)
    plain = train(tmp_path / "plain", suite, smoke_splits, method=method)
    trainer = train(tmp_path / "dom", suite, smoke_splits, method=method,
                    defenses=[spec(name, warmup=0.0, tau=2.3)])
    (row,) = read_history(trainer.run_dir / "history.jsonl")
    (plain_row,) = read_history(plain.run_dir / "history.jsonl")
    extra = row["forward_passes"] - plain_row["forward_passes"]
    batches = len(trainer.loader)
    assert (extra == batches) if name == "dom_re" else (extra >= batches)
    assert row["backward_passes"] == plain_row["backward_passes"]
    key = "dom_re.kept" if name == "dom_re" else "dom_da.flagged"
    assert 0 < row[key] < 1 and row[f"{name}.natural_loss"] > 0
    assert states_differ(model_state(plain.run_dir), model_state(trainer.run_dir))


@pytest.mark.parametrize("method", ["trades", "n_fgsm"])
def test_unpublished_methods_are_refused(smoke_suite, method):
    for name in ("dom_re", "dom_da"):
        with pytest.raises(ConfigError, match=f"does not compose with method '{method}'"):
            build_defenses((DefenseSpec(name),), method, smoke_suite)


# --------------------------------------------------------------------------- parameters


def test_published_thresholds_per_method_and_suite_overrides(smoke_suite):
    for method, tau in (("at", 1.5), ("fgsm_rs", 2.0), ("standard", 0.2)):
        for name in ("dom_re", "dom_da"):
            (d,) = build_defenses((DefenseSpec(name),), method, smoke_suite)
            assert d.tau == tau and d.warmup == 0.5
    suite = replace(smoke_suite, defense_overrides={"dom_re": {"tau": 0.7},
                                                    "dom_da": {"tau": 0.9, "aug": "augmix"}})
    (re,) = build_defenses((DefenseSpec("dom_re"),), "fgsm_rs", suite)
    assert re.tau == 0.7
    (re,) = build_defenses((spec("dom_re", tau=0.3),), "fgsm_rs", suite)
    assert re.tau == 0.3
    (da,) = build_defenses((DefenseSpec("dom_da"),), "at", suite)
    assert (da.tau, da.aug) == (0.9, "augmix")


@pytest.mark.parametrize(("method", "aug", "published"), [
    ("at", "randaugment", (0.0, 2)), ("at", "augmix", (0.5, 2)),
    ("fgsm_rs", "randaugment", (0.1, 3)), ("fgsm_rs", "augmix", (0.5, 5)),
    ("standard", "augmix", (0.5, 3)),
])
def test_da_beta_and_rounds_default_to_the_published_ones(tmp_path, smoke_suite, smoke_splits,
                                                          method, aug, published):
    _, state = built_trainer(tmp_path, smoke_suite, smoke_splits, method=method)
    (da,) = build_defenses((spec("dom_da", aug=aug),), method, smoke_suite)
    da.setup(state)
    assert (da.beta, da.rounds) == published
    assert (da.hparams["beta"], da.hparams["rounds"]) == published  # what the record shows
    (da,) = build_defenses((spec("dom_da", aug=aug, rounds=7),), method, smoke_suite)
    da.setup(state)
    assert (da.beta, da.rounds) == (published[0], 7)


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (DomRE, {"tau": -1.0}, "tau .* >= 0"),
    (DomRE, {"tau": float("nan")}, "tau .* finite"),
    (DomRE, {"tau": "1.5"}, "tau .* number"),
    (DomRE, {"warmup": 1.5}, r"warmup .* in \[0.0, 1.0\]"),
    (DomRE, {"update_bn": 1}, "update_bn must be true or false"),
    (DomDA, {"aug": "cutout"}, r"aug must be one of \['augmix', 'randaugment'\]"),
    (DomDA, {"beta": 2.0}, r"beta .* in \[0.0, 1.0\]"),
    (DomDA, {"rounds": 0}, "rounds must be an integer >= 1"),
    (DomDA, {"rounds": 1.5}, "rounds must be an integer >= 1"),
    (DomDA, {"per_image": "yes"}, "per_image must be true or false"),
])
def test_bad_parameters_are_refused(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cls(**{"tau": 1.5, "warmup": 0.5, **kwargs})


def test_unknown_parameters_are_refused(smoke_suite):
    with pytest.raises(ConfigError, match=r"no parameter\(s\) \['gamma'\].*'tau'"):
        build_defenses((spec("dom_da", gamma=2),), "at", smoke_suite)


class RecordsAutotuning(MeanBrightness):
    """MeanBrightness that notes cuDNN's autotuning flag at each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.autotuning: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.autotuning.append(torch.backends.cudnn.benchmark)
        return super().forward(x)


def test_da_sub_batches_run_without_cudnn_autotuning(smoke_suite, monkeypatch):
    """The flagged sub-batch changes size every round: cuDNN autotuning (on for CUDA
    training) would time every convolution again for each size. The whole-batch natural
    forward keeps it; the rounds run without it; it is on again afterwards."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    levels = torch.tensor([153, 77, 26, 0], dtype=torch.uint8)
    x = (levels[:, None, None, None].expand(4, 3, 4, 4).float() / 255).contiguous(
        memory_format=torch.channels_last)
    model = RecordsAutotuning()
    state = hand_state(smoke_suite, model, x, torch.zeros(4, dtype=torch.long))
    da = DomDA(tau=1.0, warmup=0.0, beta=0.5, rounds=3)
    da.bind_random_stream(0, CPU)
    da.augment_uint8 = brighten  # type: ignore[method-assign]
    da.before_attack(state)
    assert model.autotuning == [True, False, False]  # the batch, then rounds 1 and 2
    assert torch.backends.cudnn.benchmark is True
