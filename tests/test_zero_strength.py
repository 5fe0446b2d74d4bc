"""Every defense with a zero-strength setting, run through the engine (the real `Trainer`
on the smoke suite, CPU fp32, one thread), trains exactly as its base method does: same
weights, BatchNorm statistics, momentum buffers, random streams and per-epoch history, bit
for bit (`invariants.assert_same_training`). A defense draws only from its own random
stream, so at zero strength nothing it does may shift the data order, the attack's
randomness or torch's global generator.

Zero strength = the setting at which the paper's method is its base method:
  awp gamma 0, rwp gamma 0, lap beta 0, hr alpha = r = 0, fomo rho = lam = 0 (no
  forgetting, no consistency term; the stable EMA model still runs beside the row),
  dom_re tau 0 (every natural loss is >= 0: nothing removed) and dom_da tau 0 (nothing
  flagged), both with update_bn false (their extra forward then leaves BatchNorm alone;
  with update_bn true it updates BatchNorm as the reference does, a real difference), and
  cure percent 0, gamma 0, beta = the suite's TRADES beta, no warm start and no clean
  phase (clean_fraction 0).
No zero strength: aroid and idbh own the augmentation slot and replace the suite's
augmentation with their own recipe; no setting gives back the suite's flip (their draws
come from their own streams, not the data stream).
"""

from __future__ import annotations

import pytest
from invariants import assert_same_training, check_zero_strength_is_plain, train

from bench.config import DefenseSpec
from defenses.base import list_defenses

WITHOUT_ZERO = {"aroid", "idbh"}


def spec(name: str, **params) -> DefenseSpec:
    return DefenseSpec(name, tuple(sorted(params.items())))


def cases(trades_beta: float) -> list[tuple[str, DefenseSpec, DefenseSpec]]:
    """(method, zero, real): `real` must change training on the smoke suite."""
    dom = {"warmup": 0.0, "update_bn": False}
    cure = {"warm_start": False, "clean_fraction": 0.0}
    return [
        ("at", spec("awp", gamma=0.0, warmup=0.0), spec("awp", gamma=0.05, warmup=0.0)),
        ("trades", spec("awp", gamma=0.0, warmup=0.0), spec("awp", gamma=0.05, warmup=0.0)),
        ("at", spec("rwp", gamma=0.0, c_min=2.5, warmup=0.0),
         spec("rwp", gamma=0.05, c_min=2.5, warmup=0.0)),
        ("trades", spec("rwp", gamma=0.0, c_min=2.5, warmup=0.0),
         spec("rwp", gamma=0.05, c_min=2.5, warmup=0.0)),
        ("fgsm_rs", spec("lap", beta=0.0), spec("lap", beta=0.05)),
        ("n_fgsm", spec("lap", beta=0.0), spec("lap", beta=0.05)),
        ("at", spec("hr", alpha=0.0, r=0.0), spec("hr", alpha=0.05, r=0.2)),
        ("at", spec("fomo", rho=0.0, lam=0.0, period=1, until=1.0, consistency_phase="always"),
         spec("fomo", rho=0.5, lam=0.1, period=1, until=1.0)),
        ("at", spec("dom_re", tau=0.0, **dom), spec("dom_re", tau=2.3, **dom)),
        ("at", spec("dom_da", tau=0.0, **dom), spec("dom_da", tau=2.3, **dom)),
        ("trades", spec("cure", percent=0.0, gamma=0.0, beta=trades_beta, **cure),
         spec("cure", **cure)),
    ]


CASE_IDS = ["awp-at", "awp-trades", "rwp-at", "rwp-trades", "lap-fgsm_rs", "lap-n_fgsm",
            "hr", "fomo", "dom_re", "dom_da", "cure"]


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory, smoke_suite, smoke_splits):
    """One plain run per base method, shared by the cases (trained on first use)."""
    root = tmp_path_factory.mktemp("plain")
    done: dict = {}

    def get(method: str):
        if method not in done:
            done[method] = train(root / method, smoke_suite, smoke_splits,
                                 method=method).run_dir
        return done[method]
    return get


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_zero_strength_trains_as_the_plain_method_bit_for_bit(tmp_path, smoke_suite,
                                                              smoke_splits, plain_runs, index):
    method, zero, real = cases(smoke_suite.train.trades_beta)[index]
    check_zero_strength_is_plain(tmp_path, smoke_suite, smoke_splits, method, zero, real,
                                 plain_dir=plain_runs(method))


def test_every_registered_defense_is_covered_or_listed(smoke_suite):
    """Every defense ROBench ships (not those other tests register, e.g. README examples)."""
    covered = {zero.name for _, zero, _ in cases(smoke_suite.train.trades_beta)}
    shipped = {name for name, cls in list_defenses().items()
               if cls.__module__.split(".")[0] == "defenses"}
    assert len(shipped) >= 10
    assert covered | WITHOUT_ZERO == shipped
    assert not covered & WITHOUT_ZERO


def test_the_comparison_sees_a_different_seed(tmp_path, smoke_suite, smoke_splits, plain_runs):
    """The bit-for-bit comparison is not vacuous: another seed fails it."""
    other = train(tmp_path / "seed1", smoke_suite, smoke_splits, seed=1)
    with pytest.raises(AssertionError):
        assert_same_training(plain_runs("at"), other.run_dir)
