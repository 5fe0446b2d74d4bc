"""IDBH (defenses/idbh.py) and its batched ops (defenses/augment_ops.py): ranges, identities,
per-image draws, CropShift's canvas, erasing, determinism, the variants, and the shared
invariants (resume, composition, slot conflicts, untouched random streams)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF
from conftest import with_train
from invariants import (
    PROBE_CARD,
    assert_same_state,
    check_resume_equals_uninterrupted,
    model_state,
    states_differ,
    train,
)

import defenses.idbh as idbh_module
from bench.config import ConfigError, DefenseSpec, RunSpec, load_suite
from bench.engine import Trainer
from bench.planning import plan_runs
from bench.records import load_checkpoint
from defenses import augment_ops as A
from defenses import augment_regions as R
from defenses.base import Defense
from defenses.idbh import (
    _APPLIED,
    COLOUR_SHAPE,
    IDBH,
    RANGES,
    apply_idbh,
    idbh_augment,
    sample_idbh,
)
from defenses.registry import build_defenses

CPU = torch.device("cpu")
FORMATS = {1: torch.contiguous_format, 3: torch.channels_last}


def images(n: int = 16, c: int = 3, side: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8-valued float images in [0, 1]; 3-channel ones in channels_last."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, side, side), generator=g).float() / 255
    return x.contiguous(memory_format=FORMATS[c])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spec(**params) -> DefenseSpec:
    return DefenseSpec("idbh", tuple(sorted(params.items())))


# --------------------------------------------------------------------------- ops

MAGNITUDE_RANGES = {**{k: v for k, v in RANGES.items() if k not in ("shear", "rotate")},
                    "shear_x": (-0.15, 0.15), "shear_y": (-0.15, 0.15), "rotate": (-10, 10),
                    "autocontrast": (0, 0), "equalize": (0, 0), "translate_x": (-10, 10),
                    "translate_y": (-10, 10), "solarize": (0, 1), "posterize": (4, 8),
                    "identity": (0, 0)}
IDENTITY_AT = {"saturation": 1.0, "brightness": 1.0, "contrast": 1.0, "sharpness": 1.0,
               "shear_x": 0.0, "shear_y": 0.0, "rotate": 0.0, "translate_x": 0.0,
               "translate_y": 0.0, "solarize": 1.01, "posterize": 8.0, "identity": 0.0}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(A.OPS))
def test_each_op_keeps_range_shape_dtype_and_format(name, channels):
    x = images(c=channels, side=28 if channels == 1 else 32)
    lo, hi = MAGNITUDE_RANGES[name]
    magnitude = lo + (hi - lo) * torch.rand(len(x), generator=gen(1))
    out = A.OPS[name](x, magnitude)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.is_contiguous(memory_format=FORMATS[channels])
    assert out.min() >= 0 and out.max() <= 1
    if name in IDENTITY_AT:
        same = A.OPS[name](x, torch.full((len(x),), IDENTITY_AT[name]))
        torch.testing.assert_close(same, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["brightness", "saturation", "contrast", "sharpness"])
def test_colour_ops_match_torchvision(name):
    x = images(n=8).contiguous()
    factors = torch.linspace(0.1, 1.9, len(x))
    reference = getattr(TF, f"adjust_{name}")
    expected = torch.stack([reference(img, float(f)) for img, f in zip(x, factors)])
    torch.testing.assert_close(A.OPS[name](x, factors), expected, atol=2e-3, rtol=0)


def test_autocontrast_and_equalize_match_torchvision():
    x = images(n=8).contiguous() * 0.5 + 0.2  # low contrast
    torch.testing.assert_close(A.autocontrast(x), TF.autocontrast(x), atol=1e-5, rtol=0)
    q = (x * 255).round().to(torch.uint8)
    expected = TF.equalize(q).float() / 255
    torch.testing.assert_close(A.equalize(q.float() / 255), expected, atol=1e-6, rtol=0)
    flat = torch.full((2, 3, 8, 8), 128 / 255)  # a constant channel is left as it is
    assert torch.equal(A.autocontrast(flat), flat) and torch.equal(A.equalize(flat), flat)


def test_geometric_ops_mostly_agree_with_torchvision():
    """Nearest interpolation about the centre: rounding ties may differ on a few pixels."""
    x = images(n=4).contiguous()
    for deg in (7.0, -3.0):
        ours = A.rotate(x, deg)
        ref = torch.stack([TF.rotate(img, deg, interpolation=TF.InterpolationMode.NEAREST)
                           for img in x])
        assert (ours == ref).float().mean() > 0.97
    ours = A.translate(x, 3.0, "x")
    assert torch.equal(ours[..., 3:], x[..., :-3]) and (ours[..., :3] == 0).all()


def test_op_magnitudes_are_per_image():
    x = images(n=1).expand(4, -1, -1, -1).contiguous()
    out = A.brightness(x, torch.tensor([0.5, 1.0, 1.5, 1.0]))
    torch.testing.assert_close(out[0], x[0] * 0.5)
    assert torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])
    out = A.rotate(x, torch.tensor([0.0, 10.0, 0.0, -10.0]))
    assert torch.equal(out[0], x[0]) and not torch.equal(out[1], x[1])
    assert not torch.equal(out[1], out[3])


def test_apply_ops_gives_each_image_its_own_op():
    x = images(n=6)
    names = ("brightness", "rotate", "equalize")
    choice = torch.tensor([0, 1, 2, 2, 1, 0])
    magnitude = torch.tensor([0.5, 5.0, 0.0, 0.0, -5.0, 1.5])
    out = A.apply_ops(x, names, choice, magnitude)
    for i, (k, m) in enumerate(zip(choice.tolist(), magnitude.tolist())):
        torch.testing.assert_close(out[i:i + 1], A.OPS[names[k]](x[i:i + 1], torch.tensor([m])))


# --------------------------------------------------------------------------- CropShift


def naive_crop_shift(img: torch.Tensor, sx, sy, cx, cy, px, py) -> torch.Tensor:
    _, h, w = img.shape
    canvas = torch.zeros_like(img)
    canvas[:, py:py + h - sy, px:px + w - sx] = img[:, cy:cy + h - sy, cx:cx + w - sx]
    return canvas


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_shift_pastes_the_window_on_a_zero_canvas(channels):
    x = images(n=64, c=channels, side=28 if channels == 1 else 32) * 0.9 + 0.05  # no zeros
    total = torch.arange(64) % 11
    params = R.sample_crop_shift(total, gen(3))
    sx, sy, cx, cy, px, py = params
    assert torch.equal(sx + sy, total) and (sx >= 0).all() and (sy >= 0).all()
    for corner, size in ((cx, sx), (cy, sy), (px, sx), (py, sy)):
        assert (corner >= 0).all() and (corner <= size).all()
    out = R.crop_shift(x, *params)
    assert out.shape == x.shape and out.is_contiguous(memory_format=FORMATS[channels])
    for i in range(len(x)):
        p = [int(t[i]) for t in params]
        assert torch.equal(out[i], naive_crop_shift(x[i], *p))
        kept = (out[i] != 0).any(0)  # the canvas outside the window is zero
        assert int(kept.sum()) == (x.shape[2] - p[1]) * (x.shape[3] - p[0])
    zero = torch.zeros(64, dtype=torch.long)
    assert torch.equal(R.crop_shift(x, *R.sample_crop_shift(zero, gen(0))), x)


def test_crop_shift_draws_every_split_and_offset():
    total = torch.full((4000,), 10)
    sx, sy, cx, cy, px, py = R.sample_crop_shift(total, gen(5))
    assert set(sx.tolist()) == set(range(11))
    assert set(px[sx == 10].tolist()) == set(range(11))
    assert set(cy[sy == 4].tolist()) == set(range(5))


# --------------------------------------------------------------------------- erasing


def test_erase_boxes_follow_the_published_ranges():
    n, side = 2000, 32
    top, left, bh, bw = R.sample_erase_boxes(n, side, side, gen(7))
    assert (bh > 0).float().mean() > 0.99 and (bh < side).all() and (bw < side).all()
    area = (bh * bw).float() / side**2
    assert area.min() >= 0.02 * 0.7 and area.max() <= 0.33 * 1.3  # box sides are rounded
    ok = bh > 2
    ratio = (bh[ok].float() / bw[ok].float())
    assert ratio.min() >= 0.3 * 0.6 and ratio.max() <= 3.3 / 0.6
    assert (top + bh <= side).all() and (left + bw <= side).all() and (top >= 0).all()
    x = images(n=n, side=side) * 0.9 + 0.05
    out = R.erase(x, top, left, bh, bw)
    assert torch.equal((out == 0).all(1).sum((1, 2)), bh * bw)  # exactly the box is zero
    empty = torch.zeros(n, dtype=torch.long)
    assert torch.equal(R.erase(x, top, left, empty, empty), x)


# --------------------------------------------------------------------------- the recipe


def test_idbh_draws_stay_in_the_published_ranges():
    draw = sample_idbh(8000, 32, 32, gen(11), erase_p=1.0)
    assert set(draw.op.tolist()) == set(range(8))
    counts = torch.bincount(draw.op, minlength=8).float() / 8000
    assert (counts - 1 / 8).abs().max() < 0.02  # uniform, no identity
    mag = draw.magnitude
    for k, name in enumerate(COLOUR_SHAPE):
        m = mag[draw.op == k]
        if name in ("shear", "rotate"):
            lo, hi = RANGES[name]
            assert (m.abs() >= lo).all() and (m.abs() <= hi).all()
            assert (m > 0).any() and (m < 0).any()  # random sign
        elif name in RANGES:
            lo, hi = RANGES[name]
            assert (m >= lo).all() and (m < hi).all()
    rot = mag[draw.op == COLOUR_SHAPE.index("rotate")]
    assert torch.equal(rot, rot.round()) and set(rot.abs().long().tolist()) == set(range(1, 11))
    shear = draw.choice[draw.op == COLOUR_SHAPE.index("shear")]
    assert set(shear.tolist()) == {6, 7}  # both axes
    for op, choice in zip(draw.op.tolist(), draw.choice.tolist()):  # op -> applied op
        assert _APPLIED[choice].startswith(COLOUR_SHAPE[op])
    total = draw.crop_shift[0] + draw.crop_shift[1]
    assert set(total.tolist()) == set(range(11))
    assert 0.45 < draw.flip.float().mean() < 0.55


@pytest.mark.parametrize(("channels", "side"), [(1, 28), (3, 32)])
def test_idbh_output_and_per_image_independence(channels, side):
    one = images(n=1, c=channels, side=side) * 0.9 + 0.05
    x = one.expand(32, -1, -1, -1).contiguous(memory_format=FORMATS[channels])
    out = idbh_augment(x, gen(1), erase_p=1.0)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.is_contiguous(memory_format=FORMATS[channels])
    assert out.min() >= 0 and out.max() <= 1
    flat = out.flatten(1)
    distinct = len({tuple(row.tolist()) for row in flat})
    assert distinct == len(x)  # the same image, 32 different augmentations


def test_idbh_is_deterministic_given_the_generator():
    x = images(n=32)
    a, b = idbh_augment(x, gen(4), 1.0), idbh_augment(x, gen(4), 1.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, idbh_augment(x, gen(5), 1.0))
    draw = sample_idbh(32, 32, 32, gen(4), 1.0)
    assert torch.equal(apply_idbh(x, draw), a)


def hand_idbh(img: torch.Tensor, draw, i: int, order=("flip", "crop", "op", "erase")):
    """Image i of a batch through the recipe's steps, one at a time and in `order`, with
    draw i's parameters (each op on its own: slicing, naive_crop_shift, the single op)."""
    steps = {
        "flip": lambda t: t.flip(2) if draw.flip[i] else t,
        "crop": lambda t: naive_crop_shift(t, *[int(p[i]) for p in draw.crop_shift]),
        "op": lambda t: A.OPS[_APPLIED[int(draw.choice[i])]](
            t[None], draw.magnitude[i:i + 1])[0],
        "erase": lambda t: _erase_box(t, *[int(p[i]) for p in draw.erase]),
    }
    for name in order:
        img = steps[name](img)
    return img


def _erase_box(img: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    out = img.clone()
    out[:, top:top + h, left:left + w] = 0
    return out


ORDERS = {
    "reversed": ("erase", "op", "crop", "flip"),
    "erase before the op": ("flip", "crop", "erase", "op"),
    "crop before the flip": ("crop", "flip", "op", "erase"),
    "op before the crop": ("flip", "op", "crop", "erase"),
}


def test_ops_run_in_the_published_order():
    """flip -> CropShift -> one colour/shape op -> erasing, image by image against the steps
    applied by hand; every other order gives other images on this structured batch."""
    n, side = 64, 32
    ramp = torch.linspace(0.05, 0.95, side * side).view(1, 1, side, side)
    x = torch.cat([ramp, ramp.flip(3), ramp.transpose(2, 3)], 1).expand(n, -1, -1, -1)
    x = x.contiguous(memory_format=torch.channels_last)
    draw = sample_idbh(n, side, side, gen(21), erase_p=1.0)
    assert draw.flip.any() and (draw.erase[2] > 0).all()
    out = apply_idbh(x, draw)
    for i in range(n):
        assert torch.equal(out[i], hand_idbh(x[i], draw, i)), i
    for name, order in ORDERS.items():  # the test can tell each of these apart
        other = torch.stack([hand_idbh(x[i], draw, i, order) for i in range(n)])
        assert not torch.equal(other, out), name


def test_strong_erases_every_image_and_weak_about_half():
    strong = sample_idbh(4000, 32, 32, gen(2), IDBH(variant="strong").erase_p)
    weak = sample_idbh(4000, 32, 32, gen(2), IDBH(variant="weak").erase_p)
    assert (strong.erase[2] > 0).float().mean() > 0.99
    assert 0.45 < (weak.erase[2] > 0).float().mean() < 0.55
    x = images(n=64)
    assert not torch.equal(idbh_augment(x, gen(0), 1.0), idbh_augment(x, gen(0), 0.5))


def test_max_shift_must_fit_the_image():
    with pytest.raises(ValueError, match="max_shift 16 must be in"):
        idbh_augment(images(n=2, c=1, side=16), gen(0), 1.0, max_shift=16)
    same = idbh_augment(images(n=2, c=1, side=16), gen(0), 1.0, max_shift=0)
    assert same.shape == (2, 1, 16, 16)


# --------------------------------------------------------------------------- the defense


def test_before_attack_replaces_the_batch_with_idbh_of_the_raw_batch(tmp_path, smoke_suite,
                                                                     smoke_splits):
    trainer = Trainer(RunSpec(smoke_suite.name, "at", (spec(),), 0), smoke_suite,
                      smoke_splits, tmp_path, device=CPU, progress=False)
    state = trainer.build()
    (idbh,) = trainer.defenses
    assert "raw_batch" in trainer.capabilities
    x, y, index = next(iter(trainer.loader))
    state.x, state.y, state.index = x, y, index
    state.raw_x = (trainer.train_x_for(index).float() / 255).contiguous(
        memory_format=torch.channels_last)
    g = torch.Generator()
    g.set_state(idbh.generator.get_state())
    idbh.before_attack(state)
    assert torch.equal(state.x, idbh_augment(state.raw_x, g, 1.0))
    assert state.x.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(state.x, x)


def test_resume_equals_uninterrupted(tmp_path, smoke_suite, smoke_splits):
    check_resume_equals_uninterrupted(tmp_path, with_train(smoke_suite, epochs=3),
                                      smoke_splits, "at", (spec(variant="weak"),))


def test_trains_with_at_and_never_shifts_other_randomness(tmp_path, smoke_suite, smoke_splits):
    suite = with_train(smoke_suite, epochs=1)
    plain = train(tmp_path / "plain", suite, smoke_splits)
    runs = {v: train(tmp_path / v, suite, smoke_splits, defenses=[spec(variant=v)])
            for v in ("strong", "weak")}
    for run in runs.values():
        assert states_differ(model_state(plain.run_dir), model_state(run.run_dir))
        rng_plain = load_checkpoint(plain.run_dir / "last.pt")["rng"]
        rng = load_checkpoint(run.run_dir / "last.pt")["rng"]
        for stream in ("data", "stream", "attack", "torch"):
            assert torch.equal(rng_plain[stream], rng[stream]), stream
    assert states_differ(model_state(runs["strong"].run_dir), model_state(runs["weak"].run_dir))


def test_conflicts_with_another_augmentation_defense(smoke_suite):
    for names in (("idbh", "dom_da"), ("dom_da", "idbh")):
        with pytest.raises(ConfigError, match=r"'(idbh|dom_da)' and '(idbh|dom_da)' both "
                                              r"claim the 'augmentation' slot"):
            build_defenses(tuple(DefenseSpec(n) for n in names), "at", smoke_suite)
    build_defenses((spec(), DefenseSpec("awp")), "at", smoke_suite)  # no slot clash


@pytest.mark.parametrize("method", ["trades", "fgsm_rs", "standard"])
def test_undeclared_methods_are_refused(smoke_suite, method):
    with pytest.raises(ConfigError, match=f"does not compose with method '{method}'"):
        build_defenses((spec(),), method, smoke_suite)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"variant": "medium"}, r"variant must be one of \['strong', 'weak'\]"),
    ({"max_shift": -1}, "max_shift must be an integer >= 0"),
    ({"max_shift": 2.5}, "max_shift must be an integer >= 0"),
    ({"swa": 1}, "swa must be true or false"),
    ({"swa": True, "swa_decay": 2.0}, r"swa_decay must be a number in \(0, 1\]"),
    ({"swa_start": 1.0}, r"swa_start must be a fraction of training"),
    ({"swa_every": 0}, "swa_every must be an integer >= 1"),
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        IDBH(**kwargs)


def test_card_and_defaults():
    card = IDBH.card
    assert card.paper.startswith("Li & Spratling") and card.venue == "ICLR 2023"
    assert card.link and "TreeLLi" in card.reference_code and card.extra_data == "none"
    assert card.published and card.hyperparameters
    assert idbh_module.__doc__.startswith("IDBH (Li & Spratling")
    assert IDBH.__doc__.startswith("IDBH (Li & Spratling")
    d = IDBH()
    assert (d.variant, d.erase_p, d.max_shift, d.averaging) == ("strong", 1.0, 10, None)
    assert IDBH.extra_models == ("swa",) and d.eval_models(None) == {}
    assert math.isclose(IDBH(variant="weak").erase_p, 0.5)
    assert IDBH.slots == ("augmentation",) and IDBH.capabilities == ("raw_batch",)


# --------------------------------------------------------------------------- SWA


class StepRecorder(Defense):
    """Keeps (epoch, 1-based batch of the epoch, parameters) after every optimizer step."""

    name = "recorder"
    card = PROBE_CARD

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[int, int, dict[str, torch.Tensor]]] = []

    def after_step(self, state) -> None:
        params = {k: p.detach().clone() for k, p in state.model.named_parameters()}
        self.steps.append((state.epoch, state.step_in_epoch + 1, params))


def test_swa_in_the_engine_is_the_hand_average_of_the_scheduled_steps(tmp_path, smoke_suite,
                                                                      smoke_splits):
    """Start at half of training, every 2nd batch, decay 0.3: the saved average is the
    first scheduled step's weights, then (1 - 0.3) avg + 0.3 w at each later one; its BN
    statistics were re-estimated on one epoch's worth of batches (not the trained ones)."""
    idbh = IDBH(variant="weak", swa=True, swa_start=0.5, swa_decay=0.3, swa_every=2)
    recorder = StepRecorder()
    trainer = train(tmp_path, smoke_suite, smoke_splits, instances=[idbh, recorder])
    epochs, per_epoch = smoke_suite.train.epochs, len(trainer.loader)
    assert (epochs, per_epoch) == (2, 4)
    scheduled = [p for e, i, p in recorder.steps if e >= 0.5 * epochs and i % 2 == 0]
    assert len(scheduled) == 2
    want = dict(scheduled[0])
    for params in scheduled[1:]:
        want = {k: 0.7 * want[k] + 0.3 * params[k] for k in want}
    last = load_checkpoint(tmp_path / "last.pt")
    saved = last["eval_models"]["idbh.swa"]
    for key, value in want.items():
        torch.testing.assert_close(saved[key],
                                   value, rtol=1e-6, atol=1e-6)
    trained = last["model"]
    stats = [k for k in saved if k.endswith("running_mean")]
    assert stats and all(not torch.equal(saved[k], trained[k]) for k in stats)
    counts = [int(saved[k]) for k in saved if k.endswith("num_batches_tracked")]
    assert counts and set(counts) == {per_epoch}  # reset, then one epoch of batches
    best = load_checkpoint(tmp_path / "best.pt")
    if best["epoch"] == 1:  # before the start: no average to score yet
        assert "idbh.swa" not in best["eval_models"]


def test_swa_never_changes_the_trained_model(tmp_path, smoke_suite, smoke_splits):
    plain = train(tmp_path / "weak", smoke_suite, smoke_splits, defenses=[spec(variant="weak")])
    swa = train(tmp_path / "swa", smoke_suite, smoke_splits,
                defenses=[spec(variant="weak", swa=True)])
    assert_same_state(model_state(plain.run_dir), model_state(swa.run_dir))
    last = load_checkpoint(swa.run_dir / "last.pt")
    assert set(last["eval_models"]) == {"idbh.swa"}
    assert not load_checkpoint(plain.run_dir / "last.pt")["eval_models"]
    rng_plain = load_checkpoint(plain.run_dir / "last.pt")["rng"]
    for stream in ("data", "attack", "torch"):  # the BN pass draws only the second stream
        assert torch.equal(rng_plain[stream], last["rng"][stream]), stream


def test_resume_with_swa_equals_uninterrupted(tmp_path, smoke_suite, smoke_splits):
    check_resume_equals_uninterrupted(tmp_path, with_train(smoke_suite, epochs=3),
                                      smoke_splits, "at",
                                      (spec(variant="weak", swa=True, swa_decay=0.2),))


def test_wrn_suite_runs_the_published_wrn_recipe():
    """cifar10-linf-wrn: IDBH-weak (erasing p 0.5) with SWA from the first iteration,
    decay 0.001 every iteration, as the authors' WRN-34-10 command."""
    suite = load_suite("cifar10-linf-wrn")
    runs = [r for r in plan_runs(suite.name, ["idbh"], None, [0]) if r.defenses]
    assert [r.method for r in runs] == ["at"]
    (d,) = build_defenses(runs[0].defenses, runs[0].method, suite)
    assert (d.variant, d.erase_p) == ("weak", 0.5)
    assert d.averaging is not None
    assert (d.averaging.start, d.averaging.decay, d.averaging.every) == (0.0, 0.001, 1)
    (default,) = build_defenses((spec(),), "at", load_suite("cifar10-linf"))
    assert (default.variant, default.averaging) == ("strong", None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_idbh_on_cuda_never_syncs_and_matches_cpu():
    dev = torch.device("cuda")
    x = images(n=64)
    g = torch.Generator(device=dev).manual_seed(0)
    idbh_augment(x.to(dev), g, 1.0)  # warm-up: lazy initialisation may sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = idbh_augment(x.to(dev, non_blocking=True), g, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.is_contiguous(memory_format=torch.channels_last)
    draw = sample_idbh(64, 32, 32, gen(3), 1.0)
    moved = type(draw)(*(tuple(t.to(dev) for t in f) if isinstance(f, tuple) else f.to(dev)
                         for f in draw))
    on_cpu, on_cuda = apply_idbh(x, draw), apply_idbh(x.to(dev), moved).cpu()
    assert ((on_cpu - on_cuda).abs() < 1e-4).float().mean() > 0.99
