"""FOMO: Forget to Mitigate Overfitting (Ramkumar, Zonooz & Arani, "The Effectiveness of
Random Forgetting for Robust Generalization", ICLR 2024). The algorithm, every
reconstruction choice, the open questions and the published protocol:
docs/defenses/fomo.md.

Periodically forget part of what the network learned and relearn it, while a slowly
moving stable model consolidates knowledge:
  (a) learning: the method's adversarial loss (PGD-AT);
  (b) consolidation: the stable model holds an EMA of the working model's parameters
      (its BatchNorm buffers copied), updated after every optimizer step;
  (c) forgetting: at the end of every `period`-th epoch until the first learning-rate
      decay, a fresh random fraction `rho` of the eligible (later-layer) kernel entries
      is re-initialised and their momentum reset;
  (d) relearning: from the first forgetting on, the loss adds
      lam * consistency(logits(x_adv), stable_logits(x_adv)), the stable model in eval
      mode and detached.
`eval_models` adds the stable model (`fomo.stable`) to the evaluation. Under bf16
autocast the consistency compares fp32 forwards of both models (one extra forward of the
working model, counted), as bf16 rounding swamps the difference of near-identical models.

RECONSTRUCTED: there is no official code and the paper's
Algorithm 1 and appendix were not available, so every unknown is a parameter whose
default is ROBench's choice, not the paper's: `rho`, `period`, `until`,
`eligible_fraction`, `skip_shortcuts`, `per_layer`, `init`, `ema_decay`,
`ema_update_prob`, `lam`, `consistency`, `consistency_phase`. Randomness (which entries,
their new values, the stochastic EMA gate) comes only from the defense's own stream.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from bench.config import ConfigError, Suite
from bench.state import TrainState
from defenses._fomo_ops import (
    CONSISTENCY_LOSSES,
    INITS,
    consistency_loss,
    eligible_kernels,
    ema_update_,
    forgetting_masks,
    reinitialise_,
    reset_optimizer_state_,
)
from defenses.base import Defense, DefenseCard, register_defense
from defenses.card import entries

PHASES = ("relearn", "always")
DEFAULT_PERIOD_FRACTION = 0.1  # period = 10% of training when left unset

RECONSTRUCTION = {
    "rho": "0.1: fraction of the eligible kernel entries forgotten at each event",
    "period": "10% of training (epochs), rounded, >= 1",
    "until": "the first lr decay (piecewise: first milestone; cyclic: the peak; "
             "constant: never); forgetting at the end of epoch c = k*period < until*E",
    "eligible_fraction": "0.5: the later half of the conv/linear kernels in registration "
                         "order (PRN-18: layer3, layer4 convs, linear)",
    "skip_shortcuts": "true: 1x1 projection shortcuts are not eligible; biases and BN never",
    "per_layer": "true: exactly round(rho*n) entries in each eligible kernel",
    "init": "default: PyTorch's kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))",
    "momentum": "the forgotten entries' momentum buffers are zeroed",
    "ema_decay": "0.999, every step; BN buffers copied",
    "ema_update_prob": "1.0 (the stable model's stochastic update rate, as in the same "
                       "authors' CLS-ER; 1 = every step)",
    "lam": "0.1",
    "consistency": "mse: mean squared difference of the logits on x_adv",
    "consistency_phase": "relearn: from the first forgetting event to the end",
}


def _number(key: str, value: Any, low: float, high: float = math.inf,
            low_open: bool = False, what: str = "") -> float:
    ok = (not isinstance(value, bool) and isinstance(value, int | float)
          and math.isfinite(value) and (low < value if low_open else low <= value)
          and value <= high)
    if not ok:
        span = (f"in {'(' if low_open else '['}{low}, {high}]" if math.isfinite(high)
                else f">= {low}")
        raise ConfigError(f"fomo: {key}{what} must be a finite number {span}, got {value!r}")
    return float(value)


def _choice(key: str, value: Any, valid: tuple) -> Any:
    if isinstance(value, bool) or value not in valid:
        raise ConfigError(f"fomo: {key} must be one of {list(valid)}, got {value!r}")
    return value


def first_decay_fraction(suite: Suite) -> float:
    """Fraction of training at which the learning rate first decreases."""
    t = suite.train
    if t.schedule == "piecewise":
        return min(t.milestones) if t.milestones else 1.0
    if t.schedule == "cyclic":
        return t.cyclic_peak
    return 1.0


def forgetting_epochs(epochs: int, period: int, until: float) -> list[int]:
    """Completed-epoch counts after which the network forgets: k * period < until * E."""
    return [c for c in range(period, epochs, period) if c < until * epochs]


@register_defense("fomo")
class FOMO(Defense):
    card = DefenseCard(
        name="FOMO",
        paper=("Ramkumar, Zonooz & Arani. The Effectiveness of Random Forgetting for Robust "
               "Generalization"),
        venue="ICLR 2024",
        link="https://arxiv.org/abs/2402.11733",
        reference_code=("none: the official repository (github.com/NeurAI-Lab/FOMO) holds "
                        "only a README and a figure; the README's training command names "
                        "scripts absent from it, of another method (selective forgetting "
                        "with SNIP), and was not used"),
        hyperparameters={
            "published training setup": {
                "epochs": 200, "optimizer": "SGD momentum 0.9, weight decay 5e-4, lr 0.1",
                "split": "training set split 9:1 into train/validation (best = validation)",
                "protocol": "RWP/AWP code base (Rice et al.), PGD-10, eps 8/255",
                "base loss": "PGD-AT",
            },
            "not public": ("forgetting fraction, eligible layers, re-initialisation, period, "
                           "EMA decay, consistency loss form and weight (Algorithm 1 and the "
                           "appendix were not available)"),
            "ROBench reconstruction (defaults, not published)": RECONSTRUCTION,
        },
        published=entries(
            {"method": "at", "defenses": ("fomo",), "label": "AT+FOMO", "epochs": 200,
             "runs": 3, "selection": "validation",
             "data_split": "training set split 9:1 into train/validation; best picked on "
                           "the validation split",
             "source": "a secondary source, not the paper's table", "suite": "cifar10-linf",
             "differences": (
                 "data: the paper trains on 90% of the training set and selects on the other "
                 "10%; ROBench trains on 49k and selects on 1k",
                 "FOMO's unpublished details are ROBench's reconstruction (see the card's "
                 "hyperparameters)")},
            ("autoattack", "best", 51.37), ("autoattack", "last", 51.28)),
        extra_data="none",
        notes=("RECONSTRUCTED from the paper's description; no official code; the parameters "
               "are ROBench's choices (see 'ROBench reconstruction'), each overridable. "
               "Evaluated twice: the working model (the row) and the EMA stable model "
               "('fomo.stable'). Overhead: one forward of the stable model per batch while "
               "the consistency term is on (under bf16 autocast both compared forwards "
               "run in fp32: the stable model's and a second one of the working model), "
               "one EMA update per step (foreach operations), and a re-draw of the "
               "eligible kernels at each forgetting event. The published numbers come from "
               "a secondary source and do not say which model (working or stable) they are "
               "for. See docs/defenses/fomo.md."),
    )
    params = {"rho": 0.1, "period": None, "until": None, "eligible_fraction": 0.5,
              "skip_shortcuts": True, "per_layer": True, "init": "default",
              "ema_decay": 0.999, "ema_update_prob": 1.0, "lam": 0.1,
              "consistency": "mse", "consistency_phase": "relearn"}
    methods = ("at",)
    extra_models = ("stable",)

    def __init__(self, rho: float = 0.1, period: int | None = None, until: float | None = None,
                 eligible_fraction: float = 0.5, skip_shortcuts: bool = True,
                 per_layer: bool = True, init: str = "default", ema_decay: float = 0.999,
                 ema_update_prob: float = 1.0, lam: float = 0.1, consistency: str = "mse",
                 consistency_phase: str = "relearn") -> None:
        super().__init__(rho=rho, period=period, until=until,
                         eligible_fraction=eligible_fraction, skip_shortcuts=skip_shortcuts,
                         per_layer=per_layer, init=init, ema_decay=ema_decay,
                         ema_update_prob=ema_update_prob, lam=lam, consistency=consistency,
                         consistency_phase=consistency_phase)
        self.rho = _number("rho", rho, 0.0, 1.0, what=" (the forgotten fraction)")
        if period is not None and (isinstance(period, bool) or not isinstance(period, int)
                                   or period < 1):
            raise ConfigError(f"fomo: period must be an integer >= 1 (epochs between "
                              f"forgetting events), got {period!r}")
        self.period = period
        self.until = None if until is None else _number(
            "until", until, 0.0, 1.0, what=" (a fraction of training)")
        self.eligible_fraction = _number("eligible_fraction", eligible_fraction, 0.0, 1.0,
                                         low_open=True)
        for key, flag in (("skip_shortcuts", skip_shortcuts), ("per_layer", per_layer)):
            if not isinstance(flag, bool):
                raise ConfigError(f"fomo: {key} must be true or false, got {flag!r}")
        self.skip_shortcuts, self.per_layer = skip_shortcuts, per_layer
        self.init = _choice("init", init, INITS)
        self.ema_decay = _number("ema_decay", ema_decay, 0.0, 1.0)
        self.ema_update_prob = _number("ema_update_prob", ema_update_prob, 0.0, 1.0)
        self.lam = _number("lam", lam, 0.0, what=" (the consistency weight)")
        self.consistency = _choice("consistency", consistency, CONSISTENCY_LOSSES)
        self.consistency_phase = _choice("consistency_phase", consistency_phase, PHASES)
        self.stable: nn.Module | None = None
        self.forget_at: list[int] = []
        # mixed precision: BatchNorm statistics to restore after the backward
        self._bn_saved: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    # ---- setup --------------------------------------------------------------------
    def setup(self, state: TrainState) -> None:
        """Resolve the schedule from the suite and build the stable model (a copy of the
        initial working model; a checkpoint's values replace it on resume)."""
        if self.period is None:
            self.period = max(1, round(DEFAULT_PERIOD_FRACTION * state.epochs))
        if self.until is None:
            self.until = first_decay_fraction(state.suite)
        self.forget_at = (forgetting_epochs(state.epochs, self.period, self.until)
                          if self.rho > 0 else [])
        self.hparams.update(period=self.period, until=self.until)  # the record shows these
        self.stable = copy.deepcopy(state.model).eval().requires_grad_(False)

    def eligible(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return eligible_kernels(model, self.eligible_fraction, self.skip_shortcuts)

    def _stream(self) -> torch.Generator:
        if self.generator is None:
            raise RuntimeError("fomo: no random stream; call bind_random_stream first")
        return self.generator

    # ---- forgetting -------------------------------------------------------------
    def forget(self, state: TrainState) -> list[torch.Tensor]:
        """Re-initialise a fresh random fraction rho of the eligible kernel entries and
        zero their optimizer state; returns the masks (in the order of `eligible`)."""
        params = [p for _, p in self.eligible(state.model)]
        masks = forgetting_masks([p.shape for p in params], self.rho, self._stream(),
                                 self.per_layer)
        for p, mask in zip(params, masks, strict=True):
            reinitialise_(p, mask, self._stream(), self.init)
        reset_optimizer_state_(state.optimizer, params, masks)
        total = sum(m.numel() for m in masks)
        state.log("fomo.forgotten", sum(int(m.sum()) for m in masks) / max(1, total))
        return masks

    def on_epoch_end(self, state: TrainState) -> None:
        if state.epoch + 1 in self.forget_at:  # state.epoch: the epoch just trained
            self.forget(state)

    # ---- consolidation ----------------------------------------------------------
    def after_step(self, state: TrainState) -> None:
        assert self.stable is not None, "fomo: setup() not called"
        gate = None
        if self.ema_update_prob < 1:
            u = torch.rand((), generator=self._stream(), device=self._stream().device)
            gate = (u < self.ema_update_prob).to(state.device)
        ema_update_(self.stable, state.model, self.ema_decay, gate)

    # ---- relearning -------------------------------------------------------------
    def consistency_active(self, state: TrainState) -> bool:
        if self.lam == 0:
            return False
        if self.consistency_phase == "always":
            return True
        return bool(self.forget_at) and state.epoch >= self.forget_at[0]

    def add_losses(self, state: TrainState) -> dict[str, torch.Tensor] | None:
        if not self.consistency_active(state):
            return None
        assert self.stable is not None and state.logits is not None
        self.stable.eval()
        if state.autocast_dtype is None:  # fp32: the training forward's logits
            with torch.no_grad():
                target = self.stable(state.x_adv)
            state.counter.add(fwd=1)
            logits = state.logits
        else:  # mixed precision: both compared forwards in fp32 (see `_precise_logits`)
            target, logits = self._precise_logits(state)
        return {"consistency": self.lam * consistency_loss(logits, target, self.consistency)}

    def _precise_logits(self, state: TrainState) -> tuple[torch.Tensor, torch.Tensor]:
        """Under bf16 autocast the working and stable models' logits differ by rounding
        about as much as by the models: the stable model's forward and a second forward of
        the working model on x_adv (with its graph; the training forward's BatchNorm batch
        statistics, so the same function) run in fp32, and the consistency compares those.
        The extra forward is counted; the BatchNorm running statistics it moves are put
        back after the backward (`after_backward`: restoring them now would invalidate the
        graphs that saved them)."""
        assert self.stable is not None and state.x_adv is not None
        bn_buffers = [b for m in state.model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
        if bn_buffers:
            self._bn_saved = (bn_buffers, torch._foreach_mul(bn_buffers, 1))  # copies
        with torch.autocast(device_type=state.device.type, enabled=False):
            with torch.no_grad():
                target = self.stable(state.x_adv)
            logits = state.model(state.x_adv)
        state.counter.add(fwd=2)
        return target, logits

    def after_backward(self, state: TrainState) -> None:
        if self._bn_saved is not None:
            buffers, saved = self._bn_saved
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)
            self._bn_saved = None

    def eval_models(self, state: TrainState) -> dict[str, nn.Module]:
        return {} if self.stable is None else {"stable": self.stable}
