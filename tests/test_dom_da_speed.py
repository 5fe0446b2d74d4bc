"""DOM-DA's batched transforms (defenses/_dom_da_ops.py) against torchvision itself: every
operation bit for bit, whole RandAugment / AugMix calls with a seeded global generator,
the per-image draw's distribution, the old transform path through the engine, and the
static-shape option."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torchvision.transforms as T
from conftest import with_train
from invariants import assert_same_state, history_without_timing, model_state, train
from test_dom import MeanBrightness, hand_state
from torch import nn
from torchvision.transforms.autoaugment import _apply_op

from bench.config import ConfigError
from defenses._dom_da_batched import BatchedAugment, apply_code, apply_codes, build_codes
from defenses._dom_da_ops import AUGMIX_OPS, RANDAUGMENT_OPS
from defenses.dom_da import DomDA

CPU = torch.device("cpu")
MODE = {"randaugment": T.InterpolationMode.NEAREST, "augmix": T.InterpolationMode.BILINEAR}


def torchvision_transform(aug: str) -> nn.Module:
    return T.RandAugment() if aug == "randaugment" else T.AugMix()


def sample_images(channels: int, height: int = 32, width: int = 32, n: int = 6) -> torch.Tensor:
    """Random uint8 images plus the edge cases: a constant channel (autocontrast,
    equalize keep it), four grey levels, a dark image, a single bright pixel."""
    g = torch.Generator().manual_seed(channels)
    img = torch.randint(0, 256, (n, channels, height, width), generator=g, dtype=torch.uint8)
    if n >= 4:
        img[0, -1] = 77
        img[1] = img[1] // 64 * 64
        img[2] = img[2] // 32
        img[3] = 0
        img[3, :, 5, 7] = 250
    return img


def torchvision_space(aug: str, height: int, width: int) -> list[tuple[str, float]]:
    """Every (operation, signed magnitude) torchvision's default transform can apply, read
    from torchvision's own augmentation space (RandAugment: bin 9 of 31; AugMix: the
    levels below severity 3 of 10 bins)."""
    transform = torchvision_transform(aug)
    bins, levels = (31, [9]) if aug == "randaugment" else (10, [0, 1, 2])
    out = []
    for op, (magnitudes, signed) in transform._augmentation_space(bins, (height, width)).items():
        if magnitudes.ndim == 0:
            out.append((op, 0.0))
            continue
        for level in levels:
            m = float(magnitudes[level].item())
            out += [(op, m), (op, -m)] if signed else [(op, m)]
    return out


@pytest.mark.parametrize("aug", ["randaugment", "augmix"])
@pytest.mark.parametrize(("channels", "height", "width"), [(3, 32, 32), (1, 32, 32), (3, 24, 20)])
def test_each_operation_equals_torchvision_bit_for_bit(aug, channels, height, width):
    img = sample_images(channels, height, width)
    table = build_codes(aug, height, width, CPU)
    space = torchvision_space(aug, height, width)
    assert {name for name in table.names if name != ("Identity", 0.0) or aug == "randaugment"} \
        == set(space)  # the same operations and magnitudes, nothing more
    mode = MODE[aug].value
    for op, m in space:
        want = _apply_op(img, op, m, interpolation=MODE[aug], fill=None)
        code = table.index[(op, m)]
        assert torch.equal(apply_code(img, table, code, mode), want), (op, m)
        same = torch.full((len(img),), code)
        assert torch.equal(apply_codes(img, table, same, mode), want), (op, m)
    # each image its own operation: as torchvision on that image alone
    codes = torch.randint(len(table.names), (len(img) * 8,), generator=torch.Generator()
                          .manual_seed(1))
    many = img.repeat(8, 1, 1, 1)
    got = apply_codes(many, table, codes, mode)
    for i, code in enumerate(codes.tolist()):
        op, m = table.names[code]
        want = _apply_op(many[i], op, m, interpolation=MODE[aug], fill=None)
        assert torch.equal(got[i], want), (op, m)


@pytest.mark.parametrize("aug", ["randaugment", "augmix"])
@pytest.mark.parametrize("channels", [3, 1])
def test_whole_calls_equal_torchvision_with_a_seeded_global_generator(aug, channels):
    """The shared draw: the same global-generator calls in the same order (the state after
    the call matches too) and the same output bit for bit, over enough seeds to draw every
    operation."""
    img = sample_images(channels)
    batched = BatchedAugment(aug)
    for seed in range(60):
        torch.manual_seed(seed)
        want = torchvision_transform(aug)(img)
        after = torch.get_rng_state()
        torch.manual_seed(seed)
        assert torch.equal(batched.shared(img), want), seed
        assert torch.equal(torch.get_rng_state(), after), seed


def chi_square_bound(dof: int, z: float = 3.09) -> float:
    """The 0.999 quantile of chi-square(dof) (Wilson-Hilferty)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def goodness_of_fit(observed: Counter, expected: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic over the output classes, pooling classes expected < 5 times."""
    stat, dof, pool_o, pool_e = 0.0, -1, 0, 0.0
    for key, p in sorted(expected.items(), key=lambda kv: kv[1]):
        pool_o, pool_e = pool_o + observed.get(key, 0), pool_e + n * p
        if pool_e >= 5:
            stat, dof, pool_o, pool_e = stat + (pool_o - pool_e) ** 2 / pool_e, dof + 1, 0, 0.0
    return stat, dof


def test_per_image_randaugment_has_torchvision_s_per_image_distribution():
    """Each image of a per-image batch is one of the outputs that two independent uniform
    operations (a uniform sign for the signed ones) give, with their probabilities: the
    exact distribution is derived from torchvision's operations applied to one image, and
    both torchvision called image by image and the batched draw fit it (chi-square, fixed
    seeds, so the test is deterministic)."""
    image = sample_images(3, 16, 16, n=1)[0]
    space = torchvision_space("randaugment", 16, 16)
    prob = {(op, m): 1 / 14 / (2 if op in {"ShearX", "ShearY", "TranslateX", "TranslateY",
                                           "Rotate", "Brightness", "Color", "Contrast",
                                           "Sharpness"} else 1) for op, m in space}
    assert abs(sum(prob.values()) - 1) < 1e-12

    def key(t: torch.Tensor) -> bytes:
        return t.numpy().tobytes()

    expected: dict[bytes, float] = {}
    for first in space:
        once = _apply_op(image, *first, interpolation=MODE["randaugment"], fill=None)
        for second in space:
            out = key(_apply_op(once, *second, interpolation=MODE["randaugment"], fill=None))
            expected[out] = expected.get(out, 0.0) + prob[first] * prob[second]
    n = 3000
    torch.manual_seed(0)
    reference = Counter(key(T.RandAugment()(image)) for _ in range(n))
    torch.manual_seed(0)
    batch = BatchedAugment("randaugment").per_image(image.expand(n, -1, -1, -1).contiguous())
    batched = Counter(key(out) for out in batch)
    for observed in (reference, batched):
        assert set(observed) <= set(expected)
        stat, dof = goodness_of_fit(observed, expected, n)
        assert dof > 50 and stat < chi_square_bound(dof), (stat, dof)
    assert len(batched) > 100  # images drew different operations


def test_per_image_augmix_draws_torchvision_s_distributions():
    """AugMix per image: each chain's depth uniform on 1..3, each layer's operation uniform
    over torchvision's 13, its level uniform below the severity 3, its sign uniform (signed
    operations), layers past the depth the identity; and the mixed images' pixel means
    have the distribution of torchvision's per-image calls (two-sample Kolmogorov-Smirnov)."""
    batched = BatchedAugment("augmix")
    image = sample_images(3, 16, 16, n=1)[0]
    table = batched.table(image[None])
    lookup = batched._lookup(table, 16, 16, CPU)
    n = 30000
    torch.manual_seed(0)
    names = [table.names[c] for c in batched._codes(lookup, n, CPU, None).tolist()]
    ops = Counter(op for op, _ in names)
    assert set(ops) == set(AUGMIX_OPS)
    stat = sum((ops[op] - n / 13) ** 2 / (n / 13) for op in AUGMIX_OPS)
    assert stat < chi_square_bound(12)
    space = torchvision_space("augmix", 16, 16)
    for op in ("Rotate", "Posterize", "Brightness"):  # magnitude x sign, uniform
        values = Counter(m for o, m in names if o == op)
        want = Counter(m for o, m in space if o == op)  # (Posterize's levels repeat a value)
        total = sum(want.values())
        stat = sum((values[m] - ops[op] * c / total) ** 2 / (ops[op] * c / total)
                   for m, c in want.items())
        assert stat < chi_square_bound(len(want) - 1), op
    # outputs: the mean pixel of each mixed image against torchvision image by image
    m = 800
    torch.manual_seed(1)
    reference = torch.stack([T.AugMix()(image) for _ in range(m)]).float().mean((1, 2, 3))
    torch.manual_seed(1)
    ours = batched.per_image(image.expand(m, -1, -1, -1).contiguous()).float().mean((1, 2, 3))
    grid = torch.cat([reference, ours]).sort().values
    cdf = lambda s: (s[None, :] <= grid[:, None]).float().mean(1)  # noqa: E731
    ks = float((cdf(reference) - cdf(ours)).abs().max())
    assert ks < 1.95 * math.sqrt(2 / m)  # the 0.999 critical value
    assert ours.unique().numel() > m // 2


def test_per_image_depth_masks_layers_past_the_chain_s_depth(monkeypatch):
    """With every drawn depth 1, only each chain's first layer acts: the output is as if
    torchvision drew chains of depth 1 (checked by forcing depth and comparing the code
    sequence)."""
    batched = BatchedAugment("augmix")
    seen = []
    original = apply_codes

    def spy(img, table, codes, mode):
        seen.append(codes.clone())
        return original(img, table, codes, mode)

    monkeypatch.setattr("defenses._dom_da_batched.apply_codes", spy)
    real_randint = torch.randint

    def fixed_depth(*args, **kwargs):
        if args[:2] == (1, 4):
            return torch.ones(args[2], dtype=torch.long)
        return real_randint(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", fixed_depth)
    batched.per_image(sample_images(3, 16, 16, n=4))
    table = batched.table(sample_images(3, 16, 16, n=1))
    identity = table.index[("Identity", 0.0)]
    assert len(seen) == 9  # 3 chains x 3 layers
    for layer, codes in enumerate(seen):
        assert bool((codes == identity).all()) == (layer % 3 > 0)


# --------------------------------------------------------------------------- through DOM-DA


class TorchvisionDA(DomDA):
    """DOM-DA with the previous transform path: torchvision's module called on the
    sub-batch (the default) or image by image (per_image)."""

    def augment_uint8(self, images: torch.Tensor) -> torch.Tensor:
        reference = torchvision_transform(self.aug)
        if self.per_image:
            return torch.stack([reference(image) for image in images])
        return reference(images)


@pytest.mark.parametrize("aug", ["randaugment", "augmix"])
def test_default_path_equals_the_torchvision_path_through_the_engine(tmp_path, smoke_suite,
                                                                     smoke_splits, aug):
    """Only the work moved: the same run bit for bit (weights, logs, random states)."""
    suite = with_train(smoke_suite, epochs=1)
    runs = {}
    for name, cls in (("new", DomDA), ("old", TorchvisionDA)):
        da = cls(tau=2.3, warmup=0.0, aug=aug)
        runs[name] = train(tmp_path / name, suite, smoke_splits, instances=[da])
    assert_same_state(model_state(runs["new"].run_dir), model_state(runs["old"].run_dir))
    new, old = (history_without_timing(runs[k].run_dir) for k in ("new", "old"))
    assert new == old and 0 < new[0]["dom_da.flagged"] < 1


def step_inputs(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    texture = torch.rand(n, 3, 16, 16, generator=g)
    levels = torch.linspace(0.55, 1.25, n)[:, None, None, None]
    x = ((texture * levels).clamp(0, 1) * 255).round() / 255  # mean brightness 0.3 .. 0.6
    return x.contiguous(memory_format=torch.channels_last), torch.zeros(n, dtype=torch.long)


def run_da(smoke_suite, model, seed: int = 6, **params) -> tuple[torch.Tensor, int]:
    x, y = step_inputs()
    da = DomDA(tau=1.0, warmup=0.0, beta=0.3, rounds=3, **params)
    da.bind_random_stream(seed, CPU)
    state = hand_state(smoke_suite, model, x, y)
    da.before_attack(state)
    return state.x, state.counter.forward


def test_static_shapes_give_the_reference_batch_when_losses_are_per_image(smoke_suite):
    """RandAugment's shared draw and a model whose loss of an image does not depend on the
    others: transforming and forwarding the whole batch and selecting with torch.where
    gives the sub-batch loop's batch bit for bit (all rounds always run)."""
    want, _ = run_da(smoke_suite, MeanBrightness())
    got, forwards = run_da(smoke_suite, MeanBrightness(), static_shapes=True)
    x, _ = step_inputs()
    assert not torch.equal(want, x)
    assert torch.equal(got, want) and forwards == 1 + 2
    assert got.is_contiguous(memory_format=torch.channels_last)


class BatchNormBrightness(nn.Module):
    """MeanBrightness behind a train-mode BatchNorm: an image's loss depends on the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3, affine=False)
        self.head = MeanBrightness()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(0.3 * self.bn(x) + 0.5)


def test_static_shapes_change_results_with_batchnorm_and_augmix(smoke_suite):
    """The documented behaviour change: with train-mode BatchNorm the losses (and so the
    released images) depend on which images are forwarded together; AugMix draws its
    mixing weights for the whole batch. Unflagged images stay untouched either way."""
    x, _ = step_inputs()
    for model, aug in ((BatchNormBrightness(), "randaugment"), (MeanBrightness(), "augmix")):
        want, _ = run_da(smoke_suite, model, seed=7, aug=aug)  # (a seed where they differ)
        got, _ = run_da(smoke_suite, model, seed=7, aug=aug, static_shapes=True)
        assert not torch.equal(got, want), aug
        untouched = (want == x).flatten(1).all(1)
        assert torch.equal(got[untouched], x[untouched])


def test_static_shapes_must_be_a_flag():
    with pytest.raises(ConfigError, match="static_shapes must be true or false"):
        DomDA(tau=1.5, warmup=0.5, static_shapes="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("aug", ["randaugment", "augmix"])
def test_transforms_never_synchronise_on_cuda(aug):
    img = sample_images(3).cuda()
    batched = BatchedAugment(aug)
    batched.shared(img)
    batched.per_image(img)  # (build the tables first: they copy to the device once)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for seed in range(30):
            torch.manual_seed(seed)
            batched.shared(img)
            batched.per_image(img)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_ops_list_orders_match_torchvision():
    """The drawn index maps into torchvision's dictionary order."""
    for aug, ops in (("randaugment", RANDAUGMENT_OPS), ("augmix", AUGMIX_OPS)):
        space = torchvision_transform(aug)._augmentation_space(10, (32, 32))
        assert tuple(space) == ops
