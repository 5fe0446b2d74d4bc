"""DOM-DA: the augmentation half of DOM (Lin, Yu, Han & Liu, "On the Over-Memorization
During Natural, Robust and Catastrophic Overfitting", ICLR 2024); see `defenses/dom.py`
for the method, the shared threshold and warm-up, and the engine-specific choices, and
docs/defenses/dom_da.md for the algorithm, its hyperparameters, the differences from the
authors' code and the published numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms.functional import convert_image_dtype

from bench.config import ConfigError
from bench.state import TrainState, fixed_convolution_algorithms, seeded_global_rng
from defenses._dom_da_batched import BatchedAugment
from defenses.base import DefenseCard, register_defense
from defenses.card import BEST_NOT_STATED, FULL_TRAIN, row
from defenses.dom import (
    _BASELINES,
    _CODE,
    _DOM,
    _LINK,
    _PAPER,
    _SHARED_HYPERPARAMETERS,
    AUGMENTATIONS,
    METHODS,
    PUBLISHED_DA,
    PUBLISHED_TAU,
    _flag,
    _number,
    natural_loss,
)


def _rounds(defense: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{defense}: rounds must be an integer >= 1, got {value!r}")
    return value



def build_transform(aug: str) -> BatchedAugment:
    """torchvision's AugMix() or RandAugment() with their default settings (as the
    reference), batched and without host syncs (defenses/_dom_da_batched.py)."""
    return BatchedAugment(aug)


def _like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x in the memory format of `like`."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x


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
            **_SHARED_HYPERPARAMETERS,
            "beta / rounds (CIFAR-10)": {f"{m} {a}": list(v) for (m, a), v in
                                         PUBLISHED_DA.items()},
            "beta / rounds (CIFAR-100, where they differ)":
                {"standard augmix": [0.5, 2], "standard randaugment": [0.1, 2]},
            "transforms": "torchvision AugMix() / RandAugment() defaults, on uint8",
        },
        published=(
            *_BASELINES,
            *(entry for aug, name, at_best, at_last, fgsm_last, error in (
                ("augmix", "AugMix", (80.87, 53.54, 47.98), (84.15, 49.31, 45.51),
                 (84.31, 45.15, 41.16), (4.13, 4.24)),
                ("randaugment", "RandAugment", (83.49, 52.83, 48.41), (83.74, 50.39, 46.62),
                 (84.52, 50.10, 42.53), (3.96, 4.07)))
              for entry in (
                *row({"method": "at", "defenses": ("dom_da",), "params": {"dom_da": {"aug": aug}},
                      "label": f"AT+DOM_DA ({name})", "epochs": 200, "runs": 3,
                      "data_split": "50k train", "source": "the DOM paper",
                      "suite": "cifar10-linf", "differences": (FULL_TRAIN, BEST_NOT_STATED)},
                     ("clean", "pgd20", "autoattack"), best=at_best, last=at_last),
                *row({"method": "fgsm_rs", "defenses": ("dom_da",),
                      "params": {"dom_da": {"aug": aug}}, "label": f"RS-FGSM+DOM_DA ({name})",
                      "epochs": 100, "runs": 3, "selection": "none",
                      "data_split": "50k train; last checkpoint", "source": "the DOM paper",
                      "suite": "cifar10-fast",
                      "differences": (FULL_TRAIN, "schedule: the paper trains 100 epochs "
                                      "(cyclic lr to 0.2); cifar10-fast trains 30")},
                     ("clean", "pgd20", "autoattack"), last=fgsm_last),
                *row({"method": "standard", "defenses": ("dom_da",),
                      "params": {"dom_da": {"aug": aug}},
                      "label": f"natural training + DOM_DA ({name})", "epochs": 300, "runs": 3,
                      "data_split": "50k train", "source": "the DOM paper",
                      "differences": ("natural training for 300 epochs: no ROBench suite "
                                      "runs it",)},
                     ("test_error",), best=error[:1], last=error[1:]))),
        ),
        extra_data="none",
        notes=("beta and rounds default to the published values for the base method and "
               "the chosen transform. As the reference, each round transforms the sub-batch "
               "still flagged with torchvision's transform (one draw of operations shared by "
               "it), run batched and without host syncs (the same output bit for bit); "
               "per_image = true draws per image instead (batched, on the device), "
               "static_shapes = true keeps the batch's shape (forwards the whole batch: "
               "other losses and BatchNorm statistics than the reference). The reference's "
               "tau is the same --clamp as DOM-RE's. Overhead after the warm-up: one extra "
               "forward per batch plus one forward of the still-flagged images in each round "
               "but the last, and the transforms. See docs/defenses/dom_da.md."),
    )
    params = {"tau": PUBLISHED_TAU["at"], "warmup": 0.5, "aug": "randaugment",
              "beta": None, "rounds": None, "per_image": False, "update_bn": True,
              "static_shapes": False}
    slots = ("augmentation",)

    def __init__(self, tau: float, warmup: float, aug: str = "randaugment",
                 beta: float | None = None, rounds: int | None = None,
                 per_image: bool = False, update_bn: bool = True,
                 static_shapes: bool = False) -> None:
        super().__init__(tau=tau, warmup=warmup, update_bn=update_bn, aug=aug, beta=beta,
                         rounds=rounds, per_image=per_image, static_shapes=static_shapes)
        if aug not in AUGMENTATIONS:
            raise ConfigError(f"dom_da: aug must be one of {list(AUGMENTATIONS)}, got {aug!r}")
        self.aug = aug
        self.beta = None if beta is None else _number("dom_da", "beta", beta, 0.0, 1.0)
        self.rounds = _rounds("dom_da", rounds)
        self.per_image = _flag("dom_da", "per_image", per_image)
        self.static_shapes = _flag("dom_da", "static_shapes", static_shapes)
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
        """The transform on a uint8 N x C x H x W batch: torchvision's call on the whole
        batch (operations shared, as in the reference; the default; the same output bit
        for bit), or one draw per image (batched)."""
        if self.per_image:
            return self.transform.per_image(images, self.generator)
        return self.transform.shared(images)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """aug(x) for float images in [0, 1], round-tripped through uint8 as torchvision's
        ConvertImageDtype does (the reference)."""
        images = convert_image_dtype(x.contiguous(), torch.uint8)
        return convert_image_dtype(self.augment_uint8(images), x.dtype)

    def distract(self, state: TrainState, flagged: torch.Tensor) -> torch.Tensor:
        """The batch with the flagged images augmented round by round. As the reference,
        each round transforms and forwards only the sub-batch still flagged (its size
        changes every round and step: one host sync per round for it); with
        `static_shapes`, `distract_static`."""
        assert self.beta is not None and self.rounds is not None, "setup() not called"
        if self.static_shapes:
            return self.distract_static(state, flagged)
        with fixed_convolution_algorithms():  # a new sub-batch size nearly every round
            return self._distract_sub_batches(state, flagged)

    def _distract_sub_batches(self, state: TrainState, flagged: torch.Tensor) -> torch.Tensor:
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

    def distract_static(self, state: TrainState, flagged: torch.Tensor) -> torch.Tensor:
        """`distract` with the batch's shape throughout and no host sync: every round
        transforms the whole batch, forwards aug(x) of the whole batch, and updates only
        the images still flagged (torch.where); all rounds run. The images each flagged
        image gets equal `distract`'s where the model's losses do not depend on the
        batch's composition (no train-mode BatchNorm) and the draw is shared by the batch
        (RandAugment); otherwise the losses, BatchNorm statistics and AugMix's mixing
        weights (drawn for the whole batch) differ: docs/defenses/dom_da.md."""
        x, y = state.x.clone(), state.y
        still = flagged[:, None, None, None]
        for n in range(1, self.rounds + 1):
            aug = self.augment(x)
            if n == self.rounds:
                x = torch.where(still, aug, x)
                break
            leave = (natural_loss(state, aug, y, self.update_bn) >= self.tau)[:, None, None, None]
            blend = (1 - self.beta) * x + self.beta * aug
            x = torch.where(still, torch.where(leave, aug, blend), x)
            still = still & ~leave
        return _like(x, state.x)

    def before_attack(self, state: TrainState) -> None:
        if not self.active(state):
            return
        if self.generator is None:
            raise RuntimeError("dom_da: no random stream; call bind_random_stream first")
        flagged = self.batch_natural_loss(state) <= self.tau
        state.log("dom_da.flagged", flagged.float().mean())
        if self.per_image:  # drawn on the device from the defense's own stream
            state.x = self.distract(state, flagged)
            return
        # torchvision's draws come from the global generators: seeded from the stream
        # (a host read of one number from it: one sync per step on CUDA)
        with seeded_global_rng(self.generator, state.x.device):
            state.x = self.distract(state, flagged)
