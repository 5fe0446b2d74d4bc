"""CURE: Conserve-Update-Revise (Gowda, Zonooz & Arani, "Conserve-Update-Revise to Cure
Generalization and Robustness Trade-off in Adversarial Training", ICLR 2024).
The algorithm, its modes, every difference from the paper and from the authors' code, and
the published numbers: docs/defenses/cure.md.

Moving from standard to adversarial training, updating only the weights with prominent
gradients and conserving the rest learns better; a stochastically revised copy of the
network consolidates what was learned. As in the authors' end-to-end script, one schedule
and one optimizer: the first `clean_fraction` of the suite's epochs (0.4: 80 of 200) train
the network on clean data (plain CE on the clean batch; `before_attack` hands the engine the
clean batch as x_adv, so no attack runs), then CURE runs for the rest, the optimizer's
momentum and the lr schedule carrying on; the revision model starts as a copy of the network
(parameters and BatchNorm statistics) at the switch. Per CURE batch, with x_adv from the
suite's TRADES attack (KL, the `trades` method), in the default mode `rgp_soft` (the
released code's mode with per-term gradients):

  L_adv = CE(f(x), y) + beta KL(p(x) || p(x_adv))                    (beta = 5)
  L_CR  = KL(p_rev(x) || p(x)) + KL(p_rev(x_adv) || p(x_adv))        (rev detached)
  L     = L_adv + gamma L_CR;  backward
  conserve: in the first convolution of each residual block only, zero the gradient of the
    `percent` % of the weights with the lowest SIGNED score
    alpha_c dCE(x)/dw + (1 - alpha_c) dKL(p(x) || p(x_adv))/dw
    (two extra backwards, through the engine's `term_grads` capability);
  optimizer step (conserved weights still move through momentum and weight decay);
  revise: with probability r, theta_rev <- d_t theta_rev + (1 - d_t) theta (parameters
    only), d_t = min(1 - 1/(t + 1), d) after t CURE steps.

`mode="paper"` is our reading of the paper's Eqs. 4-8: beta 1; the score
alpha_c |dCE(x)/dw| + (1 - alpha_c) |dCE(x_adv)/dw|; every parameter tensor masked; d_t = d.
`mode="rgp"` is the mode the released end-to-end script switches to: loss
alpha_c CE(x) + (1 - alpha_c) CE(x_adv) + gamma L_CR, the mask scored by |grad| of that
total loss (no extra backward), every parameter tensor but the last linear layer's masked.
`warm_start=True` (with `clean_fraction=0`) is the older recipe: start CURE from a separate
clean model (the engine's clean-model service) with a fresh optimizer.

Engine-specific choices: exactly round(percent/100 * n) entries are conserved per masked
tensor, the lowest scores first (ties by position), where the reference's
`< np.percentile` conserves fewer on ties; the revision model runs in train mode (batch
statistics, its own BatchNorm running statistics updated by its forwards, as in the
reference) and is evaluated in eval mode with them; the gate of the revision update is
drawn from the defense's own random stream (on the device, folded into the update's
weights: no host sync). The masks of all masked tensors come from one sort. Under bf16
autocast the forwards that the consistency compares (student and revision model) run in
fp32. `eval_models` adds the revision model
(`cure.revision`; until the switch it is the initial network); the student is the row.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import ConfigError, Suite
from bench.state import TrainState
from defenses._cure_card import CARD
from defenses._cure_ops import (
    ConserveLayout,
    block_first_convs,
    clean_epochs,
    conserve_,
    consistency,
    flat_logical,
    last_linear_parameters,
    prominence,
    revise_,
    revision_decay,
    rgp_objective,
    signed_prominence,
    trades_kl,
    trades_objective,
)
from defenses.base import Defense, register_defense

MODES = ("rgp_soft", "paper", "rgp")
BETA = {"rgp_soft": 5.0, "paper": 1.0, "rgp": 5.0}  # rgp's loss has no KL term


def _number(key: str, value: Any, low: float, high: float = math.inf) -> float:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or not low <= value <= high):
        span = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ConfigError(f"cure: {key} must be a finite number {span}, got {value!r}")
    return float(value)


@register_defense("cure")
class CURE(Defense):
    card = CARD
    params = {"percent": 20.0, "alpha_c": 0.2, "gamma": 1.0, "beta": None,
              "revision_rate": 0.2, "revision_decay": 0.999, "mode": "rgp_soft",
              "clean_fraction": 0.4, "warm_start": False}
    methods = ("trades",)
    extra_models = ("revision",)
    slots = ("objective", "update")
    capabilities = ("term_grads", "clean_model")

    def __init__(self, percent: float = 20.0, alpha_c: float = 0.2, gamma: float = 1.0,
                 beta: float | None = None, revision_rate: float = 0.2,
                 revision_decay: float = 0.999, mode: str = "rgp_soft",
                 clean_fraction: float = 0.4, warm_start: bool = False) -> None:
        if isinstance(mode, bool) or mode not in MODES:
            raise ConfigError(f"cure: mode must be one of {list(MODES)}, got {mode!r}")
        beta = BETA[mode] if beta is None else beta
        super().__init__(percent=percent, alpha_c=alpha_c, gamma=gamma, beta=beta,
                         revision_rate=revision_rate, revision_decay=revision_decay, mode=mode,
                         clean_fraction=clean_fraction, warm_start=warm_start)
        self.percent = _number("percent", percent, 0.0, 100.0)
        self.alpha_c = _number("alpha_c", alpha_c, 0.0, 1.0)
        self.gamma = _number("gamma", gamma, 0.0)
        self.beta = _number("beta", beta, 0.0)
        self.revision_rate = _number("revision_rate", revision_rate, 0.0, 1.0)
        self.revision_decay = _number("revision_decay", revision_decay, 0.0, 1.0)
        self.clean_fraction = _number("clean_fraction", clean_fraction, 0.0, 1.0)
        if not isinstance(warm_start, bool):
            raise ConfigError(f"cure: warm_start must be true or false, got {warm_start!r}")
        self.mode, self.warm_start = mode, warm_start
        # ask only for what this configuration uses
        self.capabilities = tuple(
            c for c, used in (("term_grads", mode != "rgp" and self.percent > 0),
                              ("clean_model", warm_start)) if used)
        self.revision: nn.Module | None = None
        self.clean_epochs = 0  # set in setup from the suite's epochs
        self.switched = False  # the revision model has been copied from the student
        self.masked: list[int] = []  # rgp_soft: positions of the masked parameters
        self._logits: tuple[torch.Tensor, torch.Tensor] | None = None  # this batch's
        self._layout: ConserveLayout | None = None  # the masks' layout (not checkpointed)

    def check_run(self, method: str, suite: Suite) -> None:
        epochs = suite.train.epochs
        n = clean_epochs(self.clean_fraction, epochs)
        if n >= epochs:
            raise ConfigError(
                f"cure: clean_fraction {self.clean_fraction} makes all {epochs} epochs of "
                f"suite {suite.name!r} clean training, leaving none for CURE; set it below "
                f"{(epochs - 0.5) / epochs:.3f}")

    # ---- start ----------------------------------------------------------------------
    def setup(self, state: TrainState) -> None:
        """Warm-start the student from the clean model (warm_start, fresh runs), copy it into
        the revision model and find the parameters to mask (a checkpoint's values replace
        the revision model and the switch flag on resume)."""
        self.check_run(state.spec.method, state.suite)
        self.clean_epochs = clean_epochs(self.clean_fraction, state.epochs)
        if self.warm_start and state.clean_model is not None:
            state.model.load_state_dict(state.clean_model.state_dict())
        self.revision = copy.deepcopy(state.model).requires_grad_(False).train()
        self.masked = block_first_convs(state.model) if self.mode == "rgp_soft" else []

    def _revision(self) -> nn.Module:
        if self.revision is None:
            raise RuntimeError("cure: setup() was not called (no revision model)")
        return self.revision

    def _clean(self, state: TrainState) -> bool:
        return state.epoch < self.clean_epochs

    def on_epoch_start(self, state: TrainState) -> None:
        """At the first CURE epoch: the revision model becomes a copy of the student."""
        if not self._clean(state) and not self.switched:
            self._revision().load_state_dict(state.model.state_dict())
            self.switched = True

    def before_attack(self, state: TrainState) -> None:
        if self._clean(state):
            state.x_adv = state.x  # clean training: the engine runs no attack

    def _compared(self, state: TrainState) -> contextlib.AbstractContextManager:
        """Where the consistency term compares the student with the revision model (gamma
        > 0, after the clean phase) under mixed precision: the four forwards whose outputs
        it compares run in fp32 (autocast off): bf16 logits of two near-identical models
        differ by rounding more than by the models. fp32 runs: nothing changes."""
        if state.autocast_dtype is None or self.gamma == 0:
            return contextlib.nullcontext()
        return torch.autocast(device_type=state.device.type, enabled=False)

    # ---- objective --------------------------------------------------------------------
    def objective_loss(self, state: TrainState) -> torch.Tensor:
        assert state.x is not None and state.x_adv is not None and state.y is not None
        if self._clean(state):
            logits = state.model(state.x).float()
            state.counter.add(fwd=1)
            state.logits, self._logits = logits, None
            return F.cross_entropy(logits, state.y, reduction="none")
        with self._compared(state):  # fp32 under bf16 autocast (see `_compared`)
            logits_clean = state.model(state.x).float()
            logits_adv = state.model(state.x_adv).float()
        state.counter.add(fwd=2)
        state.logits = logits_adv
        self._logits = (logits_clean, logits_adv)
        if self.mode == "rgp":
            return rgp_objective(logits_clean, logits_adv, state.y, self.alpha_c)
        return trades_objective(logits_clean, logits_adv, state.y, self.beta)

    def add_losses(self, state: TrainState) -> dict[str, torch.Tensor] | None:
        if self.gamma == 0 or self._clean(state):
            return None
        assert self._logits is not None, "cure: objective_loss did not run"
        revision = self._revision().train()
        with torch.no_grad(), self._compared(state):
            targets = revision(state.x).float(), revision(state.x_adv).float()
        state.counter.add(fwd=2)
        return {"consistency": self.gamma * consistency(*self._logits, *targets)}

    # ---- conserve ---------------------------------------------------------------------
    def gradient_terms(self, state: TrainState) -> dict[str, torch.Tensor] | None:
        if "term_grads" not in self.capabilities or self._clean(state):
            return None
        assert self._logits is not None and state.y is not None
        logits_clean, logits_adv = self._logits
        ce_clean = F.cross_entropy(logits_clean, state.y)
        if self.mode == "paper":
            return {"ce_clean": ce_clean, "ce_adv": F.cross_entropy(logits_adv, state.y)}
        if not self.masked:
            return None  # no residual blocks: nothing to score
        return {"ce_clean": ce_clean, "kl": trades_kl(logits_clean, logits_adv).mean()}

    def after_backward(self, state: TrainState) -> None:
        if self.percent == 0 or self._clean(state):
            return
        params = [p for p in state.model.parameters() if p.requires_grad]
        if self.mode == "rgp_soft":
            if not self.masked:
                return
            grads_ce = state.term_grads[f"{self.name}.ce_clean"]
            grads_kl = state.term_grads[f"{self.name}.kl"]
            masked = [params[i] for i in self.masked]
            score = signed_prominence(flat_logical([grads_ce[i] for i in self.masked]),
                                      flat_logical([grads_kl[i] for i in self.masked]),
                                      self.alpha_c)
        elif self.mode == "paper":
            masked = params
            score = prominence(flat_logical(state.term_grads[f"{self.name}.ce_clean"]),
                               flat_logical(state.term_grads[f"{self.name}.ce_adv"]),
                               self.alpha_c)
        else:
            classifier = {id(p) for p in last_linear_parameters(state.model)}
            masked = [p for p in params if id(p) not in classifier and p.grad is not None]
            if not masked:
                return
            score = flat_logical([p.grad for p in masked]).abs()
        # all masked tensors at once (one sort); the layout is reused from step to step
        self._layout = conserve_(masked, score, self.percent, self._layout)

    # ---- revise -----------------------------------------------------------------------
    def after_step(self, state: TrainState) -> None:
        if self._clean(state):
            return
        if self.generator is None:
            raise RuntimeError("cure: no random stream; call bind_random_stream first")
        u = torch.rand((), generator=self.generator, device=self.generator.device)
        gate = (u < self.revision_rate).to(state.device)
        cure_steps = state.step + 1 - self.clean_epochs * state.batches_per_epoch
        decay = revision_decay(self.mode, self.revision_decay, cure_steps)
        revise_(self._revision(), state.model, decay, gate)
        state.log("cure.revised", gate.float())
        self._logits = None

    def eval_models(self, state: TrainState) -> dict[str, nn.Module]:
        return {} if self.revision is None else {"revision": self.revision}

    # ---- checkpointed besides the modules -------------------------------------------------
    def get_extra_state(self) -> Any:
        return {**super().get_extra_state(), "switched": self.switched}

    def set_extra_state(self, extra: Any) -> None:
        super().set_extra_state(extra)
        self.switched = bool(extra.get("switched", False)) if extra else False
