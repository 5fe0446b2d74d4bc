"""Datasets, deterministic splits and the device-resident loader.

Every dataset is loaded as uint8 images (N x H x W x C) and integer labels, split
deterministically (validation carved from the training set, optional class-balanced
subsets, symmetric label noise on the training part only, an optional injected class
feature on every split) and kept as uint8 tensors.
`DeviceLoader` holds a split on the device and yields augmented float batches in [0, 1];
normalisation happens inside the model (see PROTOCOL.md).
"""

from __future__ import annotations

import gzip
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.config import ConfigError, DataConfig

DATASETS = ("cifar10", "cifar100", "svhn", "fashion-mnist", "npz:<dir>", "synthetic")
AUGMENTATIONS = ("crop_flip", "flip", "none")
#: Debian's `dataset-fashion-mnist` package installs the IDX files here.
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "fashion-mnist": 10, "synthetic": 10}


class DataNotFoundError(FileNotFoundError):
    """A dataset is missing; the message says where we looked and how to get it."""


@dataclass
class ArraySplit:
    """One split held as tensors."""

    x: torch.Tensor  # uint8, N x C x H x W
    y: torch.Tensor  # int64, N
    index: torch.Tensor  # int64, N: position in the original split of the dataset

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: torch.Tensor | np.ndarray | slice) -> ArraySplit:
        """The examples at `idx` (a slice, or integer positions into this split)."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx)
        return ArraySplit(self.x[idx], self.y[idx], self.index[idx])

    def to(self, device: str | torch.device) -> ArraySplit:
        return ArraySplit(self.x.to(device), self.y.to(device), self.index.to(device))


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    channels: int
    size: int  # image side
    mean: tuple[float, ...]  # per channel, [0, 1] scale, of the whole training split
    std: tuple[float, ...]


@dataclass
class Splits:
    info: DatasetInfo
    train: ArraySplit  # training examples minus validation (after subset and label noise)
    val: ArraySplit  # held-out validation, clean labels, class-balanced order
    # evaluation subset of the test split: only when asked for (`with_test=True`, the
    # evaluator); training processes never load it
    test: ArraySplit | None
    train_curve: ArraySplit  # fixed subset of `train` (noisy labels as trained)
    val_curve: ArraySplit  # first curve_size examples of `val`


def default_data_root() -> str:
    """`$ROBENCH_DATA`, or `~/.cache/robench/data`."""
    return os.environ.get("ROBENCH_DATA") or str(Path("~/.cache/robench/data").expanduser())


# --------------------------------------------------------------------------- loading


def load_raw(
    dataset: str, root: str | None, split: str, *, allow_download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of a dataset: uint8 images N x H x W x C and int64 labels.

    `dataset` is cifar10 | cifar100 | svhn (torchvision) | fashion-mnist (IDX files) |
    npz:<dir> (`train_*.npz` and `test.npz` holding `x` uint8 NHWC and `y`) | synthetic.
    cifar10/cifar100/svhn read such shards from `<root>/<dataset>/` when they are there.
    `split` is "train" or "test". torchvision downloads only when the files are missing,
    `allow_download` is true and `$ROBENCH_OFFLINE` is unset. A missing dataset raises
    `DataNotFoundError`; nothing ever falls back to other data.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    allow_download = allow_download and not os.environ.get("ROBENCH_OFFLINE")
    root_path = Path(root if root is not None else default_data_root()).expanduser()
    if dataset.startswith("npz:"):
        x, y = _load_npz(Path(dataset[4:]).expanduser(), split)
    elif dataset == "synthetic":
        x, y = _synthetic(split)
    elif dataset == "fashion-mnist":
        x, y = _load_fashion_mnist(root_path, split, allow_download)
    elif dataset in ("cifar10", "cifar100", "svhn"):
        shards = root_path / dataset
        if (shards / "test.npz").is_file() and any(shards.glob("train_*.npz")):
            x, y = _load_npz(shards, split)  # a folder of .npz shards under the data root
        else:
            x, y = _load_torchvision(dataset, root_path, split, allow_download)
    else:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets are {list(DATASETS)}")
    if x.ndim == 3:
        x = x[..., None]
    if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y):
        raise ValueError(
            f"{dataset} {split}: expected uint8 N x H x W x C images and N labels, got "
            f"{x.dtype} {x.shape} and {len(y)} labels"
        )
    x = np.ascontiguousarray(x)
    return (x if x.flags.writeable else x.copy()), np.asarray(y, dtype=np.int64)


def _load_npz(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split == "test":
        files = [folder / "test.npz"] if (folder / "test.npz").is_file() else []
    else:
        shards = folder.glob("train_*.npz") if folder.is_dir() else []
        files = sorted(shards, key=lambda p: [int(t) if t.isdigit() else t
                                               for t in re.split(r"(\d+)", p.name)])
        if not files and (folder / "train.npz").is_file():
            files = [folder / "train.npz"]
    if not files:
        want = "test.npz" if split == "test" else "train_*.npz"
        raise DataNotFoundError(
            f"npz dataset not found. Looked in: {folder} for {want}. Put `train_*.npz` and "
            f"`test.npz` (arrays x uint8 N x H x W x C and y) in that folder."
        )
    xs, ys = [], []
    for path in files:
        with np.load(path) as f:
            xs.append(f["x"])
            ys.append(f["y"])
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = bytearray(f.read())  # writable, so torch can wrap the array without a copy
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: expected {math.prod(dims)} bytes of data, found {data.size}")
    return data.reshape(dims)


def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion_mnist(root: Path, split: str, allow_download: bool):
    places = [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", SYSTEM_FASHION_MNIST]
    for folder in places:
        found = [_find_idx(folder, name) for name in _FMNIST_FILES[split]]
        if all(found):
            return _read_idx(found[0]), _read_idx(found[1])
    note = "download not allowed"
    if allow_download:
        try:
            from torchvision.datasets import FashionMNIST

            ds = FashionMNIST(str(root), train=split == "train", download=True)
            return ds.data.numpy(), ds.targets.numpy()
        except Exception as exc:  # any failure means "not available"
            note = f"torchvision download into {root} failed: {exc}"
    raise DataNotFoundError(
        f"Fashion-MNIST not found. Looked in: {', '.join(map(str, places))} ({note}). "
        f"Get it with `apt-get install dataset-fashion-mnist`, or put the four IDX files "
        f"(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte; gzipped or not) in {root}, or run with network so "
        f"torchvision can download it."
    )


_TORCHVISION = {  # name -> (class name, folder torchvision looks for, display name)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "CIFAR-10"),
    "cifar100": ("CIFAR100", "cifar-100-python", "CIFAR-100"),
    "svhn": ("SVHN", "{split}_32x32.mat", "SVHN"),
}


def _load_torchvision(dataset: str, root: Path, split: str, allow_download: bool):
    import torchvision.datasets as tvd

    cls_name, where, display = _TORCHVISION[dataset]
    cls = getattr(tvd, cls_name)
    kwargs = {"split": split} if dataset == "svhn" else {"train": split == "train"}
    attempts = [False, True] if allow_download else [False]
    note = "download not allowed"
    for download in attempts:
        try:
            ds = cls(str(root), download=download, **kwargs)
            break
        except Exception as exc:  # missing files or failed download
            if download:
                note = f"torchvision download into {root} failed: {exc}"
    else:
        extra = (" or use the offline copy with dataset = \"npz:<dir>\"" if dataset == "cifar10"
                 else "")
        raise DataNotFoundError(
            f"{display} not found. Looked in: {root / where.format(split=split)} ({note}). "
            f"Get it by running once with network so torchvision downloads it into {root} "
            f"(set --data-root or $ROBENCH_DATA to choose the folder){extra}."
        )
    if dataset == "svhn":
        return np.transpose(ds.data, (0, 2, 3, 1)), np.asarray(ds.labels)
    return np.asarray(ds.data), np.asarray(ds.targets)


def _synthetic(split: str, seed: int = 20240601) -> tuple[np.ndarray, np.ndarray]:
    """10 classes of 1 x 16 x 16 images: a blocky class prototype, shifted by up to one
    pixel, plus Gaussian noise. 2,000 train / 500 test, class-balanced, deterministic."""
    classes, side = 10, 16
    protos = np.random.default_rng([seed, 0]).uniform(0.0, 1.0, size=(classes, 4, 4))
    protos = np.kron(protos, np.ones((4, 4)))  # 16 x 16, blocks of 4 x 4 pixels
    n = 2000 if split == "train" else 500
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    y = rng.permutation(np.arange(n) % classes)
    shifts = rng.integers(-1, 2, size=(n, 2))
    x = np.empty((n, side, side), dtype=np.float64)
    for c in range(classes):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                sel = (y == c) & (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
                x[sel] = np.roll(protos[c], (dy, dx), axis=(0, 1))
    x = 0.2 + 0.6 * x + rng.normal(0.0, 0.15, size=x.shape)
    x = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    return x[..., None], y.astype(np.int64)


# --------------------------------------------------------------------------- splits


def balanced_order(y: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """A permutation of `range(len(y))` whose every prefix is as class-balanced as possible.

    Examples are ranked within their class (in random order with `rng`, else in file order)
    and sorted by that rank; ties between classes go by a random class priority (`rng`) or
    by class id. Classes that run out simply stop contributing.
    """
    n = len(y)
    perm = rng.permutation(n) if rng is not None else np.arange(n)
    ys = y[perm]
    by_class = np.argsort(ys, kind="stable")
    sorted_y = ys[by_class]
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - np.searchsorted(sorted_y, sorted_y, side="left")
    classes = np.unique(y)
    priority = rng.permutation(len(classes)) if rng is not None else np.arange(len(classes))
    tie = priority[np.searchsorted(classes, ys)]
    return perm[np.lexsort((tie, rank))]


def _mean_std(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std on the [0, 1] scale, via byte histograms."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(x.shape[-1]):
        channel = torch.from_numpy(x[..., c].reshape(-1))  # torch counts bytes far faster
        hist = torch.bincount(channel, minlength=256).numpy().astype(np.float64)
        m = float((hist * levels).sum() / hist.sum())
        var = float((hist * (levels - m) ** 2).sum() / hist.sum())
        mean.append(m)
        std.append(math.sqrt(var))
    return tuple(mean), tuple(std)


def _to_split(x: np.ndarray, y: np.ndarray, index: np.ndarray) -> ArraySplit:
    return ArraySplit(
        x=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
        y=torch.from_numpy(np.asarray(y, dtype=np.int64)),
        index=torch.from_numpy(np.asarray(index, dtype=np.int64)),
    )


def build_splits(
    data: DataConfig, root: str | None, curve_size: int, *, allow_download: bool = True,
    with_test: bool = False,
) -> Splits:
    """Load `data.dataset` and split it; deterministic given `data.split_seed`.

    One class-balanced random permutation of the training split (seed `split_seed`) gives
    the validation set (its first `val_size` examples) and the training set (the next
    `train_size`, or all the rest when `train_size` is 0), so the training part and the
    validation set are each class-balanced and disjoint, and the validation set does not
    depend on `train_size`. Symmetric label noise then flips exactly
    `round(label_noise * len(train))` training labels, each to a uniformly drawn
    *different* class. `train_curve` is the first `curve_size` examples of the (balanced,
    randomly ordered) training set, `val_curve` the first `curve_size` of validation.
    The test subset is the class-balanced prefix of the test split in file order
    (`test_size` = 0: all of it), independent of the seed; it is loaded only with
    `with_test` (the evaluator), so a training process never holds the test split.
    Mean and std are those of the whole training split of the dataset.
    With `injected_feature` > 0, every image of every split then carries its class's
    pattern (`inject_class_feature`).
    """
    if data.train_size < 0 or data.val_size < 0 or data.test_size < 0 or curve_size < 0:
        raise ConfigError("train_size, val_size, test_size and curve size must be >= 0")
    if not 0.0 <= data.label_noise < 1.0:
        raise ConfigError(f"label_noise must be in [0, 1), got {data.label_noise}")
    x, y = load_raw(data.dataset, root, "train", allow_download=allow_download)
    num_classes = _NUM_CLASSES.get(data.dataset, int(y.max()) + 1)
    mean, std = _mean_std(x)
    info = DatasetInfo(data.dataset, num_classes, x.shape[3], x.shape[1], mean, std)

    need = data.val_size + (data.train_size if data.train_size > 0 else 1)
    if need > len(y):
        raise ConfigError(
            f"{data.dataset}: train_size {data.train_size} + val_size {data.val_size} "
            f"exceeds the {len(y)} training examples"
        )
    order = balanced_order(y, np.random.default_rng([data.split_seed, 0]))
    val_idx = order[: data.val_size]
    end = data.val_size + data.train_size if data.train_size > 0 else len(order)
    train_idx = order[data.val_size: end]

    y_train = y[train_idx].copy()
    n_noisy = int(round(data.label_noise * len(train_idx)))
    if n_noisy:
        rng = np.random.default_rng([data.split_seed, 1])
        pos = rng.choice(len(train_idx), size=n_noisy, replace=False)
        y_train[pos] = (y_train[pos] + rng.integers(1, num_classes, size=n_noisy)) % num_classes

    train = _to_split(x[train_idx], y_train, train_idx)
    val = _to_split(x[val_idx], y[val_idx], val_idx)
    test = None
    if with_test:
        xt, yt = load_raw(data.dataset, root, "test", allow_download=allow_download)
        if data.test_size > len(yt):
            raise ConfigError(f"{data.dataset}: test_size {data.test_size} exceeds {len(yt)}")
        test_idx = np.arange(len(yt))
        if data.test_size > 0:
            test_idx = np.sort(balanced_order(yt)[: data.test_size])
        test = _to_split(xt[test_idx], yt[test_idx], test_idx)
    if data.injected_feature > 0:
        patterns = class_feature_patterns(num_classes, *train.x.shape[1:])
        train, val = (inject_class_feature(split, data.injected_feature, patterns)
                      for split in (train, val))
        if test is not None:
            test = inject_class_feature(test, data.injected_feature, patterns)
    return Splits(
        info=info,
        train=train,
        val=val,
        test=test,
        train_curve=train.subset(slice(0, curve_size)),
        val_curve=val.subset(slice(0, curve_size)),
    )


# --------------------------------------------------------------------------- loader


def crop_flip(
    x: torch.Tensor,
    offsets: torch.Tensor | None,
    flips: torch.Tensor | None,
    padding: int,
) -> torch.Tensor:
    """Batched random crop (zero padding) and horizontal flip with given randomness.

    `x` is N x C x H x W; `offsets` (N x 2, long, in [0, 2 * padding]) is the top-left
    corner (row, column) of each crop in the padded image, None for no crop; `flips` (N,
    bool) marks the images to mirror, None for none. The batch is padded once and every
    image is gathered at its own offset with two `gather` calls (rows, then columns; the
    flip is folded into the column index), with no loop over images.
    """
    n, c, h, w = x.shape
    crop = offsets is not None and padding > 0
    if flips is None and not crop:
        return x
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flips is not None:
        cols = torch.where(flips[:, None], (w - 1) - cols, cols)
    if crop:
        # F.pad is slow for uint8 on CPU; a zero canvas and one copy is not.
        padded = x.new_zeros(n, c, h + 2 * padding, w + 2 * padding)
        padded[:, :, padding: padding + h, padding: padding + w] = x
        rows = torch.arange(h, device=x.device) + offsets[:, :1]
        x = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
        cols = cols + offsets[:, 1:]
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def augment_batch(
    x: torch.Tensor,
    augment: str,
    padding: int,
    generator: torch.Generator,
    channels_last: bool = False,
) -> torch.Tensor:
    """Augment a uint8 batch on its device and return float32 in [0, 1].

    `augment` is crop_flip (random crop with zero padding `padding`, then a horizontal flip
    with p = 0.5, per image), flip or none. Randomness comes only from `generator`: crop
    offsets (N x 2) are drawn first, then the flip coins (N).
    """
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"augment must be one of {list(AUGMENTATIONS)}, got {augment!r}")
    n, dev = x.shape[0], x.device
    offsets = flips = None
    if augment == "crop_flip" and padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=dev)
    if augment in ("crop_flip", "flip"):
        flips = torch.rand(n, generator=generator, device=dev) < 0.5
    x = crop_flip(x, offsets, flips, padding).float().div_(255.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


class DeviceLoader:
    """Keeps a split on `device` as uint8 and yields augmented float batches in [0, 1].

    Iterating yields `(x, y, index)`: x float32 N x C x H x W in [0, 1] (channels_last
    memory format if asked), y and index int64. Shuffling and augmentation draw only from
    `generator` (on the data's device), so the data order follows from its seed and its
    state (`get_state`/`set_state`) is all that resuming needs. Without a generator, one is
    created and seeded from torch's global generator. Nothing syncs with the host.
    """

    def __init__(
        self,
        split: ArraySplit,
        batch_size: int,
        augment: str = "crop_flip",
        padding: int = 4,
        shuffle: bool = True,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
        channels_last: bool = False,
    ) -> None:
        if augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {list(AUGMENTATIONS)}, got {augment!r}")
        if batch_size <= 0 or padding < 0:
            raise ValueError("batch_size must be positive and padding non-negative")
        self.device = torch.device(device)
        if generator is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            generator = torch.Generator(device=self.device).manual_seed(seed)
        if generator.device.type != self.device.type:
            raise ValueError(
                f"generator is on {generator.device}, data on {self.device}; they must match"
            )
        self.split = split.to(self.device)
        self.batch_size = batch_size
        self.augment = augment
        self.padding = padding
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.generator = generator
        self.channels_last = channels_last

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        n, g = len(self.split), self.generator
        if self.shuffle:
            order = torch.randperm(n, generator=g, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size: (b + 1) * self.batch_size]
            x = self.split.x[idx]
            x = augment_batch(x, self.augment, self.padding, self.generator, self.channels_last)
            yield x, self.split.y[idx], self.split.index[idx]


# --------------------------------------------------------------------------- stressors


def class_feature_patterns(num_classes: int, channels: int, height: int,
                           width: int) -> torch.Tensor:
    """One +-1 pattern per class (num_classes x C x H x W, int16): the sign of a
    low-frequency 2-D DCT basis function cos(pi (2i+1) u / 2H) cos(pi (2j+1) v / 2W),
    the same on every channel. Classes take the frequencies (u, v) in the order
    u + v = 1, 2, ..., u ascending (the constant pattern u = v = 0 is skipped), so the
    patterns are nearly orthogonal and smooth."""
    freqs: list[tuple[int, int]] = []
    total = 1
    while len(freqs) < num_classes:
        freqs += [(u, total - u) for u in range(total + 1)]
        total += 1
    rows = torch.arange(height, dtype=torch.float64).view(-1, 1)
    cols = torch.arange(width, dtype=torch.float64).view(1, -1)
    patterns = []
    for u, v in freqs[:num_classes]:
        wave = (torch.cos(math.pi * (2 * rows + 1) * u / (2 * height))
                * torch.cos(math.pi * (2 * cols + 1) * v / (2 * width)))
        patterns.append(torch.where(wave >= 0, 1, -1).to(torch.int16).expand(channels, -1, -1))
    return torch.stack(patterns)


def inject_class_feature(split: ArraySplit, strength: float,
                         patterns: torch.Tensor) -> ArraySplit:
    """Add `strength` (on the [0, 1] pixel scale, rounded to whole uint8 levels) times the
    pattern of each example's label, clipped to the valid range.

    The stressor of Ortiz-Jimenez, de Jorge, Sanyal, Bibi, Dokania, Frossard, Rogez &
    Torr, "Catastrophic overfitting can be induced with discriminative non-robust
    features" (TMLR 2023): a feature that is easy and discriminative but that an
    adversary of radius eps >= strength can erase makes single-step adversarial training
    overfit catastrophically at radii where it otherwise does not. The pattern follows the
    label the split carries (the noisy one on a training set with label noise)."""
    shift = patterns[split.y] * int(round(strength * 255))
    x = (split.x.to(torch.int16) + shift).clamp_(0, 255).to(torch.uint8)
    return ArraySplit(x=x, y=split.y, index=split.index)
