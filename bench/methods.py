"""Base training objectives ("methods"): how the training example is built and
which per-sample loss is minimised.

- `at`: PGD-AT (Madry et al., ICLR 2018; Rice, Wong & Kolter, ICML 2020).
- `trades`: TRADES (Zhang et al., ICML 2019).
- `fgsm_rs`: FGSM with random start (Wong, Rice & Kolter, ICLR 2020).
- `n_fgsm`: N-FGSM (de Jorge et al., NeurIPS 2022).
- `standard`: no attack (clean training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from attacks.pgd import fgsm_rs, n_fgsm, pgd
from bench.compiled import frozen_parameters
from bench.config import check_method
from bench.state import TrainState


def forward_model(state: TrainState) -> nn.Module:
    """What the method's training loss runs: the compiled wrapper of `state.model` with
    --compile (same parameters), else `state.model` itself."""
    return state.model if state.compiled_model is None else state.compiled_model


@contextlib.contextmanager
def attack_model(state: TrainState) -> Iterator[nn.Module]:
    """What the method's attack runs. Eager: `state.model`, parameters untouched (autocast
    caches a weight's bf16 copy across the attack only while the weight requires grad).
    Compiled: the wrapper, with every parameter frozen for the attack (restored after), so
    that the compiled graph differentiates with respect to the input only."""
    if state.compiled_model is None:
        yield state.model
        return
    with frozen_parameters(state.model):
        yield state.compiled_model


class Method:
    """A base objective. `attack` builds `state.x_adv`; `loss` returns the
    per-sample loss at the current weights and sets `state.logits`. Both run the model
    through `attack_model` / `forward_model` (the compiled wrapper with --compile). `attack` takes
    overrides of its settings (`eps`, `step_size`, `steps`, ...; PGD-AT also `loss`,
    `random_start` and `attack_bn`, the BatchNorm mode while attacking)."""

    name = ""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator  # the attack's random stream

    def attack(self, state: TrainState, **overrides) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, state: TrainState) -> torch.Tensor:
        logits = forward_model(state)(state.x_adv)
        state.counter.add(fwd=1)
        state.logits = logits
        return F.cross_entropy(logits.float(), state.y, reduction="none")

    def _counted(self, state: TrainState, fn, *args, **kwargs) -> torch.Tensor:
        counter = {"fwd": 0, "bwd": 0}
        x_adv = fn(*args, counter=counter, **kwargs)
        state.counter.absorb(counter)
        return x_adv


class PGDAT(Method):
    name = "at"

    def attack(self, state: TrainState, **overrides) -> torch.Tensor:
        t = state.suite.train
        model = state.model
        was_training = model.training
        model.train(overrides.get("attack_bn", t.attack_bn) == "train")
        try:
            with attack_model(state) as net:
                return self._counted(
                    state, pgd, net, state.x, state.y,
                    eps=overrides.get("eps", state.eps),
                    step_size=overrides.get("step_size", t.attack_step_size * state.eps / t.eps),
                    steps=overrides.get("steps", t.attack_steps),
                    loss=overrides.get("loss", "ce"),
                    random_start=overrides.get("random_start", True),
                    generator=self.generator, autocast_dtype=state.autocast_dtype,
                )
        finally:
            model.train(was_training)


class TRADES(Method):
    name = "trades"

    def attack(self, state: TrainState, **overrides) -> torch.Tensor:
        t = state.suite.train
        model = state.model
        was_training = model.training
        model.eval()
        try:
            with attack_model(state) as net:
                with torch.no_grad(), state.autocast():
                    clean_logits = net(state.x).float()
                state.counter.add(fwd=1)
                return self._counted(
                    state, pgd, net, state.x, state.y,
                    eps=overrides.get("eps", state.eps),
                    step_size=overrides.get("step_size", t.attack_step_size * state.eps / t.eps),
                    steps=overrides.get("steps", t.attack_steps),
                    loss="kl", clean_logits=clean_logits,
                    generator=self.generator, autocast_dtype=state.autocast_dtype,
                )
        finally:
            model.train(was_training)

    def loss(self, state: TrainState) -> torch.Tensor:
        beta = state.suite.train.trades_beta
        net = forward_model(state)
        logits_clean = net(state.x).float()
        logits_adv = net(state.x_adv).float()
        state.counter.add(fwd=2)
        state.logits = logits_adv
        ce = F.cross_entropy(logits_clean, state.y, reduction="none")
        log_p_clean = F.log_softmax(logits_clean, dim=1)
        kl = (log_p_clean.exp() * (log_p_clean - F.log_softmax(logits_adv, dim=1))).sum(dim=1)
        return ce + beta * kl


class FGSMRS(Method):
    name = "fgsm_rs"

    def attack(self, state: TrainState, **overrides) -> torch.Tensor:
        t = state.suite.train
        step = t.fgsm_step_size * state.eps / t.eps if t.fgsm_step_size else 1.25 * state.eps
        with attack_model(state) as net:
            return self._counted(
                state, fgsm_rs, net, state.x, state.y,
                eps=overrides.get("eps", state.eps), step_size=overrides.get("step_size", step),
                generator=self.generator, autocast_dtype=state.autocast_dtype,
            )


class NFGSM(Method):
    name = "n_fgsm"

    def attack(self, state: TrainState, **overrides) -> torch.Tensor:
        eps = overrides.get("eps", state.eps)
        with attack_model(state) as net:
            return self._counted(
                state, n_fgsm, net, state.x, state.y, eps=eps,
                noise_mag=overrides.get("noise_mag", 2 * eps),
                step_size=overrides.get("step_size", eps),
                generator=self.generator, autocast_dtype=state.autocast_dtype,
            )


class Standard(Method):
    name = "standard"

    def attack(self, state: TrainState, **overrides) -> torch.Tensor:
        return state.x


_METHODS = {cls.name: cls for cls in (PGDAT, TRADES, FGSMRS, NFGSM, Standard)}


def build_method(name: str, generator: torch.Generator) -> Method:
    check_method(name)
    return _METHODS[name](generator)
