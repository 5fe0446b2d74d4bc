"""Stochastic weight averaging (defenses/_swa.py) against hand re-derivations of the
reference's rule: the first update copies the model (parameters and buffers), later ones
average the parameters only (exponential with a decay, or the equal mean), and the
BatchNorm statistics are re-estimated as size-weighted means of batch statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ConfigError
from defenses._swa import WeightAverage, check_settings, recompute_batchnorm


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))


def random_states(model: nn.Module, k: int) -> list[dict[str, torch.Tensor]]:
    """k made-up trained states (parameters and BN buffers all different)."""
    g = torch.Generator().manual_seed(1)
    states = []
    for _ in range(k):
        sd = {}
        for key, v in model.state_dict().items():
            sd[key] = (v + torch.randint(1, 5, ()) if v.dtype == torch.long
                       else torch.randn(v.shape, generator=g))
        states.append(sd)
    return states


PARAMS = ("0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias")
BUFFERS = ("1.running_mean", "1.running_var", "1.num_batches_tracked")


@pytest.mark.parametrize("decay", [0.25, None])
def test_average_follows_the_reference_rule(decay):
    model = tiny()
    states = random_states(model, 4)
    averaged = WeightAverage(model, decay)
    for sd in states:
        model.load_state_dict(sd)
        averaged.update(model)
    got = averaged.average.state_dict()
    for key in PARAMS:
        if decay is None:  # the plain mean of the weights seen
            want = sum(sd[key] for sd in states) / len(states)
        else:  # first update copies, then (1 - a) avg + a w
            want = states[0][key]
            for sd in states[1:]:
                want = (1 - decay) * want + decay * sd[key]
        torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-6)
    for key in BUFFERS:  # copied at the first update, never averaged
        assert torch.equal(got[key], states[0][key]), key
    assert averaged.count == 4 and not averaged.average.training
    assert all(not p.requires_grad for p in averaged.average.parameters())


def test_average_count_survives_a_state_dict_round_trip():
    model = tiny()
    a = WeightAverage(model, 0.5)
    a.update(model)
    a.update(model)
    b = WeightAverage(model, 0.5)
    b.load_state_dict(a.state_dict())
    assert b.count == 2


def test_batchnorm_statistics_are_size_weighted_means_of_batch_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0].weight.data.uniform_(0.5, 2)
    model[0].bias.data.uniform_(-1, 1)
    for bn in (model[0], model[2]):  # stale statistics that must not leak in
        bn.running_mean.fill_(7.0)
        bn.running_var.fill_(9.0)
    g = torch.Generator().manual_seed(2)
    batches = [torch.rand(n, 3, 6, 6, generator=g) * 3 + 1 for n in (5, 3, 8)]
    assert recompute_batchnorm(model, batches) == 3
    sizes = torch.tensor([5.0, 3.0, 8.0])

    def weighted(values: list[torch.Tensor]) -> torch.Tensor:
        return sum(s * v for s, v in zip(sizes, values)) / sizes.sum()

    def stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = t.transpose(0, 1).reshape(t.shape[1], -1)
        return flat.mean(1), flat.var(1, unbiased=True)

    first, second = [], []
    for x in batches:
        mean, var = stats(x)
        first.append((mean, var))
        biased = x.transpose(0, 1).reshape(3, -1).var(1, unbiased=False)
        normed = ((x - mean[None, :, None, None]) / torch.sqrt(biased + 1e-5)[None, :, None, None]
                  * model[0].weight[None, :, None, None] + model[0].bias[None, :, None, None])
        second.append(stats(F.conv2d(normed, model[1].weight, model[1].bias)))
    for bn, seen in ((model[0], first), (model[2], second)):
        torch.testing.assert_close(bn.running_mean, weighted([m for m, _ in seen]),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, weighted([v for _, v in seen]),
                                   rtol=1e-5, atol=1e-5)
        assert bn.momentum == 0.1  # restored
    assert not model.training


def test_recompute_without_batchnorm_does_nothing():
    model = nn.Linear(2, 2)
    assert recompute_batchnorm(model, [torch.zeros(1, 2)]) == 0


@pytest.mark.parametrize(("args", "message"), [
    ((1.0, 0.001, 1), r"start must be a fraction of training in \[0, 1\)"),
    ((-0.1, 0.001, 1), r"start must be"),
    ((0.0, 0.0, 1), r"decay must be a number in \(0, 1\] .* or 'equal'"),
    ((0.0, "n", 1), r"decay must be"),
    ((0.0, True, 1), r"decay must be"),
    ((0.0, 0.001, 0), r"every must be an integer >= 1"),
    ((0.0, 0.001, 1.5), r"every must be an integer >= 1"),
])
def test_bad_settings_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        check_settings("owner", *args)
    assert check_settings("owner", 0.5, "equal", 3) == (0.5, None, 3)
