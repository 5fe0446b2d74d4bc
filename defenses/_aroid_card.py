"""AROID's DefenseCard (defenses/aroid.py: paper, reference code, the published recipe)
and the checks of its parameters."""

from __future__ import annotations

import math
from typing import Any

from bench.config import ConfigError
from defenses._aroid_space import COLOUR, HEADS
from defenses.base import DefenseCard

PAPER = ("Li, Qiu & Spratling. AROID: Improving Adversarial Robustness Through Online "
         "Instance-Wise Data Augmentation")

CARD = DefenseCard(
    name="AROID",
    paper=PAPER,
    venue="IJCV 2024",
    link="https://arxiv.org/abs/2306.07197",
    reference_code="https://github.com/TreeLLi/AROID",
    hyperparameters={
        "search space (heads, classes)": dict(HEADS),
        "colour/shape ops": {op: size for op, (_, size) in zip(COLOUR.ops, COLOUR.groups)},
        "policy network": "PreActResNet-18 backbone (random init), one linear head per "
                          "transform; input the un-augmented batch",
        "vulnerability": "CE(f(PGD(x^))) - CE(f(x^)), PGD 2 steps of eps/4 from zero, "
                         "target in eval mode",
        "affinity": "max(0, CE(f_aff(x^)) - CE(f_aff(x))), f_aff trained on clean data "
                    "without augmentation (reference: 40 epochs, lr decays at 20 and 30; "
                    "ours: 40/200 of the suite's epochs, decays at 50% and 75%), same "
                    "architecture as the target",
        "lambda per lr stage (CIFAR-10, WRN-34-10 recipe)": [0.4, 0.2, 0.1],
        "diversity": {"beta_div": 0.8, "(l, u)": [0.1, 0.3],
                      "normalisation": "one pooled count of out-of-band entries per head "
                                       "(reference code)",
                      "colour head": "at the op level and within each op, joint "
                                     "log-probabilities at both levels (reference code)"},
        "REINFORCE": {"T (trajectories)": 8, "baseline": "per-image mean over T"},
        "policy update": {"every K iterations": 5, "batch": "fresh, separate sampler",
                          "optimizer": "SGD lr 1e-3, momentum 0.9, no weight decay",
                          "gradient norm clip": 1.0},
        "warm-up": "5 epochs with no augmentation at all",
        "training": "PGD-AT (the reference's attack has no random start)",
        "note": ("the reference's command-line defaults disable diversity (div_coef 0, "
                 "limits 0.5/2) and leave lambda unset; the recipe values above are the ones "
                 "published for CIFAR-10 (README: --aff_coef 0.4 0.2 0.1 --div_coef 0.8 "
                 "--div_limits 0.1 0.3)"),
    },
    published=(),  # no number verified yet: see published_notes
    published_notes={
        "CIFAR-10, PreActResNet-18 and WideResNet-34-10, best and end checkpoints, clean "
        "and AutoAttack accuracy": "see the paper's tables (numbers not yet verified here)",
        "cost": "about +40-50% over PGD-AT",
        "combinations": "AT+AROID+AWP is reported in the paper",
    },
    extra_data=("the affinity model: a model of the suite's architecture trained on clean, "
                "un-augmented data (the `standard` method, same seed, 40/200 of the suite's "
                "epochs with lr decays at 50% and 75%; the engine's clean-model service "
                "trains it once per recipe and caches it); its cost is charged to the row"),
    notes=("Replaces the suite's augmentation of each training batch (raw_batch) with the "
           "policy's per-image choice, applied with batched on-device ops; the suite's attack "
           "is used for the vulnerability reward with explicit overrides (2 steps, eps/4, no "
           "random start, eval-mode BatchNorm). Overhead per batch: one policy forward; every "
           "K batches one update: T x (2-step PGD + 2 target forwards + 1 affinity forward) "
           "+ 1 affinity forward + a policy forward/backward, the T trajectories run as one "
           "batch of T x N images (the reference loops over them; same draws, same rewards). "
           "Only the target is evaluated. "
           "Follows the authors' code where it and the paper's prose differ: the diversity "
           "term pools one count per head and uses joint log-probabilities within an op "
           "(the prose reads as a mean above plus a mean below). The affinity model trains "
           "for 40/200 of the suite's epochs (40, as the reference, on 200-epoch suites), "
           "without augmentation. Differences and the published protocol: "
           "docs/defenses/aroid.md."),
)


def check_integer(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"aroid: {key} must be an integer >= {low}, got {value!r}")
    return value


def check_number(key: str, value: Any, low: float, high: float = math.inf,
                 high_open: bool = False, low_open: bool = False) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, int | float)
          and math.isfinite(value) and (value > low if low_open else value >= low)
          and (value < high if high_open else value <= high))
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise ConfigError(f"aroid: {key} must be a finite number in {lo}{low}, {high}{hi}, "
                          f"got {value!r}")
    return float(value)


def parse_lambdas(value: Any) -> tuple[float, ...]:
    """lambda per learning-rate stage: a number (every stage), a list of numbers, or a
    string of numbers separated by ';' or spaces ("0.4;0.2;0.1" on the command line)."""
    items = value
    if isinstance(value, str):
        items = [v for v in value.replace(";", " ").split() if v]
        try:
            items = [float(v) for v in items]
        except ValueError:
            items = None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        items = [value]
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"aroid: lambdas must be a number, a list of numbers or a string "
                          f"like '0.4;0.2;0.1' (one per learning-rate stage), got {value!r}")
    return tuple(check_number("lambdas", v, 0.0) for v in items)
