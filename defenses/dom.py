"""DOM: Distraction Over-Memorization (Lin, Yu, Han & Liu, "On the Over-Memorization
During Natural, Robust and Catastrophic Overfitting", ICLR 2024).

Natural, robust and catastrophic overfitting share one behaviour, over-memorization:
the network suddenly becomes very confident on some training patterns and keeps them
memorised, and an over-memorised adversarial pattern goes with a high-confidence
(low-loss) natural pattern. After a warm-up (a fraction `warmup` of training; the paper
uses half, the first learning-rate decay or the peak of the cyclic schedule), DOM
computes every batch's natural loss l_i = CE(f(x_i), y_i) with the current model and
distracts the network from the low-loss examples:

- `dom_re` (removal): example i keeps its training loss only if l_i >= tau; the others
  are multiplied by zero and the mean still divides by the full batch size (the
  engine's `sample_weights` hook: loss = mean_i(w_i * l_i)).
- `dom_da` (augmentation): the examples with l_i <= tau are augmented (AugMix or
  RandAugment from torchvision, on uint8 images) for up to `rounds` rounds before the
  attack. In a round, a flagged image whose augmented loss is >= tau takes the
  augmented image and leaves the flagged set; the others are blended,
  x <- (1 - beta) x + beta aug(x); in the last round they take aug(x) outright. Rounds
  compound: each augments the already-blended image.

Both compose with `at` (PGD-AT), `fgsm_rs` and `standard` (natural training).

Engine-specific choices (see ../shared/specs/dom.md):
- The natural loss is computed only after the warm-up (the reference computes it every
  batch), so before the warm-up a run is the plain method bit for bit. It uses the model
  in its training mode, under the engine's autocast, without a graph.
- BatchNorm running statistics: the reference's clean forward and its augmentation
  forwards update them; `update_bn = true` (default) does the same, `false` restores
  them after each extra forward.
- `dom_da` skips the forward of the last round: every image still flagged then takes
  aug(x) whatever its loss (the reference computes that loss; only its BatchNorm
  statistics would differ).
- Randomness: `per_image = true` (default) calls the torchvision transform once per
  flagged image, so each image draws its own operations; `false` calls it once per
  round on the whole flagged sub-batch, as the reference does (one draw of operations
  and magnitudes shared by the sub-batch; AugMix still draws per-image mixing weights).
  The only random draws are torchvision's, which use torch's global CPU generator
  (operation indices, magnitudes, signs, AugMix depths) and, for AugMix's Dirichlet
  mixing weights, the default generator of the images' device. Both are seeded from a
  number drawn from the defense's own stream (`self.generator`) before the transforms
  run and restored afterwards, so the augmentations are reproducible (and resumable),
  and adding the defense never shifts any other randomness of the run.
- The warm-up is checked at the start of each batch with the engine's fractional epoch
  (the reference counts the batch as finished, one batch earlier).
- Thresholds: the paper's Table 1 gives one loss threshold per method and dataset,
  used by both operations (CIFAR-10 / CIFAR-100): natural 0.2 / 0.45, PGD-AT 1.5 / 4.0,
  RS-FGSM 2.0 / 4.6; the defaults are the CIFAR-10 values. A suite sets its own
  (`[defenses.dom_re] tau = ...`), since tau depends on the loss scale of the suite.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms.functional import convert_image_dtype

from bench.config import ConfigError
from bench.state import TrainState, preserved_bn_stats
from defenses.base import Defense, DefenseCard, register_defense

METHODS = ("at", "fgsm_rs", "standard")
AUGMENTATIONS = ("augmix", "randaugment")
#: Published loss thresholds (Table 1, CIFAR-10, PreAct ResNet-18), for both operations.
PUBLISHED_TAU = {"at": 1.5, "fgsm_rs": 2.0, "standard": 0.2}
PUBLISHED_TAU_CIFAR100 = {"at": 4.0, "fgsm_rs": 4.6, "standard": 0.45}
#: Published DA strength beta and number of rounds gamma (Table 1, CIFAR-10).
PUBLISHED_DA = {
    ("at", "augmix"): (0.5, 2), ("at", "randaugment"): (0.0, 2),
    ("fgsm_rs", "augmix"): (0.5, 5), ("fgsm_rs", "randaugment"): (0.1, 3),
    ("standard", "augmix"): (0.5, 3), ("standard", "randaugment"): (0.1, 3),
}

_PAPER = ("Lin, Yu, Han & Liu. On the Over-Memorization During Natural, Robust and "
          "Catastrophic Overfitting")
_LINK = "https://arxiv.org/abs/2310.08847"
_CODE = "https://github.com/tmllab/2024_ICLR_DOM"
_BASELINES = {
    "PRN-18 CIFAR-10 PGD-AT baseline (natural / PGD-20 / AA)":
        {"best": [81.70, 52.33, 48.02], "last": [83.59, 45.16, 42.70]},
    "PRN-18 CIFAR-10 RS-FGSM 8/255 baseline, last (natural / PGD-20 / AA)":
        [87.77, 0.0, 0.0],
    "PRN-18 CIFAR-10 natural training baseline, test error": {"best": 4.70, "last": 4.84},
}


# --------------------------------------------------------------------------- validation


def _number(defense: str, name: str, value: Any, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and low <= value <= high):
        span = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ConfigError(f"{defense}: {name} must be a finite number {span}, got {value!r}")
    return float(value)


def _flag(defense: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{defense}: {name} must be true or false, got {value!r}")
    return value


def _rounds(defense: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{defense}: rounds must be an integer >= 1, got {value!r}")
    return value


# --------------------------------------------------------------------------- helpers


def natural_loss(state: TrainState, x: torch.Tensor, y: torch.Tensor,
                 update_bn: bool) -> torch.Tensor:
    """Per-example CE of the current model on (x, y), in its current (training) mode,
    without a graph; counts one forward. BatchNorm statistics are restored unless
    `update_bn`."""
    bn = contextlib.nullcontext() if update_bn else preserved_bn_stats(state.model)
    with torch.no_grad(), bn, state.autocast():
        logits = state.model(x)
    state.counter.add(fwd=1)
    return F.cross_entropy(logits.float(), y, reduction="none")


@contextlib.contextmanager
def seeded_global_rng(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Seed torch's global CPU generator (and the default generator of a CUDA `device`)
    from a number drawn from `generator`; restore both on exit."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator,
                             device=generator.device).item())
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()
             ) if cuda else None
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(index) if cuda else None
    torch.default_generator.manual_seed(seed)
    if cuda:
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, index)


def build_transform(aug: str) -> torch.nn.Module:
    """torchvision's AugMix or RandAugment with their default settings (as the reference)."""
    return T.AugMix() if aug == "augmix" else T.RandAugment()


class _DOM(Defense):
    """What both operations share: threshold, warm-up, the natural loss."""

    methods = METHODS

    @classmethod
    def method_defaults(cls, method: str) -> dict:
        return {"tau": PUBLISHED_TAU[method]} if method in PUBLISHED_TAU else {}

    def __init__(self, tau: float, warmup: float, update_bn: bool, **more: Any) -> None:
        super().__init__(tau=tau, warmup=warmup, update_bn=update_bn, **more)
        label = type(self).name or type(self).__name__
        self.tau = _number(label, "tau (a natural cross-entropy loss)", tau, 0.0)
        self.warmup = _number(label, "warmup (a fraction of training)", warmup, 0.0, 1.0)
        self.update_bn = _flag(label, "update_bn", update_bn)

    def active(self, state: TrainState) -> bool:
        return state.progress >= self.warmup

    def batch_natural_loss(self, state: TrainState) -> torch.Tensor:
        loss = natural_loss(state, state.x, state.y, self.update_bn)
        state.log(f"{self.name}.natural_loss", loss.mean())
        return loss


# --------------------------------------------------------------------------- DOM_RE


@register_defense("dom_re")
class DomRE(_DOM):
    card = DefenseCard(
        name="DOM-RE",
        paper=_PAPER,
        venue="ICLR 2024",
        link=_LINK,
        reference_code=_CODE,
        hyperparameters={
            "warmup": "K = E/2 (0.5 of training: the first lr decay, or the cyclic peak)",
            "tau (CIFAR-10)": dict(PUBLISHED_TAU),
            "tau (CIFAR-100)": dict(PUBLISHED_TAU_CIFAR100),
            "rule": "keep_i = 1[natural loss_i >= tau]; mean over the full batch",
        },
        published={
            **_BASELINES,
            "PRN-18 CIFAR-10 AT+DOM_RE (natural / PGD-20 / AA)":
                {"best": [80.23, 55.48, 42.87], "last": [80.66, 52.52, 32.90]},
            "PRN-18 CIFAR-10 RS-FGSM+DOM_RE 8/255, last (natural / PGD-20 / AA)":
                [71.66, 47.09, 17.10],
            "PRN-18 CIFAR-10 natural training + DOM_RE, test error":
                {"best": 4.55, "last": 4.63},
        },
        extra_data="none",
        notes=("Strong on PGD-20, weak on AutoAttack: 55.48 vs 42.87 (best) and 52.52 vs "
               "32.90 (last) with PGD-AT, 47.09 vs 17.10 with RS-FGSM. A PGD/AutoAttack gap "
               "of 10 to 30 points is a gradient-masking signature; trust its AutoAttack "
               "numbers, not its PGD ones. Overhead: one extra forward per batch after the "
               "warm-up."),
    )
    params = {"tau": PUBLISHED_TAU["at"], "warmup": 0.5, "update_bn": True}

    def __init__(self, tau: float, warmup: float, update_bn: bool = True) -> None:
        super().__init__(tau=tau, warmup=warmup, update_bn=update_bn)
        self._keep: torch.Tensor | None = None

    def before_attack(self, state: TrainState) -> None:
        self._keep = None
        if not self.active(state):
            return
        keep = (self.batch_natural_loss(state) >= self.tau).float()
        state.log("dom_re.kept", keep.mean())
        self._keep = keep

    def sample_weights(self, state: TrainState) -> torch.Tensor | None:
        return self._keep


# --------------------------------------------------------------------------- DOM_DA


@register_defense("dom_da")
class DomDA(_DOM):
    card = DefenseCard(
        name="DOM-DA",
        paper=_PAPER,
        venue="ICLR 2024",
        link=_LINK,
        reference_code=_CODE,
        hyperparameters={
            "warmup": "K = E/2 (0.5 of training: the first lr decay, or the cyclic peak)",
            "tau (CIFAR-10)": dict(PUBLISHED_TAU),
            "tau (CIFAR-100)": dict(PUBLISHED_TAU_CIFAR100),
            "beta / rounds (CIFAR-10)": {f"{m} {a}": list(v) for (m, a), v in
                                         PUBLISHED_DA.items()},
            "beta / rounds (CIFAR-100, where they differ)":
                {"standard augmix": [0.5, 2], "standard randaugment": [0.1, 2]},
            "transforms": "torchvision AugMix() / RandAugment() defaults, on uint8",
        },
        published={
            **_BASELINES,
            "PRN-18 CIFAR-10 AT+DOM_DA AugMix (natural / PGD-20 / AA)":
                {"best": [80.87, 53.54, 47.98], "last": [84.15, 49.31, 45.51]},
            "PRN-18 CIFAR-10 AT+DOM_DA RandAugment (natural / PGD-20 / AA)":
                {"best": [83.49, 52.83, 48.41], "last": [83.74, 50.39, 46.62]},
            "PRN-18 CIFAR-10 RS-FGSM+DOM_DA RandAugment 8/255, last (natural / PGD-20 / AA)":
                [84.52, 50.10, 42.53],
            "PRN-18 CIFAR-10 RS-FGSM+DOM_DA AugMix 8/255, last (natural / PGD-20 / AA)":
                [84.31, 45.15, 41.16],
            "PRN-18 CIFAR-10 natural training + DOM_DA, test error":
                {"AugMix": {"best": 4.13, "last": 4.24},
                 "RandAugment": {"best": 3.96, "last": 4.07}},
        },
        extra_data="none",
        notes=("beta and rounds default to the published values for the base method and "
               "the chosen transform. Overhead after the warm-up: one extra forward per "
               "batch plus one forward of the still-flagged images in each round but the "
               "last, and the torchvision transforms (per image by default)."),
    )
    params = {"tau": PUBLISHED_TAU["at"], "warmup": 0.5, "aug": "randaugment",
              "beta": None, "rounds": None, "per_image": True, "update_bn": True}
    slots = ("augmentation",)

    def __init__(self, tau: float, warmup: float, aug: str = "randaugment",
                 beta: float | None = None, rounds: int | None = None,
                 per_image: bool = True, update_bn: bool = True) -> None:
        super().__init__(tau=tau, warmup=warmup, update_bn=update_bn, aug=aug, beta=beta,
                         rounds=rounds, per_image=per_image)
        if aug not in AUGMENTATIONS:
            raise ConfigError(f"dom_da: aug must be one of {list(AUGMENTATIONS)}, got {aug!r}")
        self.aug = aug
        self.beta = None if beta is None else _number("dom_da", "beta", beta, 0.0, 1.0)
        self.rounds = _rounds("dom_da", rounds)
        self.per_image = _flag("dom_da", "per_image", per_image)
        self.transform = build_transform(aug)

    def setup(self, state: TrainState) -> None:
        """Fill in the published beta / rounds for the run's method where left unset."""
        if self.beta is not None and self.rounds is not None:
            return
        method = state.spec.method
        if (method, self.aug) not in PUBLISHED_DA:
            raise ConfigError(f"dom_da: no published beta/rounds for method {method!r}; "
                              f"set both (published for {list(METHODS)})")
        beta, rounds = PUBLISHED_DA[(method, self.aug)]
        self.beta = beta if self.beta is None else self.beta
        self.rounds = rounds if self.rounds is None else self.rounds
        self.hparams.update(beta=self.beta, rounds=self.rounds)  # the record shows these

    # ---- augmentation ------------------------------------------------------
    def augment_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """The torchvision transform on a uint8 N x C x H x W batch: per image, or one
        call for the whole batch (operations shared, as in the reference)."""
        if self.per_image:
            return torch.stack([self.transform(image) for image in images])
        return self.transform(images)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """aug(x) for float images in [0, 1], round-tripped through uint8 as torchvision's
        ConvertImageDtype does (the reference)."""
        images = convert_image_dtype(x.contiguous(), torch.uint8)
        return convert_image_dtype(self.augment_uint8(images), x.dtype)

    def distract(self, state: TrainState, flagged: torch.Tensor) -> torch.Tensor:
        """The batch with the flagged images augmented round by round."""
        assert self.beta is not None and self.rounds is not None, "setup() not called"
        x, y = state.x.clone(), state.y
        idx = flagged.nonzero().squeeze(1)
        for n in range(1, self.rounds + 1):
            if idx.numel() == 0:
                break
            current = x[idx]
            aug = self.augment(current)
            if n == self.rounds:  # the last round takes aug(x) outright
                x[idx] = aug
                break
            leave = natural_loss(state, aug, y[idx], self.update_bn) >= self.tau
            blend = (1 - self.beta) * current + self.beta * aug
            x[idx] = torch.where(leave[:, None, None, None], aug, blend)
            idx = idx[~leave]
        return x

    def before_attack(self, state: TrainState) -> None:
        if not self.active(state):
            return
        if self.generator is None:
            raise RuntimeError("dom_da: no random stream; call bind_random_stream first")
        flagged = self.batch_natural_loss(state) <= self.tau
        state.log("dom_da.flagged", flagged.float().mean())
        with seeded_global_rng(self.generator, state.x.device):
            state.x = self.distract(state, flagged)
