"""AWP's core function: the layer-wise normalised weight perturbation."""

from __future__ import annotations

import torch

from defenses.awp import AWP, layerwise_perturbation


def test_perturbation_has_relative_norm_gamma_per_layer():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(8, 4, 3, 3, generator=gen), torch.randn(10, 32, generator=gen)]
    grads = [torch.randn(8, 4, 3, 3, generator=gen) * 1e-3, torch.randn(10, 32, generator=gen)]
    v = layerwise_perturbation(weights, grads, gamma=0.01)
    for w, g, vl in zip(weights, grads, v):
        torch.testing.assert_close(vl.norm(), 0.01 * w.norm(), rtol=1e-5, atol=0)
        cosine = torch.nn.functional.cosine_similarity(vl.flatten(), g.flatten(), dim=0)
        assert cosine > 0.9999  # along the gradient (ascent)


def test_zero_gradient_layer_gets_no_perturbation():
    weights = [torch.ones(3, 3), torch.ones(2, 2)]
    grads = [torch.zeros(3, 3), torch.ones(2, 2)]
    v = layerwise_perturbation(weights, grads, gamma=0.1)
    assert torch.equal(v[0], torch.zeros(3, 3))
    assert torch.isfinite(v[1]).all() and v[1].norm() > 0


def test_gamma_zero_is_exactly_zero():
    v = layerwise_perturbation([torch.randn(4, 4)], [torch.randn(4, 4)], gamma=0.0)
    assert torch.count_nonzero(v[0]) == 0


def test_bad_parameters_are_refused():
    import pytest

    with pytest.raises(ValueError, match="gamma must be >= 0"):
        AWP(gamma=-1.0, warmup=0.0)
    with pytest.raises(ValueError, match="fraction of training"):
        AWP(gamma=0.01, warmup=5)
