"""HR's exact per-batch solver (against cvxpy + Clarabel, its limits, a duality
certificate) and the shared defense invariants on the smoke suite."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import with_train
from invariants import (
    PROBE_CARD,
    check_resume_equals_uninterrupted,
    check_weights_clean_outside_update,
    train,
)
from scipy.optimize import brentq

from bench.config import ConfigError, DefenseSpec
from defenses.base import Defense, list_defenses
from defenses.hr import HR, hr_objective, worst_case_weights
from defenses.registry import build_defenses

CVXPY_CASES_PER_SIZE = 15  # 45 random batches in all
WEIGHT_TOL = 1e-4  # on the probability weights w (they sum to 1)
OBJECTIVE_RTOL = 1e-6


# ---- helpers -------------------------------------------------------------------------
def random_batch(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per-example losses shaped like adversarial cross-entropies (positive, skewed)."""
    return rng.gamma(2.0, 0.7, n) if rng.random() < 0.5 else rng.uniform(0.0, 5.0, n)


def hr_solve(losses: np.ndarray, alpha: float, r: float) -> np.ndarray:
    """The solver's engine-scale weights (mean 1) as numpy."""
    return worst_case_weights(torch.tensor(losses, dtype=torch.float64), alpha, r).numpy()


def cvxpy_weights(losses: np.ndarray, alpha: float, r: float) -> tuple[np.ndarray, float]:
    """The HD problem as written in the spec, in masses P = N p, Q = N q (better scaled for
    the interior-point solver): probability weights w (sum 1) and the optimal value."""
    cp = pytest.importorskip("cvxpy")
    n = len(losses)
    P = cp.Variable(n + 1, nonneg=True)
    Q = cp.Variable(n + 1, nonneg=True)
    S = cp.Variable(n, nonneg=True)
    constraints = [
        Q[:n] + S == 1, Q[n] == cp.sum(S), cp.sum(S) <= alpha * n,
        cp.sum(P) == n, cp.sum(cp.rel_entr(Q, P)) <= n * r,
    ]
    objective = cp.Maximize((losses @ P[:n] + losses.max() * P[n]) / n)
    problem = cp.Problem(objective, constraints)
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-10, tol_gap_rel=1e-10, tol_feas=1e-10,
                  max_iter=500)
    assert problem.status == "optimal", problem.status
    w = P.value[:n] / n
    w[np.argmax(losses)] += P.value[n] / n
    return w, float(problem.value)


def kl_dual(losses: np.ndarray, r: float, q: np.ndarray | None = None) -> np.ndarray:
    """D(eta) = eta - e^-r exp(E_q log(eta - l)) on a fine log grid of eta > max l: every
    value bounds sup {E_p l : KL(q || p) <= r} from above (weak duality)."""
    n = len(losses)
    q = np.full(n, 1 / n) if q is None else q
    spread = losses.max() - losses.min()
    eta = losses.max() + spread * np.logspace(-9, 5, 40001)
    gaps = eta[:, None] - losses[None, :]
    return eta - np.exp(-r) * np.exp(np.log(gaps) @ q)


def kl(q: np.ndarray, p: np.ndarray) -> float:
    keep = q > 0
    return float(np.sum(q[keep] * np.log(q[keep] / p[keep])))


# ---- (a) the solver against cvxpy + Clarabel -------------------------------------------
@pytest.mark.parametrize("n", [8, 32, 128])
def test_matches_cvxpy_on_random_batches(n):
    pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    rng = np.random.default_rng(1000 + n)
    worst_w = worst_engine = worst_obj = 0.0
    for _ in range(CVXPY_CASES_PER_SIZE):
        losses = random_batch(rng, n)
        alpha, r = rng.uniform(0.0, 0.3), rng.uniform(1e-3, 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w_ref, value_ref = cvxpy_weights(losses, alpha, r)
        weights = hr_solve(losses, alpha, r)
        value = float(np.mean(losses * weights))
        worst_w = max(worst_w, float(np.abs(weights / n - w_ref).max()))
        worst_engine = max(worst_engine, float(np.abs(weights - n * w_ref).max()))
        worst_obj = max(worst_obj, abs(value - value_ref) / abs(value_ref))
    print(f"\nN={n}: max |w - w_cvxpy| = {worst_w:.2e} (probability scale), "
          f"{worst_engine:.2e} (engine scale, mean 1), max objective rel. error = {worst_obj:.2e}")
    assert worst_w <= WEIGHT_TOL
    assert worst_obj <= OBJECTIVE_RTOL


# ---- (b) the limits --------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7, 49, 128])
def test_zero_strength_is_exactly_uniform(n):
    losses = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 3
    weights = worst_case_weights(losses, 0.0, 0.0)
    assert weights.dtype == losses.dtype and weights.shape == losses.shape
    assert torch.equal(weights, torch.ones(n))


def trimmed_plus_max(losses: np.ndarray, alpha: float) -> float:
    """Remove mass alpha from the lowest losses (1/N each, the last partially), add
    alpha * l_max: written independently of the solver, with a plain loop."""
    n = len(losses)
    left, value = alpha, 0.0
    for loss in np.sort(losses):
        removed = min(left, 1 / n)
        left -= removed
        value += (1 / n - removed) * loss
    return value + alpha * losses.max()


@pytest.mark.parametrize(("n", "alpha"), [(8, 0.25), (8, 0.3), (32, 0.1), (128, 0.05),
                                          (128, 0.29), (50, 0.02)])
def test_r_zero_is_trimmed_loss_plus_alpha_max(n, alpha):
    losses = random_batch(np.random.default_rng(n), n)
    weights = hr_solve(losses, alpha, 0.0)
    assert np.isclose(np.mean(losses * weights), trimmed_plus_max(losses, alpha),
                      rtol=1e-12, atol=0)
    order = np.argsort(losses)
    whole = math.floor(alpha * n + 1e-9)
    assert np.all(weights[order[:whole]] == 0)  # the lowest alpha N examples are dropped
    assert np.isclose(weights[order[-1]], 1 + alpha * n)  # the max carries alpha
    assert np.isclose(weights.sum(), n)


@pytest.mark.parametrize("n", [8, 32, 128])
@pytest.mark.parametrize("r", [0.01, 0.2, 1.0])
def test_alpha_zero_is_kl_dro_with_a_duality_certificate(n, r):
    losses = random_batch(np.random.default_rng(7 * n), n)
    weights = hr_solve(losses, 0.0, r)
    p = weights / n
    value = float(np.mean(losses * weights))
    assert np.all(p > 0) and np.isclose(p.sum(), 1)
    assert kl(np.full(n, 1 / n), p) <= r + 1e-9  # feasible, and the constraint is active:
    assert kl(np.full(n, 1 / n), p) >= r - 1e-6
    # p_i proportional to 1 / (eta - l_i): 1 / p is affine in the loss, decreasing
    slope, intercept = np.polyfit(losses, 1 / p, 1)
    assert slope < 0
    np.testing.assert_allclose(1 / p, slope * losses + intercept, rtol=1e-8)
    dual = kl_dual(losses, r)
    assert dual.min() >= value - 1e-10  # weak duality: nobody beats the dual bound
    assert dual.min() - value <= 1e-7 * abs(value)  # and we reach it: optimal


def test_general_case_reaches_the_dual_bound_of_the_greedy_poisoning():
    rng = np.random.default_rng(3)
    for n, alpha, r in [(32, 0.1, 0.3), (128, 0.17, 0.05), (8, 0.3, 1.0)]:
        losses = random_batch(rng, n)
        weights = hr_solve(losses, alpha, r)
        value = float(np.mean(losses * weights))
        atoms = np.append(np.sort(losses), losses.max())
        keep = 1 - np.clip(alpha * n - np.arange(n), 0, 1)
        q = np.append(keep, alpha * n) / n
        dual = kl_dual(atoms, r, q)
        assert dual.min() >= value - 1e-10 and dual.min() - value <= 1e-7 * abs(value)


def test_solver_properties():
    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(64, generator=gen) * 4
    weights = worst_case_weights(losses, 0.1, 0.3)
    assert torch.all(weights >= 0)
    torch.testing.assert_close(weights.double().sum(), torch.tensor(64.0, dtype=torch.float64))
    perm = torch.randperm(64, generator=gen)  # permutation equivariant
    torch.testing.assert_close(worst_case_weights(losses[perm], 0.1, 0.3), weights[perm])
    # invariant to the loss scale and offset (p depends on (L - l) / t only)
    torch.testing.assert_close(worst_case_weights(3 * losses + 1, 0.1, 0.3), weights)
    # never below the plain mean, never above the max; monotone in alpha and r
    values = [hr_objective(losses, worst_case_weights(losses, a, r))
              for a, r in [(0, 0), (0, 0.1), (0.1, 0.1), (0.1, 0.3), (0.2, 0.3)]]
    assert all(a <= b + 1e-6 for a, b in zip(values, values[1:]))
    assert values[0] == losses.mean() and values[-1] <= losses.max()


def test_degenerate_and_extreme_batches():
    equal = torch.full((16,), 2.5)
    for alpha, r in [(0.0, 0.5), (0.2, 0.5), (0.2, 0.0)]:
        w = worst_case_weights(equal, alpha, r)
        assert torch.isfinite(w).all()
        torch.testing.assert_close(hr_objective(equal, w), torch.tensor(2.5))
    assert torch.equal(worst_case_weights(torch.tensor([1.7]), 0.3, 0.5), torch.ones(1))
    losses = torch.rand(128, generator=torch.Generator().manual_seed(1))
    for r in (1e-12, 1e-3, 50.0, 1e4):  # radius tiny to huge: finite, between mean and max
        w = worst_case_weights(losses, 0.05, r)
        assert torch.isfinite(w).all()
        assert losses.mean() - 1e-6 <= hr_objective(losses, w) <= losses.max() + 1e-6
    huge = hr_objective(losses, worst_case_weights(losses, 0.0, 1e4))
    assert huge >= losses.max() - 1e-3  # a huge radius puts almost all mass on the max
    ties = torch.tensor([0.5, 2.0, 2.0, 1.0, 2.0, 0.1, 0.7, 1.5])  # tied maxima
    w = worst_case_weights(ties, 0.1, 0.2)
    assert torch.isfinite(w).all() and abs(float(w.sum()) - 8) < 1e-5


def test_input_is_not_differentiated_and_keeps_dtype_and_shape():
    losses = torch.rand(4, 8, dtype=torch.float32, requires_grad=True)
    weights = worst_case_weights(losses, 0.05, 0.1)
    assert not weights.requires_grad and weights.dtype == torch.float32
    assert weights.shape == (4, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_host_sync():
    losses = torch.rand(128, generator=torch.Generator().manual_seed(0)) * 5
    expected = worst_case_weights(losses, 0.05, 0.1)
    on_gpu = losses.cuda()
    worst_case_weights(on_gpu, 0.05, 0.1)  # warm-up (lazy CUDA init may synchronise)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = worst_case_weights(on_gpu, 0.05, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-6)


# ---- the hook ----------------------------------------------------------------------------
def test_hook_weights_the_detached_per_sample_loss():
    logs: dict[str, list] = {}
    losses = torch.rand(32, requires_grad=True)
    state = SimpleNamespace(per_sample_loss=losses,
                            log=lambda key, value: logs.setdefault(key, []).append(value))
    defense = HR(alpha=0.05, r=0.2)
    weights = defense.sample_weights(state)
    assert not weights.requires_grad
    assert torch.equal(weights, worst_case_weights(losses.detach(), 0.05, 0.2))
    assert "hr.max_weight" in logs
    loss = hr_objective(losses, weights)  # the engine's mean(l * w): gradient is w / N
    loss.backward()
    torch.testing.assert_close(losses.grad, weights / 32)


# ---- the weights the engine multiplies into the loss -------------------------------------
def reference_weights(losses: np.ndarray, alpha: float, r: float) -> np.ndarray:
    """The HD problem solved independently of defenses/hr.py, engine scale (mean 1).

    Poisoning, by a plain loop: mass alpha comes off the lowest losses (at most 1/N each)
    and goes on an extra atom at l_max. Statistical error (r > 0), by the KKT conditions of
    max_p E_p l s.t. KL(q || p) <= r: p_j = q_j / (eta - l_j) / Z with eta > l_max the root of
    KL(q || p(eta)) = r, found by Brent's method on u = log(eta - l_max)."""
    n = len(losses)
    order = np.argsort(losses, kind="stable")
    q = np.full(n + 1, 1 / n)
    q[n], left = alpha, alpha
    for i in order:
        take = min(left, 1 / n)
        q[i] -= take
        left -= take
    atoms = np.append(losses, losses.max())
    p = q
    if r > 0:
        keep = q > 0

        def kl_minus_r(u: float) -> float:
            gap = atoms[keep] - atoms.max()
            gap = np.exp(u) - gap  # eta - l_j > 0
            return float(np.sum(q[keep] * np.log(gap)) + np.log(np.sum(q[keep] / gap)) - r)

        spread = max(float(atoms.max() - atoms[keep].min()), 1e-12)
        u = brentq(kl_minus_r, np.log(spread) - 60, np.log(spread) + 60, xtol=1e-14,
                   rtol=1e-14, maxiter=500)
        p = np.where(keep, q / (np.exp(u) + atoms.max() - atoms), 0.0)
        p = p / p.sum()
    w = p[:n].copy()
    w[order[-1]] += p[n]
    return n * w


def test_reference_weights_match_cvxpy():
    """The test's own reference is right: the trimmed loss at r = 0, and the cvxpy model of
    the problem otherwise."""
    rng = np.random.default_rng(5)
    for n, alpha in [(8, 0.3), (64, 0.05)]:  # r = 0: the trimmed mean plus alpha * l_max
        losses = random_batch(rng, n)
        assert np.isclose(np.mean(losses * reference_weights(losses, alpha, 0.0)),
                          trimmed_plus_max(losses, alpha), rtol=1e-12, atol=0)
    pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    for n, alpha, r in [(16, 0.05, 0.2), (64, 0.05, 0.2), (32, 0.0, 0.5), (32, 0.2, 0.05)]:
        losses = random_batch(rng, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w_ref, _ = cvxpy_weights(losses, alpha, r)
        np.testing.assert_allclose(reference_weights(losses, alpha, r) / n, w_ref, atol=1e-5)


class LossWeightProbe(Defense):
    """Records each batch's per-sample loss and, through a gradient hook on it, the weight
    the engine's loss actually put on each example: d loss / d l_i = weight_i / N."""

    name = "probe"
    card = PROBE_CARD

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[torch.Tensor] = []
        self.used: list[torch.Tensor] = []

    def add_losses(self, state) -> None:
        losses = state.per_sample_loss
        self.losses.append(losses.detach().clone())
        losses.register_hook(lambda g: self.used.append(g.detach() * g.numel()))


@pytest.mark.parametrize(("alpha", "r"), [(0.05, 0.2), (0.0, 0.5), (0.15, 0.0)])
def test_engine_update_uses_the_solvers_weights_on_each_batch(tmp_path, smoke_suite,
                                                             smoke_splits, alpha, r):
    probe = LossWeightProbe()
    train(tmp_path, smoke_suite, smoke_splits, instances=[HR(alpha=alpha, r=r), probe])
    steps = smoke_suite.train.epochs * math.ceil(smoke_suite.data.train_size
                                                 / smoke_suite.train.batch_size)
    assert len(probe.losses) == len(probe.used) == steps
    for losses, used in zip(probe.losses, probe.used):
        expected = reference_weights(losses.double().numpy(), alpha, r)
        assert not np.allclose(expected, 1.0)  # the weights are not uniform
        np.testing.assert_allclose(used.double().numpy(), expected, rtol=1e-5, atol=1e-6)


# ---- (c) the shared invariants on the smoke suite ----------------------------------------
REAL = DefenseSpec("hr", (("alpha", 0.05), ("r", 0.2)))


# zero strength (alpha = r = 0) is plain AT bit for bit: tests/test_zero_strength.py


def test_resume_equals_uninterrupted(tmp_path, smoke_suite, smoke_splits):
    check_resume_equals_uninterrupted(tmp_path, with_train(smoke_suite, epochs=3),
                                      smoke_splits, "at", (REAL,))


def test_weights_clean_outside_update(tmp_path, smoke_suite, smoke_splits):
    check_weights_clean_outside_update(tmp_path, smoke_suite, smoke_splits,
                                       HR(alpha=0.05, r=0.2), perturbs=False)


# ---- (d) parameters, registry and card -----------------------------------------------------
@pytest.mark.parametrize(("alpha", "r", "message"), [
    (-0.1, 0.2, r"alpha is the poisoned fraction"),
    (1.0, 0.2, r"alpha is the poisoned fraction"),
    (0.05, -1e-3, r"r is a KL radius"),
    (float("nan"), 0.2, r"alpha must be finite"),
    (0.05, float("inf"), r"r must be finite"),
    ("0.1", 0.2, r"alpha must be a real number"),
    (0.05, True, r"r must be a real number"),
])
def test_bad_parameters_are_refused(alpha, r, message):
    with pytest.raises(ValueError, match=message):
        HR(alpha=alpha, r=r)
    with pytest.raises(ValueError, match=message):
        worst_case_weights(torch.rand(8), alpha, r)


def test_registry_defaults_and_composition(smoke_suite):
    assert list_defenses()["hr"] is HR
    (hr,) = build_defenses((DefenseSpec("hr"),), "at", smoke_suite)
    assert (hr.alpha, hr.r) == (0.0, 0.2)
    with pytest.raises(ConfigError, match=r"no parameter\(s\) \['radius'\].*'alpha', 'r'"):
        build_defenses((DefenseSpec("hr", (("radius", 0.1),)),), "at", smoke_suite)
    with pytest.raises(ConfigError, match=r"does not compose with method 'trades'"):
        build_defenses((DefenseSpec("hr"),), "trades", smoke_suite)
    with pytest.raises(ValueError, match=r"r is a KL radius"):
        build_defenses((DefenseSpec("hr", (("r", -0.5),)),), "at", smoke_suite)


def test_card_is_complete():
    card = HR.card
    for field in ("paper", "venue", "link", "reference_code", "extra_data"):
        assert getattr(card, field), field
    assert card.hyperparameters["alpha"] == 0.0 and card.hyperparameters["r"] == 0.2
    assert "6.2" in str(card.published_notes) and card.published == ()
    assert HR.capabilities == ("per_sample_loss",)
