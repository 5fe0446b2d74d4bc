"""CURE: Conserve-Update-Revise (Gowda, Zonooz & Arani, "Conserve-Update-Revise to Cure
Generalization and Robustness Trade-off in Adversarial Training", ICLR 2024).
Algorithm and choices: this docstring and the card.

Moving from standard to adversarial training, updating only the weights with prominent
gradients and conserving the rest learns better; a stochastically revised copy of the
network consolidates what was learned. The network starts from a model trained on clean
data (the engine's clean-model service: the suite's `standard` method, same
architecture and seed, trained once and cached); the revision model starts as a copy.
Per batch, with x_adv from the suite's TRADES attack (KL, the `trades` method):

  L_adv = CE(f(x), y) + beta KL(p(x) || p(x_adv))                    (beta = 1)
  L_CR  = KL(p_rev(x) || p(x)) + KL(p_rev(x_adv) || p(x_adv))        (rev detached)
  L     = L_adv + gamma L_CR;  backward
  conserve: per layer (parameter tensor), zero the gradient of the `percent` % of the
    weights with the lowest prominence alpha_c |dCE(x)/dw| + (1 - alpha_c) |dCE(x_adv)/dw|
    (two extra backwards, through the engine's `term_grads` capability);
  optimizer step (conserved weights still move through momentum and weight decay);
  revise: with probability r, theta_rev <- d theta_rev + (1 - d) theta (parameters only).

`mode="rgp"` is the reference code's variant: loss alpha_c CE(x) + (1 - alpha_c) CE(x_adv)
+ gamma L_CR, the mask scored by |grad| of that total loss (no extra backward), the last
linear layer never masked, and the EMA decay min(1 - 1/(t + 1), d) after t steps.

Engine-specific choices: a layer is a parameter tensor (weights, biases and BatchNorm
affine parameters alike; the paper says "layer" and the reference masks per parameter);
exactly round(percent/100 * n) entries are conserved per layer, the lowest scores first
(ties by position), where the reference's `< np.percentile` conserves fewer on ties; the
revision model runs in train mode (batch statistics, its own BatchNorm running statistics
updated by its forwards, as in the reference) and is evaluated in eval mode with them;
the gate of the revision update is drawn from the defense's own random stream.
`eval_models` adds the revision model (`cure.revision`); the student is the row.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ConfigError
from bench.state import TrainState
from defenses._cure_ops import (
    conserve_,
    consistency,
    last_linear_parameters,
    prominence,
    revise_,
    revision_decay,
    rgp_objective,
    trades_objective,
)
from defenses.base import Defense, DefenseCard, register_defense
from defenses.published import BEST_NOT_STATED, FULL_TRAIN, entries

MODES = ("paper", "rgp")
PER_ARCHITECTURE = {  # Table 9 / Appendix F.1: percent, alpha_c, gamma
    "PreActResNet-18, CIFAR-10": {"percent": 20, "alpha_c": 0.2, "gamma": 1.0},
    "ResNet-18, CIFAR-10/100": {"percent": 30, "alpha_c": 0.1, "gamma": 1.0},
    "ResNet-18, SVHN": {"percent": 30, "alpha_c": 0.2, "gamma": 1.0},
    "WRN-34-10, CIFAR-10/100": {"percent": 50, "alpha_c": 0.3, "gamma": 0.5},
}


def _number(key: str, value: Any, low: float, high: float = math.inf) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not low <= value <= high):
        span = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ConfigError(f"cure: {key} must be a finite number {span}, got {value!r}")
    return float(value)


@register_defense("cure")
class CURE(Defense):
    card = DefenseCard(
        name="CURE",
        paper=("Gowda, Zonooz & Arani. Conserve-Update-Revise to Cure Generalization and "
               "Robustness Trade-off in Adversarial Training"),
        venue="ICLR 2024",
        link="https://arxiv.org/abs/2401.14948",
        reference_code="https://github.com/NeurAI-Lab/CURE",
        hyperparameters={
            "training": {"epochs": 200, "lr": 0.1, "optimizer": "SGD momentum 0.9",
                         "attack": "TRADES KL, PGD-10, eps 8/255, step eps/4",
                         "beta (TRADES)": 1.0},
            "revision": {"revision_rate (r)": 0.2, "revision_decay (d)": 0.999},
            "per architecture (percent, alpha_c, gamma)": PER_ARCHITECTURE,
            "variant": "mode=paper (Eqs. 4-8) by default; mode=rgp is the reference code's",
        },
        published=(
            *(entry for label, method, defenses, values in (
                ("CURE", "trades", ("cure",), (86.76, 54.92, 49.69)),
                ("TRADES", "trades", (), (82.41, 52.76, 48.37)))
              for entry in entries(
                {"method": method, "defenses": defenses, "label": label,
                 "architecture": "ResNet-18", "epochs": 200, "selection": "none",
                 "data_split": "50k train", "source": "the paper's main CIFAR-10 table",
                 "note": "the checkpoint is not recorded here; taken as the final model",
                 "differences": ("architecture: ResNet-18; ROBench's CIFAR-10 suites use "
                                 "PreActResNet-18 or WRN-34-10",)},
                ("clean", "final-only", values[0]), ("pgd20", "final-only", values[1]),
                ("autoattack", "final-only", values[2]))),
            *entries(
                {"method": "trades", "defenses": ("cure",), "label": "CURE", "epochs": 200,
                 "selection": "none", "data_split": "50k train; only the final model evaluated",
                 "source": "the paper's robust-overfitting table (PreActResNet-18)",
                 "suite": "cifar10-linf",
                 "note": "the table shows the same number as best and as last",
                 "differences": (FULL_TRAIN, "checkpoint: the paper evaluates only the final "
                                 "model; compared with ROBench's last")},
                ("clean", "final-only", 86.54), ("autoattack", "final-only", 50.23)),
            *(entry for label, defenses, params, values in (
                ("AT", (), {}, (82.50, 83.99, 48.21, 42.46)),
                ("AWP", ("awp",), {}, (83.33, 84.39, 50.57, 49.95)),
                ("IDBH", ("idbh",), {"idbh": {"variant": "strong"}},
                 (83.96, 84.92, 50.74, 49.99)))
              for entry in entries(
                {"method": "at", "defenses": defenses, "params": params, "label": label,
                 "epochs": 200, "selection": "not stated", "data_split": "50k train",
                 "source": "quoted in the paper's robust-overfitting table (PreActResNet-18)",
                 "suite": "cifar10-linf", "differences": (FULL_TRAIN, BEST_NOT_STATED)},
                ("clean", "best", values[0]), ("clean", "last", values[1]),
                ("autoattack", "best", values[2]), ("autoattack", "last", values[3]))),
        ),
        extra_data=("a warm start: a model trained on clean data (the suite's `standard` "
                    "method, same architecture and seed), trained once per seed by the "
                    "engine's clean-model service and cached; its cost is charged to the row"),
        notes=("Default mode=paper: the paper's Eqs. 4-8 (TRADES beta = 1, prominence from "
               "|dCE(x)/dw| and |dCE(x_adv)/dw|, two extra backwards per batch); mode=rgp: "
               "the reference code's variant. Conserves exactly round(percent% of n) entries "
               "per parameter tensor. Overhead per batch: 2 forwards of the revision model "
               "(gamma > 0), 2 backwards (paper mode), a sort per parameter tensor, an EMA "
               "update with probability r. Evaluated twice: the student (the row) and the "
               "revision model ('cure.revision')."),
    )
    params = {"percent": 20.0, "alpha_c": 0.2, "gamma": 1.0, "beta": 1.0,
              "revision_rate": 0.2, "revision_decay": 0.999, "mode": "paper",
              "warm_start": True}
    methods = ("trades",)
    extra_models = ("revision",)
    slots = ("objective", "update")
    capabilities = ("term_grads", "clean_model")

    def __init__(self, percent: float = 20.0, alpha_c: float = 0.2, gamma: float = 1.0,
                 beta: float = 1.0, revision_rate: float = 0.2, revision_decay: float = 0.999,
                 mode: str = "paper", warm_start: bool = True) -> None:
        super().__init__(percent=percent, alpha_c=alpha_c, gamma=gamma, beta=beta,
                         revision_rate=revision_rate, revision_decay=revision_decay, mode=mode,
                         warm_start=warm_start)
        self.percent = _number("percent", percent, 0.0, 100.0)
        self.alpha_c = _number("alpha_c", alpha_c, 0.0, 1.0)
        self.gamma = _number("gamma", gamma, 0.0)
        self.beta = _number("beta", beta, 0.0)
        self.revision_rate = _number("revision_rate", revision_rate, 0.0, 1.0)
        self.revision_decay = _number("revision_decay", revision_decay, 0.0, 1.0)
        if isinstance(mode, bool) or mode not in MODES:
            raise ConfigError(f"cure: mode must be one of {list(MODES)}, got {mode!r}")
        if not isinstance(warm_start, bool):
            raise ConfigError(f"cure: warm_start must be true or false, got {warm_start!r}")
        self.mode, self.warm_start = mode, warm_start
        # ask only for what this configuration uses
        self.capabilities = tuple(
            c for c, used in (("term_grads", mode == "paper" and self.percent > 0),
                              ("clean_model", warm_start)) if used)
        self.revision: nn.Module | None = None
        self._logits: tuple[torch.Tensor, torch.Tensor] | None = None  # this batch's

    # ---- start ----------------------------------------------------------------------
    def setup(self, state: TrainState) -> None:
        """Warm-start the student from the clean model (fresh runs), then copy it into the
        revision model (a checkpoint's values replace both on resume)."""
        if self.warm_start and state.clean_model is not None:
            state.model.load_state_dict(state.clean_model.state_dict())
        self.revision = copy.deepcopy(state.model).requires_grad_(False).train()

    def _revision(self) -> nn.Module:
        if self.revision is None:
            raise RuntimeError("cure: setup() was not called (no revision model)")
        return self.revision

    # ---- objective --------------------------------------------------------------------
    def objective_loss(self, state: TrainState) -> torch.Tensor:
        assert state.x is not None and state.x_adv is not None and state.y is not None
        logits_clean = state.model(state.x).float()
        logits_adv = state.model(state.x_adv).float()
        state.counter.add(fwd=2)
        state.logits = logits_adv
        self._logits = (logits_clean, logits_adv)
        if self.mode == "paper":
            return trades_objective(logits_clean, logits_adv, state.y, self.beta)
        return rgp_objective(logits_clean, logits_adv, state.y, self.alpha_c)

    def add_losses(self, state: TrainState) -> dict[str, torch.Tensor] | None:
        if self.gamma == 0:
            return None
        assert self._logits is not None, "cure: objective_loss did not run"
        revision = self._revision().train()
        with torch.no_grad(), state.autocast():
            targets = revision(state.x).float(), revision(state.x_adv).float()
        state.counter.add(fwd=2)
        return {"consistency": self.gamma * consistency(*self._logits, *targets)}

    # ---- conserve ---------------------------------------------------------------------
    def gradient_terms(self, state: TrainState) -> dict[str, torch.Tensor] | None:
        if "term_grads" not in self.capabilities:
            return None
        assert self._logits is not None and state.y is not None
        logits_clean, logits_adv = self._logits
        return {"ce_clean": F.cross_entropy(logits_clean, state.y),
                "ce_adv": F.cross_entropy(logits_adv, state.y)}

    def after_backward(self, state: TrainState) -> None:
        if self.percent == 0:
            return
        params = [p for p in state.model.parameters() if p.requires_grad]
        if self.mode == "paper":
            grads_clean = state.term_grads[f"{self.name}.ce_clean"]
            grads_adv = state.term_grads[f"{self.name}.ce_adv"]
            scores = [prominence(gc, ga, self.alpha_c)
                      for gc, ga in zip(grads_clean, grads_adv, strict=True)]
            conserve_(params, scores, self.percent)
            return
        classifier = {id(p) for p in last_linear_parameters(state.model)}
        masked = [p for p in params if id(p) not in classifier and p.grad is not None]
        conserve_(masked, [p.grad.abs() for p in masked], self.percent)

    # ---- revise -----------------------------------------------------------------------
    def after_step(self, state: TrainState) -> None:
        if self.generator is None:
            raise RuntimeError("cure: no random stream; call bind_random_stream first")
        u = torch.rand((), generator=self.generator, device=self.generator.device)
        gate = (u < self.revision_rate).to(state.device)
        decay = revision_decay(self.mode, self.revision_decay, state.step + 1)
        revise_(self._revision(), state.model, decay, gate)
        state.log("cure.revised", gate.float())
        self._logits = None

    def eval_models(self, state: TrainState) -> dict[str, nn.Module]:
        return {} if self.revision is None else {"revision": self.revision}
