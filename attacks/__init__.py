"""Attacks: PGD / FGSM-RS / N-FGSM / CW-margin (own code) and the AutoAttack adapter.

``attacks.autoattack`` (which imports pyautoattack) is not imported here, so that
training code does not need AutoAttack installed; import it explicitly.
"""

from .pgd import (
    LOSSES,
    attack_loss,
    clean_accuracy,
    cw_margin,
    fgsm_rs,
    n_fgsm,
    pgd,
    robust_accuracy,
)

__all__ = [
    "LOSSES",
    "attack_loss",
    "clean_accuracy",
    "cw_margin",
    "fgsm_rs",
    "n_fgsm",
    "pgd",
    "robust_accuracy",
]
