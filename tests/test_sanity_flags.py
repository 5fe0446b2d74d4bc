"""Each masking check fires just above its documented threshold (docs/trust.md, "The
flags") and stays silent just below it; the numbers here are written by hand from that
table, not taken from `bench.sanity`."""

from __future__ import annotations

import pytest

from bench.config import load_suite
from bench.sanity import flags_from

HONEST = {  # a well-behaved model: 200 attack images, 100 sanity images
    "n": 200, "n_sanity": 100, "huge_eps_accuracy": 0.0, "huge_eps_survivors": 0.0,
    "pgd20_on_sanity": 0.5,
    "more_steps_accuracy": 0.5, "pgd20_on_subset": 0.5, "autoattack": 0.47,
    "square_only": 0.0, "zero_gradient_images": 0, "correct_images": 150,
}

# (change, the check that must fire, or None for silence)
CASES = {
    "huge eps 6 of 100": ({"huge_eps_accuracy": 0.06, "huge_eps_survivors": 0.06},
                          "huge_eps"),
    "huge eps 5 of 100 (at the threshold)": ({"huge_eps_survivors": 0.05}, None),
    "huge eps 4 of 8 (too few images)": ({"huge_eps_survivors": 0.5, "n_sanity": 8,
                                          "pgd20_on_sanity": 0.5, "more_steps_accuracy": 0.5},
                                         None),
    # PGD-10's big steps leave 14 images that smaller attacks at eps broke: not robust
    "huge eps 14 of 100, all broken at eps": ({"huge_eps_accuracy": 0.14,
                                              "huge_eps_survivors": 0.0}, None),
    # 0.02 + 2 * sqrt(0.5 * 0.5 / 100) = 0.12 above PGD-20's 0.5
    "more steps +0.13": ({"more_steps_accuracy": 0.63}, "more_steps"),
    "more steps +0.11": ({"more_steps_accuracy": 0.61}, None),
    # a PGD-20 accuracy of 0 still has noise 2 * sqrt(1/100 / 100) = 0.02: 0.04 is the limit
    "more steps from zero +0.05": ({"pgd20_on_sanity": 0.0, "more_steps_accuracy": 0.05},
                                   "more_steps"),
    "more steps from zero +0.03": ({"pgd20_on_sanity": 0.0, "more_steps_accuracy": 0.03}, None),
    "more steps +0.13, no AutoAttack": ({"more_steps_accuracy": 0.63, "autoattack": None},
                                        "more_steps"),
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
    # PGD fooled or unstable where AutoAttack ran: the ranked worst case counts AutoAttack
    counted = {"aa_pgd_gap", "more_steps"} if change.get("autoattack", 0.47) is not None else set()
    assert all(f["level"] == ("health" if f["check"] in counted else "masking") and f["message"]
               for f in fired)


def test_a_model_at_chance_gets_no_masking_check():
    """Measurements absent (the evaluator skips them at chance): nothing fires."""
    assert flags_from({"n": 200}, load_suite("smoke")) == []


def test_huge_eps_counts_only_images_that_survive_every_attack_too():
    """The eps-ball lies inside the huge one: an image broken at eps is not robust at 0.5."""
    import torch

    from bench.sanity import measure

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10)).eval()
    x, y = torch.rand(20, 3, 2, 2), torch.zeros(20, dtype=torch.long)
    with torch.no_grad():  # class 0 wins by far on every image: PGD at 0.5 cannot move it
        model[1].bias.copy_(torch.tensor([100.0] + [0.0] * 9))
    suite = load_suite("smoke")
    every = {"clean": torch.ones(20, dtype=torch.bool), "pgd20": torch.ones(20, dtype=torch.bool)}
    broken = {**every, "cw20": torch.arange(20) < 5}  # CW-20 broke images 5..19
    kept = measure(model, x, y, every, {}, suite, 0, None)
    assert kept["huge_eps_accuracy"] == 1.0 and kept["huge_eps_survivors"] == 1.0
    fewer = measure(model, x, y, broken, {}, suite, 0, None)
    assert fewer["huge_eps_accuracy"] == 1.0 and fewer["huge_eps_survivors"] == 5 / 20
