"""The batched rewrites in bench/state.py and the curve inputs, each against the
per-tensor code they replaced (written out here): BatchNorm statistics restored bit for
bit, shifted weights the same values, the epoch log means the same floats, and the
curves the same numbers with channels_last inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_prototype_data
from torch import nn

from bench.config import RunSpec
from bench.curves import curve_point, derive_seed, to_float
from bench.data import ArraySplit, DatasetInfo, Splits
from bench.engine import Trainer
from bench.state import TrainState, bn_buffers, preserved_bn_stats, shifted_weights


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Conv2d(5, 7, 3), nn.BatchNorm2d(7), nn.Flatten(),
                          nn.Linear(7 * 4 * 4, 4), nn.BatchNorm1d(4))
    with torch.no_grad():  # running statistics that are not the defaults
        for i, buf in enumerate(bn_buffers(model)):
            buf.copy_(torch.rand(buf.shape) * 3 if buf.is_floating_point() else 5 + i)
    return model.to(memory_format=torch.channels_last)


def test_batchnorm_statistics_are_restored_bit_for_bit():
    model = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert len(bn_buffers(model)) == 9  # running mean, variance, count of three layers
    with preserved_bn_stats(model):
        model.train()
        for _ in range(3):
            model(torch.randn(6, 3, 8, 8))
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert len(changed) == 9  # the forwards did move every statistic
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
        assert value.dtype == before[key].dtype


def test_batchnorm_statistics_are_restored_on_an_exception():
    model = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"), preserved_bn_stats(model):
        model.train()(torch.randn(6, 3, 8, 8))
        raise RuntimeError("inside")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_shifted_weights_equal_the_per_tensor_loop():
    torch.manual_seed(1)
    params = [torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last),
              torch.randn(10, 7), torch.randn(5)]
    shifts = [torch.randn_like(p) * 1e-3 for p in params]
    reference = [p.clone() for p in params]
    inside = [p + v for p, v in zip(reference, shifts)]  # p.add_(v), then p.sub_(v)
    after = [q - v for q, v in zip(inside, shifts)]
    with shifted_weights(params, shifts):
        for p, q in zip(params, inside):
            assert torch.equal(p, q)
    for p, q in zip(params, after):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="3 parameters but 2 shifts"), \
            shifted_weights(params, shifts[:2]):
        pass


def _old_pop_logs(logs: dict) -> dict:
    """The per-value version: every logged value copied to the host on its own."""
    return {key: float(torch.stack([torch.as_tensor(v, dtype=torch.float32).cpu()
                                    for v in values]).mean())
            for key, values in logs.items() if values}


def test_pop_logs_gives_the_per_value_means():
    gen = torch.Generator().manual_seed(3)
    logs = {
        "floats": [0.1, 0.2, 1 / 3],
        "tensors": [torch.rand((), generator=gen) for _ in range(37)],
        "mixed": [0.5, torch.tensor(0.25), torch.tensor(1 / 7, dtype=torch.float64), 2],
        "bf16": [torch.rand((), generator=gen).to(torch.bfloat16) for _ in range(5)],
        "one_element": [torch.rand(1, generator=gen) for _ in range(4)],
        "empty": [],
    }
    state = TrainState(suite=None, spec=None, device=torch.device("cpu"), model=None,
                       optimizer=None, epochs=1, batches_per_epoch=1, autocast_dtype=None,
                       channels_last=False)
    for key, values in logs.items():
        for v in values:
            state.log(key, v)
    expected = _old_pop_logs(logs)
    got = state.pop_logs()
    assert got == expected and set(got) == set(logs) - {"empty"}
    assert state.logs == {} and state.pop_logs() == {}


def _rgb_splits() -> Splits:
    """Three-channel images (with one channel, NCHW and channels_last are the same layout)."""
    gen = torch.Generator().manual_seed(7)
    x, y = make_prototype_data(96, gen)
    split = ArraySplit(x=(x * 255).round().to(torch.uint8), y=y, index=torch.arange(96))
    info = DatasetInfo("prototypes", 10, 3, 16, (0.5,) * 3, (0.25,) * 3)
    return Splits(info, split, split, None, split, split)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_curves_are_the_same_with_channels_last_inputs(smoke_suite, tmp_path, autocast):
    splits = _rgb_splits()
    trainer = Trainer(RunSpec(smoke_suite.name, "at", (), 0), smoke_suite, splits,
                      tmp_path, device=torch.device("cpu"), progress=False,
                      mixed_precision=autocast is not None, channels_last=True)
    state = trainer.build()
    for _, (x, y, index) in zip(range(3), trainer.loader):  # weights that are not the init
        trainer.train_step(state, x, y, index)
    x_nchw = to_float(splits.val_curve.x, False)
    for x_cl, _ in (trainer.val_curve, trainer.train_curve):  # as the model runs
        assert x_cl.is_contiguous(memory_format=torch.channels_last)
        assert not x_cl.is_contiguous() and torch.equal(x_nchw, x_cl)
    x_cl, y = trainer.val_curve
    model = trainer._curve_copy()
    seed = derive_seed(0, "curves")
    before = curve_point(model, x_nchw, y, smoke_suite, seed, autocast, fgsm=True)
    after = curve_point(model, x_cl, y, smoke_suite, seed, autocast, fgsm=True)
    assert after == before
    assert 0 < before.clean < 1  # a curve that could have moved
