"""Tests for bench/data.py: loading, deterministic splits and the device loader."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import data as bdata
from bench.config import ConfigError, DataConfig, ModelConfig
from bench.data import (
    ArraySplit,
    DataNotFoundError,
    DeviceLoader,
    augment_batch,
    build_splits,
    crop_flip,
    load_raw,
)

CIFAR_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
SYNTH = DataConfig("synthetic", train_size=1000, val_size=200, test_size=100,
                   label_noise=0.2, split_seed=3)


@pytest.fixture(autouse=True)
def _cpu_threads():
    """Overrides conftest's: these tensors are tiny, and one thread is faster and immune
    to oversubscription when other processes share the CPU (2 threads were 30x slower)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def synth():
    return build_splits(SYNTH, None, curve_size=100, with_test=True)


@pytest.fixture(scope="module")
def synth_raw():
    return load_raw("synthetic", None, "train")


def _splits(s):
    return {"train": s.train, "val": s.val, "test": s.test,
            "train_curve": s.train_curve, "val_curve": s.val_curve}


# --------------------------------------------------------------------------- splits


def test_synthetic_raw_shapes():
    x, y = load_raw("synthetic", None, "train")
    xt, yt = load_raw("synthetic", None, "test")
    assert x.shape == (2000, 16, 16, 1) and x.dtype == np.uint8
    assert xt.shape == (500, 16, 16, 1) and yt.dtype == np.int64
    assert np.bincount(y).tolist() == [200] * 10
    assert not np.array_equal(x[:500], xt)


def test_splits_deterministic(synth):
    again = build_splits(SYNTH, None, curve_size=100, with_test=True)
    for name, split in _splits(synth).items():
        other = _splits(again)[name]
        for field in ("x", "y", "index"):
            assert torch.equal(getattr(split, field), getattr(other, field)), (name, field)
    reseeded = build_splits(replace(SYNTH, split_seed=4), None, 100)
    assert not torch.equal(reseeded.val.index, synth.val.index)


def test_split_sizes_and_types(synth):
    assert (len(synth.train), len(synth.val), len(synth.test)) == (1000, 200, 100)
    assert (len(synth.train_curve), len(synth.val_curve)) == (100, 100)
    assert synth.train.x.shape == (1000, 1, 16, 16) and synth.train.x.dtype == torch.uint8
    assert synth.train.y.dtype == torch.int64 and synth.train.index.dtype == torch.int64
    info = synth.info
    assert (info.name, info.num_classes, info.channels, info.size) == ("synthetic", 10, 1, 16)
    full = build_splits(DataConfig("synthetic", val_size=300), None, 50, with_test=True)
    assert (len(full.train), len(full.val), len(full.test)) == (1700, 300, 500)


def test_mean_std_of_training_split(synth, synth_raw):
    x = synth_raw[0].astype(np.float64) / 255
    assert synth.info.mean[0] == pytest.approx(x.mean(), abs=1e-9)
    assert synth.info.std[0] == pytest.approx(x.std(), abs=1e-9)


def test_val_disjoint_from_train(synth, synth_raw):
    train, val = set(synth.train.index.tolist()), set(synth.val.index.tolist())
    assert len(train) == 1000 and len(val) == 200 and not train & val
    # the images really are those at the recorded positions
    x = torch.from_numpy(synth_raw[0]).permute(0, 3, 1, 2)
    assert torch.equal(synth.val.x, x[synth.val.index])
    assert torch.equal(synth.train.x, x[synth.train.index])


def test_class_balance(synth, synth_raw):
    y = synth_raw[1]
    assert np.bincount(y[synth.train.index.numpy()], minlength=10).tolist() == [100] * 10
    assert np.bincount(synth.val.y.numpy(), minlength=10).tolist() == [20] * 10
    assert np.bincount(synth.test.y.numpy(), minlength=10).tolist() == [10] * 10
    assert np.bincount(synth.val_curve.y.numpy(), minlength=10).tolist() == [10] * 10
    clean_curve = y[synth.train_curve.index.numpy()]
    assert np.bincount(clean_curve, minlength=10).tolist() == [10] * 10


def test_label_noise_only_on_train_and_always_a_different_class(synth, synth_raw):
    y = torch.from_numpy(synth_raw[1])
    flipped = synth.train.y != y[synth.train.index]
    # exactly round(0.2 * 1000) positions were drawn, and none kept its class
    assert int(flipped.sum()) == 200
    assert torch.equal(synth.val.y, y[synth.val.index])
    assert torch.equal(synth.train_curve.y, synth.train.y[:100])  # labels as trained
    assert synth.train.y.min() >= 0 and synth.train.y.max() < 10
    clean = build_splits(replace(SYNTH, label_noise=0.0), None, 100)
    assert torch.equal(clean.train.y, y[clean.train.index])
    assert torch.equal(clean.train.index, synth.train.index)


def test_validation_does_not_depend_on_train_size(synth):
    other = build_splits(replace(SYNTH, train_size=500), None, 100)
    assert torch.equal(other.val.index, synth.val.index)
    assert np.bincount(other.val.y.numpy()).tolist() == [20] * 10


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="exceeds"):
        build_splits(DataConfig("synthetic", train_size=1900, val_size=200), None, 10)
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_raw("mnist-ish", None, "train")


def test_balanced_order_handles_imbalanced_classes():
    y = np.array([0] * 50 + [1] * 5 + [2] * 20)
    order = bdata.balanced_order(y, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(75))
    assert np.bincount(y[order[:15]]).tolist() == [5, 5, 5]
    assert np.bincount(y[order[:30]]).tolist() == [13, 5, 12] or \
        np.bincount(y[order[:30]]).tolist() == [12, 5, 13]


def test_synthetic_is_learnable_by_a_tiny_cnn():
    from bench.models import build_model

    torch.manual_seed(0)
    s = build_splits(DataConfig("synthetic", val_size=200), None, 100, with_test=True)
    model = build_model(ModelConfig("small_cnn", {"width": 8, "fc": 32}), s.info)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DeviceLoader(s.train, 64, augment="none", generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        for x, y, _index in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        acc = (model.eval()(s.test.x.float() / 255).argmax(1) == s.test.y).float().mean()
    assert acc > 0.8


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not bdata.SYSTEM_FASHION_MNIST.is_dir(),
                    reason=f"Fashion-MNIST not installed in {bdata.SYSTEM_FASHION_MNIST}")
def test_fashion_mnist_from_system_location(tmp_path):
    cfg = DataConfig("fashion-mnist", train_size=500, val_size=100, test_size=200)
    s = build_splits(cfg, str(tmp_path), curve_size=100, with_test=True)
    assert (s.info.channels, s.info.size, s.info.num_classes) == (1, 28, 10)
    assert s.info.mean[0] == pytest.approx(0.2860, abs=1e-3)
    assert s.train.x.shape == (500, 1, 28, 28) and len(s.test) == 200
    assert np.bincount(s.test.y.numpy()).tolist() == [20] * 10
    xt, yt = load_raw("fashion-mnist", str(tmp_path), "test", allow_download=False)
    assert xt.shape == (10000, 28, 28, 1) and yt.shape == (10000,)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files_under_root_take_precedence(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    _write_idx(folder / "t10k-images-idx3-ubyte", images)
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.array([4, 0, 9]))
    x, y = load_raw("fashion-mnist", str(tmp_path), "test", allow_download=False)
    assert x.shape == (3, 28, 28, 1) and np.array_equal(x[..., 0], images)
    assert y.tolist() == [4, 0, 9]


@pytest.mark.skipif(not CIFAR_NPZ.is_dir(),
                    reason=f"offline CIFAR-10 copy not found at {CIFAR_NPZ}")
def test_cifar10_from_npz_shards():
    cfg = DataConfig(f"npz:{CIFAR_NPZ}", train_size=1000, val_size=200, test_size=500)
    s = build_splits(cfg, None, curve_size=200, with_test=True)
    assert (s.info.channels, s.info.size, s.info.num_classes) == (3, 32, 10)
    assert s.info.mean == pytest.approx((0.4914, 0.4822, 0.4465), abs=1e-3)
    assert s.info.std == pytest.approx((0.2470, 0.2435, 0.2616), abs=1e-3)
    assert s.train.x.shape == (1000, 3, 32, 32)
    assert np.bincount(s.val.y.numpy()).tolist() == [20] * 10
    assert np.bincount(s.test.y.numpy()).tolist() == [50] * 10
    assert int(s.train.index.max()) < 50000 and int(s.test.index.max()) < 10000


@pytest.mark.skipif(not CIFAR_NPZ.is_dir(),
                    reason=f"offline CIFAR-10 copy not found at {CIFAR_NPZ}")
def test_cifar10_reads_npz_shards_under_the_data_root():
    x, y = load_raw("cifar10", str(CIFAR_NPZ.parent), "test", allow_download=False)
    ref_x, ref_y = load_raw(f"npz:{CIFAR_NPZ}", None, "test")
    assert x.shape == (10000, 32, 32, 3) and np.array_equal(x, ref_x)
    assert np.array_equal(y, ref_y)


# --------------------------------------------------------------------------- missing data


def test_missing_fashion_mnist_lists_every_place(tmp_path, monkeypatch):
    nowhere = tmp_path / "system" / "fashion-mnist"
    monkeypatch.setattr(bdata, "SYSTEM_FASHION_MNIST", nowhere)
    root = tmp_path / "root"
    with pytest.raises(DataNotFoundError) as err:
        load_raw("fashion-mnist", str(root), "train", allow_download=False)
    message = str(err.value)
    for place in (root, root / "fashion-mnist", nowhere):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert isinstance(err.value, FileNotFoundError)


def test_missing_npz_and_torchvision_datasets(tmp_path):
    with pytest.raises(DataNotFoundError, match="Looked in") as err:
        load_raw(f"npz:{tmp_path / 'none'}", None, "train")
    assert str(tmp_path / "none") in str(err.value)
    with pytest.raises(DataNotFoundError, match="CIFAR-10 not found") as err:
        build_splits(DataConfig("cifar10"), str(tmp_path), 10, allow_download=False)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)


# --------------------------------------------------------------------------- loader


def _reference_crop_flip(x: torch.Tensor, offsets, flips, padding: int) -> torch.Tensor:
    """Straightforward per-image reference: pad, slice at the offset, then mirror."""
    n, _c, h, w = x.shape
    out = []
    for i in range(n):
        img = F.pad(x[i].float(), (padding,) * 4)
        if offsets is not None:
            oy, ox = int(offsets[i, 0]), int(offsets[i, 1])
            img = img[:, oy: oy + h, ox: ox + w]
        else:
            img = img[:, padding: padding + h, padding: padding + w]
        if flips is not None and bool(flips[i]):
            img = img.flip(2)
        out.append(img)
    return torch.stack(out).to(x.dtype)


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (16, 3, 8, 10), dtype=torch.uint8, generator=g)
    offsets = torch.randint(0, 7, (16, 2), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    for off, fl in ((offsets, flips), (offsets, None), (None, flips), (None, None)):
        assert torch.equal(crop_flip(x, off, fl, 3), _reference_crop_flip(x, off, fl, 3))


def _random_split(n: int, c: int = 3, side: int = 8, seed: int = 0) -> ArraySplit:
    g = torch.Generator().manual_seed(seed)
    return ArraySplit(
        x=torch.randint(1, 256, (n, c, side, side), dtype=torch.uint8, generator=g),
        y=torch.randint(0, 10, (n,), generator=g),
        index=torch.arange(n) + 1000,
    )


def test_loader_covers_every_example_once_per_epoch():
    split = _random_split(100)
    loader = DeviceLoader(split, 32, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 4
    for _epoch in range(2):
        seen, n_batches = [], 0
        for x, y, index in loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8)
            assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
            assert y.dtype == torch.int64 and torch.equal(y, split.y[index - 1000])
            seen.append(index)
            n_batches += 1
        assert n_batches == 4
        assert sorted(torch.cat(seen).tolist()) == list(range(1000, 1100))
    dropped = DeviceLoader(split, 32, drop_last=True, generator=torch.Generator().manual_seed(0))
    assert len(dropped) == 3 and sum(len(b[2]) for b in dropped) == 96


def test_loader_without_augmentation_is_exact():
    split = _random_split(10)
    loader = DeviceLoader(split, 4, augment="none", shuffle=False)
    x = torch.cat([b[0] for b in loader])
    assert torch.equal(x, split.x.float() / 255)


def test_loader_crops_are_shifted_copies_of_the_padded_image():
    split, padding = _random_split(40), 2
    loader = DeviceLoader(split, 16, padding=padding, generator=torch.Generator().manual_seed(5))
    offsets_seen, flipped = set(), set()
    for x, _y, index in loader:
        for img, i in zip(x, index - 1000, strict=True):
            matches = []
            for oy in range(2 * padding + 1):
                for ox in range(2 * padding + 1):
                    for fl in (False, True):
                        ref = _reference_crop_flip(
                            split.x[i: i + 1], torch.tensor([[oy, ox]]), torch.tensor([fl]),
                            padding)[0].float() / 255
                        if torch.equal(img, ref):
                            matches.append((oy, ox, fl))
            assert matches, f"image {int(i)} is not a crop of its padded original"
            offsets_seen.add(matches[0][:2])
            flipped.add(matches[0][2])
    assert len(offsets_seen) > 10 and flipped == {False, True}


def test_augment_batch_follows_its_generator():
    x = _random_split(20).x
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    out = augment_batch(x, "crop_flip", 4, g, channels_last=True)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    g.set_state(state)
    offsets = torch.randint(0, 9, (20, 2), generator=g)
    flips = torch.rand(20, generator=g) < 0.5
    expected = _reference_crop_flip(x, offsets, flips, 4).float() / 255
    assert torch.equal(out, expected)
    assert torch.equal(augment_batch(x, "none", 4, g), x.float() / 255)


def test_loader_flip_only():
    split = _random_split(64)
    loader = DeviceLoader(split, 64, augment="flip", generator=torch.Generator().manual_seed(2))
    x, _y, index = next(iter(loader))
    orig = split.x[index - 1000].float() / 255
    same = (x == orig).flatten(1).all(1)
    mirrored = (x == orig.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 10 < int(mirrored.sum()) < 54


def test_loader_is_reproducible_and_resumable():
    split = _random_split(50)

    def epoch(loader):
        return [tuple(t.clone() for t in batch) for batch in loader]

    a = DeviceLoader(split, 16, generator=torch.Generator().manual_seed(7))
    b = DeviceLoader(split, 16, generator=torch.Generator().manual_seed(7))
    c = DeviceLoader(split, 16, generator=torch.Generator().manual_seed(8))
    first_a, first_b = epoch(a), epoch(b)
    for ba, bb in zip(first_a, first_b, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(ba, bb, strict=True))
    assert not torch.equal(epoch(c)[0][2], first_a[0][2])
    state = a.generator.get_state()
    second = epoch(a)
    a.generator.set_state(state)
    again = epoch(a)
    for ba, bb in zip(second, again, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(ba, bb, strict=True))


def test_loader_channels_last_and_bad_arguments():
    split = _random_split(8)
    loader = DeviceLoader(split, 8, channels_last=True, generator=torch.Generator())
    x = next(iter(loader))[0]
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert not next(iter(DeviceLoader(split, 8)))[0].is_contiguous(
        memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match="augment"):
        DeviceLoader(split, 8, augment="cutout")
    assert len(DeviceLoader(split, 3)) == math.ceil(8 / 3)


def test_training_splits_never_load_the_test_split(monkeypatch):
    """Without `with_test` (every training process) the test split is not even read."""
    import bench.data as data

    seen = []
    real = data.load_raw

    def spy(dataset, root, split, **kw):
        seen.append(split)
        return real(dataset, root, split, **kw)

    monkeypatch.setattr(data, "load_raw", spy)
    s = build_splits(SYNTH, None, curve_size=100)
    assert s.test is None and seen == ["train"]
    with_test = build_splits(SYNTH, None, curve_size=100, with_test=True)
    assert seen == ["train", "train", "test"] and len(with_test.test) == len(synth_test())
    for name in ("train", "val", "train_curve", "val_curve"):
        assert torch.equal(getattr(s, name).x, getattr(with_test, name).x)


def synth_test():
    return build_splits(SYNTH, None, curve_size=100, with_test=True).test
