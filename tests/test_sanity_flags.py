"""Each masking check fires just above its documented threshold (docs/trust.md, "The
flags") and stays silent just below it; the numbers here are written by hand from that
table, not taken from `bench.sanity`."""

from __future__ import annotations

import pytest

from bench.config import load_suite
from bench.sanity import flags_from

HONEST = {  # a well-behaved model: 200 attack images, 100 sanity images
    "n": 200, "n_sanity": 100, "huge_eps_accuracy": 0.0, "pgd20_on_sanity": 0.5,
    "more_steps_accuracy": 0.5, "pgd20_on_subset": 0.5, "autoattack": 0.47,
    "square_only": 0.0, "zero_gradient_images": 0, "correct_images": 150,
}

# (change, the check that must fire, or None for silence)
CASES = {
    "huge eps 6 of 100": ({"huge_eps_accuracy": 0.06}, "huge_eps"),
    "huge eps 5 of 100 (at the threshold)": ({"huge_eps_accuracy": 0.05}, None),
    "huge eps 4 of 8 (too few images)": ({"huge_eps_accuracy": 0.5, "n_sanity": 8,
                                          "pgd20_on_sanity": 0.5, "more_steps_accuracy": 0.5},
                                         None),
    # 0.02 + 2 * sqrt(0.5 * 0.5 / 100) = 0.12 above PGD-20's 0.5
    "more steps +0.13": ({"more_steps_accuracy": 0.63}, "more_steps"),
    "more steps +0.11": ({"more_steps_accuracy": 0.61}, None),
    # a PGD-20 accuracy of 0 still has noise 2 * sqrt(1/100 / 100) = 0.02: 0.04 is the limit
    "more steps from zero +0.05": ({"pgd20_on_sanity": 0.0, "more_steps_accuracy": 0.05},
                                   "more_steps"),
    "more steps from zero +0.03": ({"pgd20_on_sanity": 0.0, "more_steps_accuracy": 0.03}, None),
    "AutoAttack 0.11 below PGD-20": ({"autoattack": 0.39}, "aa_pgd_gap"),
    "AutoAttack 0.09 below PGD-20": ({"autoattack": 0.41}, None),
    "no AutoAttack run": ({"autoattack": None}, None),
    "Square 7 of 200": ({"square_only": 0.035}, "square_beats_gradients"),
    "Square 5 of 200": ({"square_only": 0.025}, None),
    "Square 4 of 100 (too few images)": ({"square_only": 0.04, "n": 100}, None),
    "zero gradient 16 of 150": ({"zero_gradient_images": 16}, "zero_gradients"),
    "zero gradient 15 of 150 (10%)": ({"zero_gradient_images": 15}, None),
    "zero gradient 4 of 20 (too few images)": ({"zero_gradient_images": 4,
                                               "correct_images": 20}, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_check_fires_just_above_its_threshold_only(case):
    change, expected = CASES[case]
    fired = flags_from({**HONEST, **change}, load_suite("smoke"))
    assert [f["check"] for f in fired] == ([expected] if expected else [])
    # PGD-20 above AutoAttack: AutoAttack (so the ranked worst case) caught what PGD missed
    levels = {"aa_pgd_gap": "health"}
    assert all(f["level"] == levels.get(f["check"], "masking") and f["message"] for f in fired)


def test_a_model_at_chance_gets_no_masking_check():
    """Measurements absent (the evaluator skips them at chance): nothing fires."""
    assert flags_from({"n": 200}, load_suite("smoke")) == []
