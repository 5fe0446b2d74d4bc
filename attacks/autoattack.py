"""Adapter around the official AutoAttack (Croce & Hein, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks",
ICML 2020), PyPI package ``pyautoattack``.

The standard version is used unchanged: APGD-CE (100 iterations, no restarts),
APGD-T (targeted DLR, 9 target classes, 100 iterations), FAB-T (9 target
classes) and Square (5,000 queries). :func:`autoattack_settings` reads these
back from a constructed adversary so that tests catch a dependency change that
would weaken the evaluation. The ``"reduced"`` version exists only for the
tiny test suite and is labelled as such in the settings.

pyautoattack reports through the ``logging`` logger ``"auto-attack"`` (progress
at DEBUG, its own reliability checks at WARNING) and the individual attacks
``print``; :func:`run_autoattack` captures both, plus anything raised through
the ``warnings`` module.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, TextIO

import torch
from pyautoattack import AutoAttack, checks
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.square import SquareAttack
from torch import nn

from .pgd import clean_accuracy

STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
VERSIONS = ("standard", "apgd", "reduced")
# "apgd" (CPU suites): the standard version's APGD-CE and APGD-T, unchanged (100 iterations,
# 9 target classes), without FAB-T and Square; labelled as such in the settings.
APGD_ATTACKS = ("apgd-ce", "apgd-t")
# "reduced" (tests / smoke suite only): APGD-CE and APGD-T with fewer iterations/targets.
REDUCED_ATTACKS = ("apgd-ce", "apgd-t")
REDUCED_N_ITER = 20
REDUCED_N_TARGET_CLASSES = 3
LOGGER_NAME = "auto-attack"

ATTACK_LABELS = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square"}
# AutoAttack's own reliability messages -> the name each gets as a flag (first match wins)
WARNING_KINDS = (
    ("randomized defense", "aa_randomized"),
    ("probability distribution", "aa_softmax_output"),
    ("zero gradient", "aa_zero_gradients"),
    ("Square Attack has decreased", "aa_square"),
    ("dynamic defense", "aa_dynamic"),
    ("target classes", "aa_n_classes"),
    ("not possible to use", "aa_n_classes"),
    ("robench: a fresh forward pass", "aa_recheck"),
    ("robench: x_adv leaves", "aa_bound"),
)

__all__ = [
    "ATTACK_LABELS",
    "STANDARD_ATTACKS",
    "AutoAttackResult",
    "attack_set_label",
    "autoattack_settings",
    "build_autoattack",
    "classify_warning",
    "run_autoattack",
    "square_robust",
]


def classify_warning(message: str) -> str:
    """The flag name of one of AutoAttack's (or this adapter's) warnings."""
    return next((kind for text, kind in WARNING_KINDS if text in message), "aa_other")


def attack_set_label(version: str) -> str:
    """'AutoAttack' for the standard version, else the attacks it runs ('APGD-CE+APGD-T')."""
    if version == "standard":
        return "AutoAttack"
    attacks = APGD_ATTACKS if version == "apgd" else REDUCED_ATTACKS
    label = "+".join(ATTACK_LABELS[a] for a in attacks)
    return label + (" (reduced)" if version == "reduced" else "")


@dataclass
class AutoAttackResult:
    """Outcome of :func:`run_autoattack` (accuracies are fractions in [0, 1])."""

    robust_accuracy: float
    clean_accuracy: float
    x_adv: torch.Tensor
    robust: torch.Tensor  # per image: still correct after every attack (bool)
    log: str
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _pyautoattack_version() -> str:
    try:
        return package_version("pyautoattack")
    except PackageNotFoundError:  # pragma: no cover - vendored copy
        import pyautoattack

        return getattr(pyautoattack, "__version__", "unknown")


def build_autoattack(
    model: nn.Module,
    *,
    eps: float,
    version: str = "standard",
    device: torch.device | str,
    seed: int = 0,
    log_path: str | None = None,
    verbose: bool = False,
) -> AutoAttack:
    """Construct a pyautoattack ``AutoAttack`` for L-inf radius ``eps``.

    ``version="standard"`` is the package's standard version, untouched.
    ``version="apgd"`` runs only its APGD-CE and APGD-T, with the standard settings.
    ``version="reduced"`` (tests only) runs APGD-CE and APGD-T with
    ``REDUCED_N_ITER`` iterations and ``REDUCED_N_TARGET_CLASSES`` targets.
    ``verbose`` turns on the sub-attacks' own progress prints and echoes the log
    to stdout in :func:`run_autoattack`; ``log_path`` is where
    :func:`run_autoattack` appends the captured log.
    """
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; expected one of {VERSIONS}")
    device = str(device)
    if version in ("standard", "apgd"):
        adversary = AutoAttack(
            model, eps=eps, norm="Linf", version="standard", device=device, seed=seed
        )
        if version == "apgd":  # keep the standard settings, run only the two APGD attacks
            adversary.attacks_to_run = list(APGD_ATTACKS)
    else:
        adversary = AutoAttack(
            model,
            eps=eps,
            norm="Linf",
            version="custom",
            attacks=list(REDUCED_ATTACKS),
            device=device,
            seed=seed,
        )
        # Rebuilt (not patched) so that APGD derives its checkpoint schedule from n_iter.
        apgd_kwargs = dict(n_restarts=1, n_iter=REDUCED_N_ITER, eps=eps, norm="Linf",
                           eot_iter=1, rho=0.75, seed=seed, device=device,
                           logger=adversary.logger)
        adversary.apgd = APGDAttack(model, **apgd_kwargs)
        adversary.apgd_targeted = APGDAttack_targeted(
            model, n_target_classes=REDUCED_N_TARGET_CLASSES, **apgd_kwargs)
    adversary.verbose = True  # the log is always produced; run_autoattack decides where it goes
    for attack in (adversary.apgd, adversary.apgd_targeted, adversary.fab, adversary.square):
        attack.verbose = verbose
    adversary.robench_version = version
    adversary.robench_log_path = log_path
    adversary.robench_verbose = verbose
    return adversary


def autoattack_settings(adversary: AutoAttack) -> dict[str, Any]:
    """The settings of a constructed adversary, read back from its attack objects."""
    apgd, apgd_t, fab, square = (
        adversary.apgd,
        adversary.apgd_targeted,
        adversary.fab,
        adversary.square,
    )
    return {
        "package": "pyautoattack",
        "package_version": _pyautoattack_version(),
        "version": getattr(adversary, "robench_version", adversary.version),
        "reduced": getattr(adversary, "robench_version", adversary.version) != "standard",
        "norm": adversary.norm,
        "eps": float(adversary.epsilon),
        "seed": adversary.seed,
        "attacks_to_run": list(adversary.attacks_to_run),
        "apgd": {
            "n_iter": apgd.n_iter,
            "n_restarts": apgd.n_restarts,
            "eot_iter": apgd.eot_iter,
            "rho": apgd.thr_decr,
            "use_largereps": apgd.use_largereps,
        },
        "apgd_targeted": {
            "n_iter": apgd_t.n_iter,
            "n_restarts": apgd_t.n_restarts,
            "n_target_classes": apgd_t.n_target_classes,
            "loss": apgd_t.loss,
            "eot_iter": apgd_t.eot_iter,
        },
        "fab": {
            "n_iter": fab.n_iter,
            "n_restarts": fab.n_restarts,
            "n_target_classes": fab.n_target_classes,
        },
        "square": {
            "n_queries": square.n_queries,
            "n_restarts": square.n_restarts,
            "p_init": square.p_init,
        },
    }


class _Tee(io.TextIOBase):
    """A text stream that writes to several streams."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode and requires_grad=False for all parameters; both restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def run_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    version: str = "standard",
    batch_size: int = 500,
    device: torch.device | str | None = None,
    seed: int = 0,
    log_path: str | None = None,
    verbose: bool = False,
) -> AutoAttackResult:
    """Evaluate ``model`` on (x, y) with AutoAttack (L-inf, radius ``eps``), in fp32.

    The model is put in eval mode with frozen parameters for the evaluation; its
    mode and requires_grad flags are restored afterwards, as is the global RNG
    state (AutoAttack reseeds it). ``device`` defaults to the model's device.
    The robust accuracy is AutoAttack's own (points no attack succeeded on); it is
    cross-checked by a forward pass on ``x_adv``, and the perturbation size is
    checked against ``eps``: a mismatch is added to ``warnings``.
    """
    if device is None:
        device = next((t.device for t in (*model.parameters(), *model.buffers())), x.device)
    x = x.detach().float()
    y = y.detach().long()
    adversary = build_autoattack(
        model,
        eps=eps,
        version=version,
        device=device,
        seed=seed,
        log_path=log_path,
        verbose=verbose,
    )
    settings = autoattack_settings(adversary)

    logger = logging.getLogger(LOGGER_NAME)
    buffer = io.StringIO()
    stream = _Tee(buffer, sys.stdout) if verbose else buffer
    log_handler = logging.StreamHandler(stream)
    log_handler.setLevel(logging.DEBUG)
    warn_handler = _WarningCollector()
    old_level, old_propagate = logger.level, logger.propagate
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    # the dynamic-defense check counts calls in a module-global dict that is never reset:
    # once one model fired it, every later model in the process would be flagged
    for key in checks.funcs:
        checks.funcs[key] = 0
    start = time.perf_counter()
    try:
        logger.addHandler(log_handler)
        logger.addHandler(warn_handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False  # DEBUG progress must not reach the application's handlers
        with contextlib.ExitStack() as stack:
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            stack.enter_context(contextlib.redirect_stdout(stream))
            stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
            stack.enter_context(_frozen_eval(model))
            stack.enter_context(
                torch.autocast(device_type=torch.device(device).type, enabled=False)
            )
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
            clean = clean_accuracy(model, x, y, batch_size=batch_size)
            recheck = clean_accuracy(model, x_adv, y, batch_size=batch_size)
    finally:
        logger.removeHandler(log_handler)
        logger.removeHandler(warn_handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(buffer.getvalue())
    seconds = time.perf_counter() - start

    found = list(warn_handler.messages)
    found += [f"{w.category.__name__}: {w.message}" for w in caught]
    flags = y_adv.to(y.device) == y
    robust = flags.sum().item() / len(y) if len(y) else 0.0
    if abs(recheck - robust) > 0.5 / max(len(y), 1):  # differ by at least one image
        found.append(
            f"robench: a fresh forward pass on the returned x_adv gives {recheck:.4f} "
            f"accuracy, AutoAttack's robust flags {robust:.4f} (numerics near the "
            "decision boundary or a non-deterministic model)"
        )
    max_pert = (x_adv - x).abs().amax().item() if len(x) else 0.0
    if max_pert > eps + 1e-5 or x_adv.min().item() < 0.0 or x_adv.max().item() > 1.0:
        found.append(
            f"robench: x_adv leaves the eps-ball or [0, 1] (max |x_adv - x| = "
            f"{max_pert:.6f}, eps = {eps:.6f})"
        )
    return AutoAttackResult(
        robust_accuracy=robust,
        clean_accuracy=clean,
        x_adv=x_adv.detach(),
        robust=flags,
        log=buffer.getvalue(),
        warnings=found,
        settings=settings,
        seconds=seconds,
    )


def square_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                  n_queries: int, seed: int, batch_size: int = 500) -> torch.Tensor:
    """Per image: still correct after the official Square attack (L-inf, margin loss, the
    standard version's p_init 0.8 and schedule, one restart) with `n_queries` queries: the
    first `n_queries` of AutoAttack's own Square. Gradient-free, so a model whose gradients
    are useless cannot hide from it. fp32, eval mode, global RNG restored."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())), x.device)
    out = []
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda_devices))
        stack.enter_context(_frozen_eval(model))
        stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
        stack.enter_context(torch.no_grad())
        attack = SquareAttack(model, p_init=0.8, n_queries=n_queries, eps=eps, norm="Linf",
                              n_restarts=1, seed=seed, verbose=False, device=device,
                              resc_schedule=False)
        for i in range(0, len(y), batch_size):
            xb = x[i:i + batch_size].detach().float().to(device)
            yb = y[i:i + batch_size].to(device)
            adv = attack.perturb(xb, yb)
            out.append(model(adv).argmax(1) == yb)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=device)
