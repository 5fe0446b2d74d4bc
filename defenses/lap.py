"""LAP: Layer-Aware Adversarial Weight Perturbation (Lin, Yu, Han, Su & Liu,
"Layer-Aware Analysis of Catastrophic Overfitting: Revealing the Pseudo-Robust
Shortcut Dependency", ICML 2024).

Catastrophic overfitting in single-step adversarial training starts in the
early layers ("pseudo-robust shortcuts"); LAP perturbs the weights with a
strength that decreases with depth. Kernels l = 1..L (conv and linear, in
registration order; L is counted on the model) get

    lambda_l = 1 - (ln l / ln L) ** gamma_lap        (lambda_1 = 1, lambda_L = 0)

and, per batch, as the released code does it:

1. L1 = CE(f(x + delta0), y) with delta0 drawn by variant (V: zero, R: U(-eps, eps),
   N: U(-2 eps, 2 eps); clipped to [0, 1]); its weight gradient feeds
2. a *tentative* optimizer step: u_l = (w_l' - w_l) * ||w_l|| / ||w_l' - w_l||, after
   which weights, gradients and optimizer state (momentum buffers, step counts)
   are restored bit for bit (buffers are cloned, entries the step created are
   dropped);
3. w_l <- w_l + beta * lambda_l * u_l, then the engine's training loss, backward and
   optimizer step run at the perturbed weights.

The direction u is the optimizer's own update, a *descent* direction (not AWP's
gradient ascent), as in the released code.

**Accumulated perturbation (default).** The released code never removes the
perturbation: it stays in the weights and accumulates over training. That is
the default here, so the shared invariant "weights are clean outside
`around_update`" (tests/invariants.py) does not hold for it *by design*: the
perturbation is part of the weight trajectory, checkpoints and evaluation see the
weights training produced.
`restore=True` removes it after the step (an AWP-style perturbation) and then
the invariant holds. Either way the record shows which one ran
(`defense_params`).

Engine-specific choices:

- Variants and methods. The training attack belongs to the engine's method:
  R-LAP is LAP on `fgsm_rs` (random start, alpha = 1.25 eps), N-LAP on `n_fgsm`
  (noise 2 eps, alpha = eps, no projection). V-LAP needs FGSM from a zero start
  with alpha = eps, which is exactly `n_fgsm` with no noise; V runs on `n_fgsm`
  and re-attacks with the logged override `noise_mag=0` (the engine's own
  attack is then discarded: one wasted forward/backward).
- The engine's single-step attack takes input gradients only, so the weight
  gradient of L1 needs its own forward and backward (BatchNorm statistics
  untouched: the attack's forward already updated them, as the reference's
  single L1 forward does), and delta0 is drawn from LAP's own random stream
  (same distribution as the attack's start, not the same draw).
- LAP claims the `update` slot: it drives the optimizer (the tentative step)
  and, by default, changes how the weights move from batch to batch
  (w <- w + v - step(w + v)); another defense that changes the update would be
  invisible to the tentative step or compound with the perturbation.

Extra cost per batch: V 2 forwards + 2 backwards, R and N 1 + 1, plus one
optimizer step and copies of the kernels and the optimizer state.

The schedule is the suite's: `cifar10-fast` and `cifar10-fast-16` cycle the momentum
against the lr (`[train] cyclic_momentum`), as the reference's CyclicLR does, and the
tentative step uses the momentum of the current iteration. Documentation (algorithm,
hyperparameters, every known difference from the released code, published numbers and
their protocol): docs/defenses/lap.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F

from bench.config import ConfigError, Suite
from bench.state import TrainState, kernel_parameters, preserved_bn_stats
from defenses._optimizer_step import tentative_update
from defenses.base import Defense, DefenseCard, register_defense
from defenses.card import FULL_TRAIN, entries

VARIANTS = ("V", "R", "N")
VARIANT_METHOD = {"V": "n_fgsm", "R": "fgsm_rs", "N": "n_fgsm"}
DEFAULT_VARIANT = {"fgsm_rs": "R", "n_fgsm": "N"}
START_SCALE = {"V": 0.0, "R": 1.0, "N": 2.0}  # delta0 ~ U(-s eps, s eps)
# beta by eps (in 1/255) and variant, CIFAR-10 PreActResNet-18
PUBLISHED_BETA = {
    8: {"V": 0.03, "R": 0.002, "N": 0.001},
    12: {"V": 0.058, "R": 0.03, "N": 0.002},
    16: {"V": 0.07, "R": 0.05, "N": 0.005},
    32: {"V": 0.48, "R": 0.3, "N": 0.75},
}


# ---- pure functions -----------------------------------------------------------
def layer_coefficients(num_layers: int, gamma: float) -> list[float]:
    """lambda_l = 1 - (ln l / ln L) ** gamma for l = 1..L: 1 for the first
    kernel, decreasing with depth, exactly 0 for the last (the classifier)."""
    if num_layers < 2:
        raise ValueError(f"lap: needs at least 2 kernels (conv/linear), the model has {num_layers}")
    if not gamma > 0:
        raise ValueError(f"lap: gamma_lap must be > 0, got {gamma}")
    log_total = math.log(num_layers)
    return [1.0 - (math.log(l) / log_total) ** gamma for l in range(1, num_layers + 1)]


def layer_aware_perturbation(weights: list[torch.Tensor], updates: list[torch.Tensor],
                             coefficients: list[float], beta: float) -> list[torch.Tensor]:
    """v_l = beta * lambda_l * ||w_l|| * u_l / ||u_l|| (Frobenius norms), along the
    optimizer's update u_l; a layer whose update is zero gets v_l = 0."""
    out = []
    for w, u, lam in zip(weights, updates, coefficients, strict=True):
        u = u.float()
        u_norm = u.norm()
        scale = torch.where(u_norm > 0,
                            beta * lam * w.detach().float().norm() / u_norm.clamp_min(1e-30),
                            torch.zeros_like(u_norm))
        out.append((u * scale).to(w.dtype))
    return out


def published_beta(variant: str, eps: float) -> float:
    """The paper's beta for a variant at eps 8, 12, 16 or 32 /255."""
    for key, row in PUBLISHED_BETA.items():
        if abs(eps * 255 - key) < 1e-6:
            return row[variant]
    raise ConfigError(
        f"lap: beta is published only for eps in {[f'{k}/255' for k in PUBLISHED_BETA]}; "
        f"this suite trains at eps {eps:.6g}: set beta (--defense lap:beta=..., or "
        f"[defenses.lap] beta in the suite file)")


# ---- parameter checks ---------------------------------------------------------
def _check_number(value: Any, name: str, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"lap: {name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"lap: {name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"lap: {name} must be >= 0, got {value}")
    return float(value)


def _check_variant(variant: Any) -> str:
    text = str(variant).strip()
    if text.lower() == "auto":
        return "auto"
    if text.upper() not in VARIANTS:
        raise ValueError(f"lap: variant must be 'auto' or one of {list(VARIANTS)}, got {variant!r}")
    return text.upper()


@register_defense("lap")
class LAP(Defense):
    card = DefenseCard(
        name="LAP",
        paper="Lin, Yu, Han, Su & Liu. Layer-Aware Analysis of Catastrophic Overfitting: "
              "Revealing the Pseudo-Robust Shortcut Dependency",
        venue="ICML 2024",
        link="https://arxiv.org/abs/2405.16262",
        reference_code="https://github.com/tmllab/2024_ICML_LAP",
        hyperparameters={
            "epochs": 30, "batch_size": 128,
            "lr": "cyclic 0 -> 0.2 (peak at epoch 15) -> 0, per iteration",
            "momentum": "cycled against the lr, 0.9 -> 0.8 (lr peak) -> 0.9 (CyclicLR default)",
            "weight_decay": 5e-4, "gamma_lap": 0.3,
            "beta": {f"{k}/255": dict(v) for k, v in PUBLISHED_BETA.items()},
            "alpha": {"V": "eps, zero start", "R": "1.25 eps, start U(-eps, eps)",
                      "N": "eps, start U(-2 eps, 2 eps), no projection"},
            "perturbation": "accumulated (never removed)",
            "evaluation": "last checkpoint; clean, FGSM, PGD-50 (step eps/4), AutoAttack",
        },
        published=(
            *(entry for label, method, defenses, eps, suite, numbers in (
                ("R-LAP", "fgsm_rs", ("lap",), "16/255", "cifar10-fast-16",
                 (("clean", "last", 64.83), ("autoattack", "last", 15.69))),
                ("R-FGSM", "fgsm_rs", (), "16/255", "cifar10-fast-16",
                 (("autoattack", "last", 0.0),)),
                ("R-LAP", "fgsm_rs", ("lap",), "12/255", None, (("autoattack", "last", 26.04),)),
                ("N-LAP", "n_fgsm", ("lap",), "8/255", "cifar10-fast",
                 (("autoattack", "last", 44.97),)),
                ("N-FGSM", "n_fgsm", (), "8/255", "cifar10-fast",
                 (("autoattack", "last", 44.2, {"note": "the paper's N-FGSM baseline, "
                                                 "given as 'about'"}),)),
                ("N-FGSM", "n_fgsm", (), "12/255", None,
                 (("autoattack", "last", 30.3, {"note": "the paper's N-FGSM baseline, "
                                                "given as 'about'"}),)))
              for entry in entries(
                {"method": method, "defenses": defenses, "label": label, "eps": eps,
                 "epochs": 30, "selection": "none", "data_split": "50k train; last checkpoint",
                 "source": "as quoted by a secondary summary, not yet checked against the paper",
                 "suite": suite,
                 "differences": (FULL_TRAIN,) if suite else (
                     "eps 12/255: ROBench's single-step suites run 8/255 (cifar10-fast) and "
                     "16/255 (cifar10-fast-16)",)},
                *numbers)),
        ),
        published_notes={"overhead": "about 7% over FGSM (11.8 vs 11.0 s/epoch, RTX 4090)"},
        extra_data="none",
        notes="Perturbs along the optimizer's own update (a descent direction, as the "
              "released code does), found by a tentative optimizer step that is undone; the "
              "perturbation accumulates in the weights unless restore=true. R runs on fgsm_rs, "
              "N on n_fgsm, V on n_fgsm re-attacked with noise_mag=0. Here L1's weight gradient "
              "costs one extra forward/backward per batch (V: two), which the reference shares "
              "with the attack. Schedule as the reference's CyclicLR: cifar10-fast and "
              "cifar10-fast-16 cycle the momentum 0.9 -> 0.8 -> 0.9 against the lr for every "
              "row ([train] cyclic_momentum), and the tentative step uses the current "
              "momentum; fmnist-fast keeps 0.9. gamma_lap 0.3 is the value of every README "
              "command (the released script's default is 1.0). The reference trains on all "
              "50k images and reports the last checkpoint on the test set: compare with our "
              "last. docs/defenses/lap.md.",
    )
    params = {"beta": "auto", "gamma_lap": 0.3, "variant": "auto", "restore": False}
    methods = ("fgsm_rs", "n_fgsm")
    slots = ("update",)

    def __init__(self, beta: float | str, gamma_lap: float, variant: str, restore: bool) -> None:
        super().__init__(beta=beta, gamma_lap=gamma_lap, variant=variant, restore=restore)
        auto = isinstance(beta, str) and beta.strip().lower() == "auto"
        self.beta: float | None = None if auto else _check_number(beta, "beta", positive=False)
        self.gamma_lap = _check_number(gamma_lap, "gamma_lap", positive=True)
        self.variant = _check_variant(variant)
        if not isinstance(restore, bool):
            raise ValueError(f"lap: restore must be true or false, got {restore!r}")
        self.restore = restore
        self.coefficients: list[float] | None = None

    # ---- settings resolved against the run -------------------------------------
    def _resolve(self, method: str, eps: float) -> tuple[str, float]:
        if method not in self.methods:
            raise ConfigError(f"lap: runs on {list(self.methods)}, not on method {method!r}")
        variant = DEFAULT_VARIANT[method] if self.variant == "auto" else self.variant
        if VARIANT_METHOD[variant] != method:
            raise ConfigError(
                f"lap: variant {variant} trains with method {VARIANT_METHOD[variant]!r} "
                f"(its attack), not {method!r}")
        return variant, self.beta if self.beta is not None else published_beta(variant, eps)

    def check_run(self, method: str, suite: Suite) -> None:
        self._resolve(method, suite.train.eps)  # fails before any data is loaded

    def setup(self, state: TrainState) -> None:
        """Resolve `variant` from the method and `beta` from the published table,
        check that they fit the run, and record the values that run."""
        self.variant, self.beta = self._resolve(state.spec.method, state.suite.train.eps)
        self.coefficients = layer_coefficients(len(kernel_parameters(state.model)), self.gamma_lap)
        self.hparams.update(beta=self.beta, variant=self.variant)

    # ---- hooks ------------------------------------------------------------------
    def after_attack(self, state: TrainState) -> None:
        """V-LAP trains on FGSM from a zero start (alpha = eps): N-FGSM without noise."""
        if self.variant == "V":
            state.x_adv = state.attack(state.x, state.y, noise_mag=0.0)

    @contextlib.contextmanager
    def around_update(self, state: TrainState) -> Iterator[None]:
        if self.coefficients is None:
            self.setup(state)
        assert self.coefficients is not None and self.beta is not None
        kernels = [p for _, p in kernel_parameters(state.model)]
        grads = self._start_gradients(state, kernels)
        updates = tentative_update(state.optimizer, kernels, grads)
        perturbation = layer_aware_perturbation(kernels, updates, self.coefficients, self.beta)
        moved = [self.beta * lam != 0 for lam in self.coefficients]
        self._shift(kernels, perturbation, moved, sign=1.0)
        try:
            yield
        finally:
            if self.restore:
                self._shift(kernels, perturbation, moved, sign=-1.0)

    # ---- helpers ---------------------------------------------------------------
    def _start_gradients(self, state: TrainState,
                         kernels: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Weight gradients of L1 = mean CE(f(x + delta0), y) (BatchNorm statistics kept)."""
        x = state.x.detach().float()
        scale = START_SCALE[self.variant] * state.eps
        if scale > 0:
            noise = torch.rand(x.shape, generator=self.generator, device=x.device)
            x = (x + noise.mul_(2 * scale).sub_(scale)).clamp_(0.0, 1.0)
        with preserved_bn_stats(state.model), torch.enable_grad():
            with state.autocast():
                logits = state.model(x)
            loss = F.cross_entropy(logits.float(), state.y)
            grads = torch.autograd.grad(loss, kernels, allow_unused=True)
        state.counter.add(fwd=1, bwd=1)
        return list(grads)

    @staticmethod
    def _shift(kernels: list[torch.Tensor], perturbation: list[torch.Tensor],
               moved: list[bool], sign: float) -> None:
        """w += sign * v, skipping layers whose coefficient is zero (left bit for bit)."""
        with torch.no_grad():
            for p, v, active in zip(kernels, perturbation, moved, strict=True):
                if active:
                    p.add_(v, alpha=sign)
