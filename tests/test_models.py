"""Tests for bench/models: shapes, normalisation inside the model, errors, memory formats."""

from __future__ import annotations

import pytest
import torch

from bench.config import ConfigError, ModelConfig
from bench.data import DatasetInfo
from bench.models import build_model, list_models, model_defaults

FMNIST = DatasetInfo("fashion-mnist", 10, 1, 28, (0.286,), (0.353,))
CIFAR = DatasetInfo("cifar100", 7, 3, 32, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
SYNTH = DatasetInfo("synthetic", 10, 1, 16, (0.5,), (0.23,))
SMALL = {
    "preact_resnet18": {"width": 8},
    "wide_resnet": {"depth": 10, "widen_factor": 1},
    "small_cnn": {"width": 8, "fc": 16},
}


@pytest.fixture(autouse=True)
def _cpu_threads():
    """Overrides conftest's: these tensors are tiny, and one thread is faster and immune
    to oversubscription when other processes share the CPU."""
    torch.set_num_threads(1)


def _small(name: str, info: DatasetInfo, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name, {**SMALL[name], **extra}), info)


def test_list_models():
    assert list_models() == ["preact_resnet18", "small_cnn", "wide_resnet"]
    assert model_defaults("wide_resnet") == {"depth": 34, "widen_factor": 10, "dropout": 0.0}


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("info", [FMNIST, CIFAR, SYNTH], ids=["1x28x28", "3x32x32", "1x16x16"])
def test_output_shapes(name, info):
    model = _small(name, info)
    x = torch.rand(3, info.channels, info.size, info.size)
    assert model(x).shape == (3, info.num_classes)
    assert model.eval()(x).shape == (3, info.num_classes)


def test_preact_resnet18_at_default_width():
    model = build_model(ModelConfig("preact_resnet18"), CIFAR).eval()
    assert model.net.conv1.out_channels == 64 and model.net.linear.in_features == 512
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_wide_resnet_depth_and_width():
    model = _small("wide_resnet", CIFAR, depth=16, widen_factor=2, dropout=0.3)
    blocks = [m for m in model.modules() if type(m).__name__ == "WideBlock"]
    assert len(blocks) == 3 * 2 and model.net.fc.in_features == 128
    with pytest.raises(ConfigError, match="6n"):
        build_model(ModelConfig("wide_resnet", {"depth": 12}), CIFAR)


def test_small_cnn_options():
    model = _small("small_cnn", FMNIST, conv_layers=3, convs_per_block=2, batchnorm=False)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6 and all(c.bias is not None for c in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="do not fit"):
        build_model(ModelConfig("small_cnn", {"conv_layers": 5}), SYNTH)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_normalisation_is_a_buffer_inside_the_model(name):
    model = _small(name, CIFAR).eval()
    state = model.state_dict()
    assert state["normalize.mean"].flatten().tolist() == pytest.approx(CIFAR.mean)
    assert state["normalize.std"].flatten().tolist() == pytest.approx(CIFAR.std)
    assert "normalize.mean" in dict(model.named_buffers())
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CIFAR.mean).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net((x - mean) / std))


def test_unknown_model_and_kwargs():
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig("resnet50"), CIFAR)
    assert all(name in str(err.value) for name in list_models())
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig("wide_resnet", {"widen": 4}), CIFAR)
    message = str(err.value)
    assert "wide_resnet" in message and "widen" in message
    assert all(k in message for k in ("depth", "widen_factor", "dropout"))
    with pytest.raises(ConfigError, match="width"):
        build_model(ModelConfig("small_cnn", {"width": 8.5}), CIFAR)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_channels_last_matches_contiguous(name):
    model = _small(name, CIFAR).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        got = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bf16_autocast_and_input_gradient(name):
    model = _small(name, CIFAR)
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (4, 7) and torch.isfinite(out.float()).all()
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0
