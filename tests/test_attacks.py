"""Tests for attacks/pgd.py: PGD, FGSM-RS, N-FGSM, the losses and the accuracy helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fit_briefly, make_prototype_data
from torch import nn

from attacks import attack_loss, clean_accuracy, cw_margin, fgsm_rs, n_fgsm, pgd, robust_accuracy

EPS = 8 / 255
STEP = 2 / 255


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained for a few seconds; returns (model in eval mode, x_test, y_test)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = make_prototype_data(4000, g)
    x_test, y_test = make_prototype_data(1000, g)
    model = small_cnn()
    fit_briefly(model, x_train, y_train, g)
    model.eval()
    return model, x_test, y_test


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return clean_accuracy(model, x, y)


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_in_ball_and_box(trained, loss, random_start):
    model, x, y = trained
    x, y = x[:128], y[:128]
    x_adv = pgd(
        model,
        x,
        y,
        eps=EPS,
        step_size=STEP,
        steps=5,
        loss=loss,
        random_start=random_start,
        generator=_gen(),
    )
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert (x_adv != x).any()


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_pgd_lowers_accuracy(trained, loss):
    model, x, y = trained
    x, y = x[:500], y[:500]
    clean = _acc(model, x, y)
    assert clean > 0.8
    adv = _acc(
        model, pgd(model, x, y, eps=EPS, step_size=STEP, steps=10, loss=loss, generator=_gen()), y
    )
    assert adv < clean - 0.2


def test_more_steps_do_not_raise_accuracy(trained):
    model, x, y = trained
    x, y = x[:500], y[:500]
    accs = [
        robust_accuracy(model, x, y, eps=EPS, step_size=EPS / 4, steps=k, generator=_gen())
        for k in (0, 1, 5, 20)
    ]
    assert accs[0] == pytest.approx(_acc(model, x, y))
    for fewer, more in zip(accs, accs[1:]):
        assert more <= fewer + 0.01, accs


def test_fgsm_rs_stays_in_ball(trained):
    model, x, y = trained
    x, y = x[:256], y[:256]
    x_adv = fgsm_rs(model, x, y, eps=EPS, step_size=1.25 * EPS, generator=_gen())
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert _acc(model, x_adv, y) < _acc(model, x, y)


def test_n_fgsm_exceeds_eps_but_stays_in_box(trained):
    model, x, y = trained
    x, y = x[:256], y[:256]
    x_adv = n_fgsm(model, x, y, eps=EPS, generator=_gen())
    pert = (x_adv - x).abs().max().item()
    assert EPS + 1e-4 < pert <= 3 * EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert _acc(model, x_adv, y) < _acc(model, x, y)
    # explicit noise magnitude and step size bound the perturbation by their sum
    x_adv = n_fgsm(model, x, y, eps=EPS, noise_mag=EPS, step_size=EPS / 2, generator=_gen())
    assert (x_adv - x).abs().max().item() <= 1.5 * EPS + 1e-6


def test_no_weight_gradients_and_mode_untouched(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    bn_model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 10)
    )
    attacks = (
        lambda m: pgd(m, x, y, eps=EPS, step_size=STEP, steps=3, loss="kl"),
        lambda m: pgd(m, x, y, eps=EPS, step_size=STEP, steps=3, loss="cw"),
        lambda m: fgsm_rs(m, x, y, eps=EPS, step_size=1.25 * EPS),
        lambda m: n_fgsm(m, x, y, eps=EPS),
    )
    for m, train in ((model, False), (bn_model, True), (bn_model, False)):
        m.train(train)
        for attack in attacks:
            attack(m)
            assert all(p.grad is None for p in m.parameters())
            assert all(mod.training == train for mod in m.modules())
    model.eval()


def test_works_under_no_grad(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    with torch.no_grad():
        x_adv = pgd(model, x, y, eps=EPS, step_size=STEP, steps=3, generator=_gen())
    assert _acc(model, x_adv, y) < _acc(model, x, y)


def test_reproducible_with_generator(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    for loss in ("ce", "kl"):
        a = pgd(model, x, y, eps=EPS, step_size=STEP, steps=2, loss=loss, generator=_gen(7))
        b = pgd(model, x, y, eps=EPS, step_size=STEP, steps=2, loss=loss, generator=_gen(7))
        c = pgd(model, x, y, eps=EPS, step_size=STEP, steps=2, loss=loss, generator=_gen(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(
        n_fgsm(model, x, y, eps=EPS, generator=_gen(3)),
        n_fgsm(model, x, y, eps=EPS, generator=_gen(3)),
    )
    # the global RNG is not consumed when a generator is given
    state = torch.get_rng_state()
    pgd(model, x, y, eps=EPS, step_size=STEP, steps=1, generator=_gen())
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_bfloat16_autocast(trained, loss):
    model, x, y = trained
    x, y = x[:256], y[:256]
    x_adv = pgd(
        model,
        x,
        y,
        eps=EPS,
        step_size=STEP,
        steps=5,
        loss=loss,
        generator=_gen(),
        autocast_dtype=torch.bfloat16,
    )
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert _acc(model, x_adv, y) < _acc(model, x, y) - 0.2
    for attack in (fgsm_rs, n_fgsm):
        kwargs = {"step_size": 1.25 * EPS} if attack is fgsm_rs else {}
        out = attack(
            model, x, y, eps=EPS, generator=_gen(), autocast_dtype=torch.bfloat16, **kwargs
        )
        assert out.dtype == torch.float32


def test_counter(trained):
    model, x, y = trained
    x, y = x[:32], y[:32]
    counter: dict = {}
    pgd(model, x, y, eps=EPS, step_size=STEP, steps=7, counter=counter)
    assert counter == {"fwd": 7, "bwd": 7}
    counter = {}
    pgd(model, x, y, eps=EPS, step_size=STEP, steps=4, loss="kl", counter=counter)
    assert counter == {"fwd": 5, "bwd": 4}  # + the clean forward for p(x)
    counter = {}
    pgd(
        model,
        x,
        y,
        eps=EPS,
        step_size=STEP,
        steps=4,
        loss="kl",
        counter=counter,
        clean_logits=model(x),
    )
    assert counter == {"fwd": 4, "bwd": 4}
    counter = {"fwd": 1, "bwd": 1}
    fgsm_rs(model, x, y, eps=EPS, step_size=EPS, counter=counter)
    n_fgsm(model, x, y, eps=EPS, counter=counter)
    assert counter == {"fwd": 3, "bwd": 3}


def test_losses():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, -1.0]])
    y = torch.tensor([0, 2])
    assert torch.allclose(cw_margin(logits, y), torch.tensor([-1.0, 4.0]))
    assert attack_loss("cw", logits, y).item() == pytest.approx(3.0)
    assert attack_loss("ce", logits, y).item() == pytest.approx(
        F.cross_entropy(logits, y, reduction="sum").item()
    )
    p = logits.softmax(1)
    assert attack_loss("kl", logits, y, p).item() == pytest.approx(0.0, abs=1e-6)
    q = torch.full_like(p, 1 / 3)
    expected = (q * (q.log() - p.log())).sum().item()
    assert attack_loss("kl", logits, y, q).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        attack_loss("hinge", logits, y)


def test_invalid_loss_raises(trained):
    model, x, y = trained
    with pytest.raises(ValueError):
        pgd(model, x[:4], y[:4], eps=EPS, step_size=STEP, steps=1, loss="dlr")


def test_accuracy_helpers_batching(trained):
    model, x, y = trained
    x, y = x[:300], y[:300]
    expected = (model(x).argmax(1) == y).float().mean().item()
    assert clean_accuracy(model, x, y, batch_size=64) == pytest.approx(expected)
    assert robust_accuracy(model, x, y, eps=EPS, step_size=STEP, steps=0) == pytest.approx(expected)
    a = robust_accuracy(
        model,
        x,
        y,
        eps=EPS,
        step_size=STEP,
        steps=3,
        batch_size=100,
        generator=_gen(),
        progress="pgd-3",
    )
    assert 0.0 <= a < expected


def test_cross_check_with_torchattacks(trained):
    """Same model, same 1000 images: our PGD matches torchattacks' PGD."""
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = trained
    eps, alpha, steps = EPS, EPS / 4, 10
    # Zero start: both are deterministic and must agree (up to rare float ties).
    ours = pgd(model, x, y, eps=eps, step_size=alpha, steps=steps, random_start=False)
    theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert (ours - theirs).abs().gt(1e-5).float().mean().item() < 0.01
    assert abs(_acc(model, ours, y) - _acc(model, theirs, y)) <= 0.002
    # Random start: robust accuracies within 1 point.
    torch.manual_seed(0)
    theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
    ours_acc = robust_accuracy(model, x, y, eps=eps, step_size=alpha, steps=steps, generator=_gen())
    theirs_acc = _acc(model, theirs, y)
    clean = _acc(model, x, y)
    print(f"clean {clean:.3f}  PGD-{steps} ours {ours_acc:.3f}  torchattacks {theirs_acc:.3f}")
    assert 0.1 < ours_acc < clean - 0.2  # a meaningful operating point
    assert abs(ours_acc - theirs_acc) <= 0.01
