"""The injected class feature (a catastrophic-overfitting stressor, bench/data.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench.config import ConfigError, DataConfig, parse_suite
from bench.data import ArraySplit, build_splits, class_feature_patterns, inject_class_feature

SYNTH = DataConfig("synthetic", train_size=300, val_size=100, test_size=100,
                   label_noise=0.2, split_seed=3)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_patterns_are_signs_distinct_per_class_and_nearly_orthogonal():
    patterns = class_feature_patterns(10, 3, 28, 28)
    assert patterns.shape == (10, 3, 28, 28) and patterns.dtype == torch.int16
    assert set(patterns.unique().tolist()) == {-1, 1}
    assert torch.equal(patterns[:, 0], patterns[:, 2])  # the same on every channel
    flat = patterns[:, 0].flatten(1).float()
    gram = flat @ flat.T / flat.shape[1]
    off_diagonal = gram - torch.diag(gram.diagonal())
    assert gram.diagonal().eq(1).all() and off_diagonal.abs().max() < 0.35
    # class 0 varies along the width only (u = 0, v = 1), class 1 along the height only
    assert torch.equal(patterns[0, 0, 0], patterns[0, 0, 27])
    assert torch.equal(patterns[1, 0, :, 0], patterns[1, 0, :, 27])
    assert len({tuple(p.flatten().tolist()) for p in class_feature_patterns(100, 1, 32, 32)}) == 100


def test_injection_shifts_by_whole_levels_along_the_label_pattern_and_clips():
    x = torch.tensor([0, 100, 250], dtype=torch.uint8).repeat(4, 1, 4, 1)[:, :, :, :3]
    split = ArraySplit(x=x.contiguous(), y=torch.tensor([0, 1, 2, 3]), index=torch.arange(4))
    patterns = class_feature_patterns(4, 1, 4, 3)
    out = inject_class_feature(split, 0.1, patterns)  # round(25.5) = 26 levels
    expected = (x.to(torch.int16) + 26 * patterns[split.y]).clamp(0, 255)
    assert out.x.dtype == torch.uint8 and torch.equal(out.x.to(torch.int16), expected)
    assert out.x[:, :, :, 0].max() <= 26 and out.x[:, :, :, 2].min() >= 224  # clipped
    assert torch.equal(out.y, split.y) and torch.equal(out.index, split.index)


def test_build_splits_injects_every_split_by_its_own_labels():
    plain = build_splits(SYNTH, None, curve_size=50, with_test=True)
    stressed = build_splits(replace(SYNTH, injected_feature=0.2), None, curve_size=50,
                            with_test=True)
    patterns = class_feature_patterns(10, *plain.train.x.shape[1:])
    for name in ("train", "val", "test", "train_curve", "val_curve"):
        a, b = getattr(plain, name), getattr(stressed, name)
        assert torch.equal(a.y, b.y) and torch.equal(a.index, b.index)
        assert torch.equal(inject_class_feature(a, 0.2, patterns).x, b.x), name
    # the feature predicts the label: its correlation is highest with the own class pattern
    shift = stressed.test.x.float() - plain.test.x.float()
    scores = torch.einsum("nchw,kchw->nk", shift, patterns.float())
    assert scores.argmax(1).eq(stressed.test.y).float().mean() > 0.95


def test_the_option_is_validated_and_off_by_default_without_changing_the_hash():
    text = '''
name = "i"
[data]
dataset = "synthetic"
{line}
[model]
name = "small_cnn"
[train]
epochs = 1
'''
    base = parse_suite(text.format(line=""), "i", "t")
    assert base.data.injected_feature == 0.0
    assert parse_suite(text.format(line="injected_feature = 0"), "i", "t").protocol_hash == (
        base.protocol_hash)
    on = parse_suite(text.format(line="injected_feature = 0.1"), "i", "t")
    assert on.protocol_hash != base.protocol_hash
    for bad in ("1.5", "-0.1", "true", '"0.1"'):
        with pytest.raises(ConfigError, match="injected_feature"):
            parse_suite(text.format(line=f"injected_feature = {bad}"), "i", "t")
