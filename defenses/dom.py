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

Engine-specific choices:
- The natural loss is computed only after the warm-up (the reference computes it every
  batch), so before the warm-up a run is the plain method bit for bit. It uses the model
  in its training mode, under the engine's autocast, without a graph.
- BatchNorm running statistics: the reference's clean forward and its augmentation
  forwards update them; `update_bn = true` (default) does the same, `false` restores
  them after each extra forward.
- `dom_da` skips the forward of the last round: every image still flagged then takes
  aug(x) whatever its loss (the reference computes that loss; only its BatchNorm
  statistics would differ).
- Randomness: `per_image = false` (default) transforms the sub-batch still flagged once
  per round, as the reference (one draw of operations and magnitudes shared by the
  sub-batch; AugMix still draws per-image mixing weights), with torchvision's draws from
  torch's global CPU generator (operation indices, magnitudes, signs, AugMix depths) and,
  for AugMix's Dirichlet mixing weights, the default generator of the images' device.
  Both are seeded from a number drawn from the defense's own stream (`self.generator`)
  before the transforms run and restored afterwards, so the augmentations are
  reproducible (and resumable), and adding the defense never shifts any other
  randomness of the run. `true` draws per image, on the device, from `self.generator`
  directly. The transforms are torchvision's, batched and without host syncs
  (`defenses/_dom_da_ops.py` and `defenses/_dom_da_batched.py`; the default's output
  equals torchvision's bit for bit).
- The warm-up is checked at the start of each batch with the engine's fractional epoch
  (the reference counts the batch as finished, one batch earlier).
- Thresholds: the paper's Table 1 gives one loss threshold per method and dataset,
  used by both operations (CIFAR-10 / CIFAR-100): natural 0.2 / 0.45, PGD-AT 1.5 / 4.0,
  RS-FGSM 2.0 / 4.6; the defaults are the CIFAR-10 values. A suite sets its own
  (`[defenses.dom_re] tau = ...`), since tau depends on the loss scale of the suite.

The project's documentation: docs/defenses/dom_re.md (DOM-RE) and docs/defenses/dom_da.md.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from bench.config import ConfigError
from bench.state import TrainState, preserved_bn_stats
from defenses.base import Defense, DefenseCard, register_defense
from defenses.card import BEST_NOT_STATED, FULL_TRAIN, row

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
_SHARED_HYPERPARAMETERS = {
    "warmup": "K = E/2 (0.5 of training: the first lr decay, or the cyclic peak)",
    "tau (CIFAR-10)": dict(PUBLISHED_TAU),
    "tau (CIFAR-100)": dict(PUBLISHED_TAU_CIFAR100),
}
# The paper's baselines (CIFAR-10, PreActResNet-18, 3 seeds), on both DOM cards.
_BASELINES = (
    *row({"method": "at", "label": "PGD-AT", "epochs": 200, "runs": 3, "data_split": "50k train",
          "source": "the DOM paper", "suite": "cifar10-linf",
          "differences": (FULL_TRAIN, BEST_NOT_STATED)},
         ("clean", "pgd20", "autoattack"), best=(81.70, 52.33, 48.02),
         last=(83.59, 45.16, 42.70)),
    *row({"method": "fgsm_rs", "label": "RS-FGSM", "epochs": 100, "runs": 3,
          "selection": "none", "data_split": "50k train; last checkpoint",
          "source": "the DOM paper", "suite": "cifar10-fast",
          "note": "catastrophic overfitting",
          "differences": (FULL_TRAIN, "schedule: the paper trains 100 epochs (cyclic lr to "
                          "0.2); cifar10-fast trains 30")},
         ("clean", "pgd20", "autoattack"), last=(87.77, 0.0, 0.0)),
    *row({"method": "standard", "label": "natural training", "epochs": 300, "runs": 3,
          "data_split": "50k train", "source": "the DOM paper",
          "differences": ("natural training for 300 epochs: no ROBench suite runs it",)},
         ("test_error",), best=(4.70,), last=(4.84,)),
)


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
            **_SHARED_HYPERPARAMETERS,
            "rule": "keep_i = 1[natural loss_i >= tau]; mean over the full batch",
        },
        published=(
            *_BASELINES,
            *row({"method": "at", "defenses": ("dom_re",), "label": "AT+DOM_RE", "epochs": 200,
                  "runs": 3, "data_split": "50k train", "source": "the DOM paper",
                  "suite": "cifar10-linf", "differences": (FULL_TRAIN, BEST_NOT_STATED)},
                 ("clean", "pgd20", "autoattack"), best=(80.23, 55.48, 42.87),
                 last=(80.66, 52.52, 32.90)),
            *row({"method": "fgsm_rs", "defenses": ("dom_re",), "label": "RS-FGSM+DOM_RE",
                  "epochs": 100, "runs": 3, "selection": "none",
                  "data_split": "50k train; last checkpoint", "source": "the DOM paper",
                  "suite": "cifar10-fast",
                  "differences": (FULL_TRAIN, "schedule: the paper trains 100 epochs (cyclic "
                                  "lr to 0.2); cifar10-fast trains 30")},
                 ("clean", "pgd20", "autoattack"), last=(71.66, 47.09, 17.10)),
            *row({"method": "standard", "defenses": ("dom_re",),
                  "label": "natural training + DOM_RE", "epochs": 300, "runs": 3,
                  "data_split": "50k train", "source": "the DOM paper",
                  "differences": ("natural training for 300 epochs: no ROBench suite runs it",)},
                 ("test_error",), best=(4.55,), last=(4.63,)),
        ),
        extra_data="none",
        notes=("Strong on PGD-20, weak on AutoAttack: 55.48 vs 42.87 (best) and 52.52 vs "
               "32.90 (last) with PGD-AT, 47.09 vs 17.10 with RS-FGSM. A PGD/AutoAttack gap "
               "of 10 to 30 points is a gradient-masking signature; trust its AutoAttack "
               "numbers, not its PGD ones. Overhead: one extra forward per batch after the "
               "warm-up (the reference computes the natural loss, and updates BatchNorm "
               "with it, from the first batch). See docs/defenses/dom_re.md."),
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
