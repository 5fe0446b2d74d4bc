"""`[train] cyclic_momentum`: the SGD momentum cycles against the cyclic lr, as torch's
CyclicLR does with cycle_momentum (the schedule of LAP's released training script).
Checked against torch's own CyclicLR and against hand-computed values, through the
engine's real training step, and in the suite files and the protocol hash."""

from __future__ import annotations

import pytest
import torch
from conftest import with_train

from bench.config import ConfigError, RunSpec, load_suite, parse_suite
from bench.engine import Trainer, learning_rate, momentum_at

CYCLIC = {"schedule": "cyclic", "lr": 0.2, "momentum": 0.9, "cyclic_momentum": (0.8, 0.9)}


@pytest.mark.parametrize("peak", [0.5, 0.4])
def test_momentum_and_lr_match_torch_cyclic_lr_at_every_iteration(smoke_suite, peak):
    epochs, per_epoch = 3, 7
    suite = with_train(smoke_suite, epochs=epochs, cyclic_peak=peak, **CYCLIC)
    total = epochs * per_epoch
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.2, momentum=0.9)
    reference = torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=0.0, max_lr=0.2, step_size_up=peak * total,
        step_size_down=(1 - peak) * total, cycle_momentum=True, base_momentum=0.8,
        max_momentum=0.9)
    seen = []
    for i in range(total):
        group = opt.param_groups[0]
        assert momentum_at(suite, i / per_epoch) == pytest.approx(group["momentum"], abs=1e-12)
        assert learning_rate(suite, i / per_epoch) == pytest.approx(group["lr"], abs=1e-12)
        seen.append(group["momentum"])
        param.grad = torch.ones(2)
        opt.step()
        reference.step()
    assert seen[0] == pytest.approx(0.9) and min(seen) == pytest.approx(0.8, abs=0.01)


def test_hand_computed_values_and_constant_without_the_option(smoke_suite):
    suite = with_train(smoke_suite, epochs=30, cyclic_peak=0.5, **CYCLIC)
    # epoch 0: lr 0, momentum 0.9; epoch 7.5: lr 0.1, momentum 0.85; epoch 15: lr 0.2,
    # momentum 0.8; epoch 22.5: back to 0.85; epoch 30: 0.9
    for epoch, momentum in [(0, 0.9), (7.5, 0.85), (15, 0.8), (22.5, 0.85), (30, 0.9)]:
        assert momentum_at(suite, epoch) == pytest.approx(momentum, abs=1e-12)
    plain = with_train(smoke_suite, epochs=30, schedule="cyclic", lr=0.2, momentum=0.9)
    assert {momentum_at(plain, e) for e in (0, 7.5, 15, 22.5)} == {0.9}


@pytest.mark.parametrize("cyclic", [True, False])
def test_engine_sets_the_momentum_of_each_iteration(tmp_path, smoke_suite, smoke_splits,
                                                    cyclic):
    """Through the real training step: the momentum the optimizer steps with at iteration
    i is 0.9 - 0.1 * s(i), s the lr's fraction of its peak (hand formula)."""
    changes = CYCLIC if cyclic else {k: v for k, v in CYCLIC.items() if k != "cyclic_momentum"}
    suite = with_train(smoke_suite, epochs=2, cyclic_peak=0.5, **changes)
    trainer = Trainer(RunSpec(suite.name, "fgsm_rs", (), 0), suite, smoke_splits, tmp_path,
                      device=torch.device("cpu"), progress=False)
    state = trainer.build()
    used = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        used.append((trainer.optimizer.param_groups[0]["lr"],
                     trainer.optimizer.param_groups[0]["momentum"]))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    per_epoch = len(trainer.loader)
    for _ in range(2):
        for x, y, index in trainer.loader:
            trainer.train_step(state, x, y, index)
            state.step += 1
        state.epoch += 1
    total = 2 * per_epoch
    assert len(used) == total
    for i, (lr, momentum) in enumerate(used):
        s = 2 * i / total if i < total / 2 else 2 * (total - i) / total
        assert lr == pytest.approx(0.2 * s, abs=1e-12)
        assert momentum == pytest.approx(0.9 - 0.1 * s if cyclic else 0.9, abs=1e-12)


def test_the_single_step_gpu_suites_cycle_momentum_and_the_option_is_hashed():
    for name in ("cifar10-fast", "cifar10-fast-16"):
        suite = load_suite(name)
        assert suite.train.cyclic_momentum == (0.8, 0.9) and suite.train.momentum == 0.9
        assert suite.train.schedule == "cyclic"
    text = ('name = "h"\nseeds = [0]\n[data]\ndataset = "synthetic"\n[model]\n'
            'name = "small_cnn"\n[train]\nepochs = 2\nschedule = "cyclic"\n{extra}\n')
    base = parse_suite(text.format(extra=""), "h", "t")
    cycled = parse_suite(text.format(extra="cyclic_momentum = [0.8, 0.9]"), "h", "t")
    assert cycled.protocol_hash != base.protocol_hash  # part of the protocol
    assert parse_suite(text.format(extra="cyclic_momentum = []"), "h", "t").protocol_hash \
        == base.protocol_hash  # the default leaves the hash of existing suites alone


@pytest.mark.parametrize(("extra", "match"), [
    ("cyclic_momentum = [0.9, 0.8]", r"must be \[base, max\] with 0 <= base <= max < 1"),
    ("cyclic_momentum = [0.8]", r"must be \[base, max\]"),
    ("cyclic_momentum = 0.8", r"must be \[base, max\]"),
    ("cyclic_momentum = [0.8, 1.0]", r"must be \[base, max\]"),
    ('cyclic_momentum = [0.8, "x"]', r"must be \[base, max\]"),
    ('cyclic_momentum = [0.8, 0.9]\nschedule = "piecewise"', 'needs schedule = "cyclic"'),
    ("cyclic_momentum = [0.8, 0.95]", r"momentum \(0.9\) must equal the max"),
])
def test_bad_cyclic_momentum_is_refused(extra, match):
    text = ('name = "h"\nseeds = [0]\n[data]\ndataset = "synthetic"\n[model]\n'
            f'name = "small_cnn"\n[train]\nepochs = 2\n{extra}\n')
    if "schedule" not in extra:
        text += 'schedule = "cyclic"\n'
    with pytest.raises(ConfigError, match=match):
        parse_suite(text, "h", "t")
