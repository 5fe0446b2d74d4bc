"""Catastrophic overfitting (CO) detection from a run's per-epoch curves.

Catastrophic overfitting (Wong, Rice & Kolter, ICLR 2020) is the sudden collapse of
single-step adversarial training: within an epoch or two, multi-step (PGD) robust
accuracy falls to about zero while single-step (FGSM) accuracy stays high or even
climbs, because the model has learned to defeat the one attack it trains against.

The detector reads the `history.jsonl` rows the engine writes: `val_robust` (PGD, the
suite's curve attack) and, when the suite sets `[curves] fgsm = true`, `val_fgsm`
(FGSM from a zero start with step eps, the convention of the CO literature). With
P_e, F_e the validation PGD and FGSM accuracies of epoch e, P*_e the running maximum
of P over epochs 1..e and F^_e the FGSM accuracy of the (first) epoch where P reached
P*_e, CO is flagged at the first epoch e where, at e and at each of the next
PERSIST_EPOCHS - 1 epochs,

1. PGD collapsed: P_e < PGD_FLOOR, or P_e < P*_e - PGD_DROP; and
2. FGSM stayed high: F_e >= F^_e - FGSM_MAX_FALL (FGSM did not collapse with PGD: it
   is at least at about the level it had when PGD peaked) and F_e >= P_e + FGSM_MIN_GAP
   (single-step accuracy clearly above multi-step).

F^ is the reference rather than FGSM's own running maximum because the FGSM accuracy of
a collapsed model can swing widely from epoch to epoch (Fashion-MNIST with an injected
feature: 0.18-0.97 while PGD sat at 0.00-0.02 for 25 epochs); one high spike must not
raise the bar that every later epoch has to clear.

CO persists; a one-epoch dip that recovers at once (seen with N-FGSM at a large radius
under a high learning rate) is training noise, hence the persistence condition. A
collapse in the final epoch alone cannot be confirmed and is not flagged.

Condition 2 separates CO from a model that simply diverged (both accuracies fall) or
never became robust (both low, as in standard training).

Without an FGSM curve only condition 1 can be checked ("PGD only"). To keep a model
that never became robust from being flagged, the floor part then also needs P*_e >=
PGD_FLOOR_REACHED (the accuracy *fell* below the floor). A PGD-only result cannot tell
CO from a large, sudden robust-overfitting drop; the result's `rule` says which check ran.
Run records therefore carry a CO result only when the FGSM curve exists
(`catastrophic_overfitting_field`).

Plain Python on purpose (no torch): the rule can be re-applied to any history. Records
carry the rule's version (`RULE_VERSION`) next to the verdict; when the rule changes,
`robench recheck-co` re-applies the current one to existing records from the curves they
store (`recheck_record`), without retraining or re-attacking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

PGD_FLOOR = 0.05  # validation PGD accuracy below this counts as collapsed
PGD_DROP = 0.20  # ... as does falling more than this below its running maximum
PGD_FLOOR_REACHED = 0.10  # PGD-only mode: the floor counts once PGD had reached this
FGSM_MAX_FALL = 0.10  # FGSM "stays high": at most this below its value at the PGD peak
FGSM_MIN_GAP = 0.20  # ... and at least this above the PGD accuracy of the same epoch
PERSIST_EPOCHS = 2  # the conditions must hold for this many consecutive epochs

# Version of the rule above, stored in every record as `catastrophic_overfitting_rule`.
# 1: FGSM "stayed high" meant at least its own running maximum minus 0.10 (missed collapses
#    whose FGSM accuracy oscillates). 2: measured against FGSM at the PGD peak (current).
RULE_VERSION = 2
RULE_KEY = "catastrophic_overfitting_rule"
RECORD_KEY = "catastrophic_overfitting"

PGD_KEY = "val_robust"
FGSM_KEY = "val_fgsm"


@dataclass(frozen=True)
class COEvent:
    """The first epoch flagged as catastrophic overfitting, and why."""

    epoch: int
    val_pgd: float
    val_fgsm: float | None  # None when the suite records no FGSM curve
    val_pgd_max: float  # running maximum of the validation PGD accuracy at that epoch
    rule: str  # human-readable: which check fired, with the thresholds

    def to_dict(self) -> dict:
        return asdict(self)


def _number(row: dict, key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _pgd_collapse(pgd: float, pgd_max: float, pgd_only: bool) -> str | None:
    """Which PGD collapse check fired (a short text), or None."""
    if pgd < PGD_FLOOR and (not pgd_only or pgd_max >= PGD_FLOOR_REACHED):
        reached = f" after reaching {pgd_max:.3f}" if pgd_only else ""
        return f"val PGD {pgd:.3f} < {PGD_FLOOR}{reached}"
    if pgd < pgd_max - PGD_DROP:
        return f"val PGD {pgd:.3f} fell more than {PGD_DROP} below its maximum {pgd_max:.3f}"
    return None


def _fgsm_high(fgsm: float, fgsm_at_pgd_peak: float, pgd: float) -> bool:
    return fgsm >= fgsm_at_pgd_peak - FGSM_MAX_FALL and fgsm >= pgd + FGSM_MIN_GAP


def has_fgsm_curve(history: Sequence[dict]) -> bool:
    """True when every row carries a numeric `val_fgsm` (the suite records the FGSM curve)."""
    return bool(history) and all(_number(row, FGSM_KEY) is not None for row in history)


def detect_catastrophic_overfitting(history: Sequence[dict]) -> COEvent | None:
    """The first CO epoch of a run's history rows (see the module docstring), or None.

    Rows without a numeric `val_robust` are skipped. The FGSM condition is applied when
    every row has `val_fgsm`; otherwise the PGD-only check runs and `rule` says so.
    """
    events = _epoch_checks(history)
    for start in range(len(events) - PERSIST_EPOCHS + 1):
        window = events[start:start + PERSIST_EPOCHS]
        if all(event is not None for event in window):
            return window[0]
    return None


def _epoch_checks(history: Sequence[dict]) -> list[COEvent | None]:
    """Per row with a numeric PGD accuracy: the event if both conditions hold there."""
    with_fgsm = has_fgsm_curve(history)
    pgd_max = fgsm_at_pgd_peak = float("-inf")
    checks: list[COEvent | None] = []
    held = f" (held {PERSIST_EPOCHS} consecutive epochs)"
    for position, row in enumerate(history, start=1):
        pgd = _number(row, PGD_KEY)
        if pgd is None:
            continue
        fgsm = _number(row, FGSM_KEY) if with_fgsm else None
        if pgd > pgd_max:
            pgd_max = pgd
            fgsm_at_pgd_peak = fgsm if fgsm is not None else fgsm_at_pgd_peak
        collapse = _pgd_collapse(pgd, pgd_max, pgd_only=fgsm is None)
        epoch = int(row.get("epoch", position))
        event = None
        if collapse is not None and fgsm is None:
            event = COEvent(epoch, pgd, None, pgd_max,
                            f"PGD only (no FGSM curve): {collapse}{held}")
        elif collapse is not None and _fgsm_high(fgsm, fgsm_at_pgd_peak, pgd):
            rule = (f"{collapse}, while val FGSM {fgsm:.3f} stayed at least its value at the "
                    f"PGD peak ({fgsm_at_pgd_peak:.3f}) minus {FGSM_MAX_FALL} and at least "
                    f"{FGSM_MIN_GAP} above PGD{held}")
            event = COEvent(epoch, pgd, fgsm, pgd_max, rule)
        checks.append(event)
    return checks


def catastrophic_overfitting_field(history: Sequence[dict]) -> dict | None:
    """The record's `catastrophic_overfitting` value: None or the event as a dict.

    Records are checked only when the run has the FGSM curve (the single-step suites set
    `[curves] fgsm = true`). Without it only the PGD-only check could run, and in
    multi-step training a sudden, transient PGD drop is not CO: a PGD-AT run with a
    learned augmentation policy on fmnist-quick lost 30 points of validation PGD accuracy
    for two epochs when the policy started after its warm-up, and recovered."""
    if not has_fgsm_curve(history):
        return None
    event = detect_catastrophic_overfitting(history)
    return None if event is None else event.to_dict()


def history_from_curves(curves: dict[str, list]) -> list[dict]:
    """Rebuild per-epoch history rows from a record's `history.curves` (column lists)."""
    lengths = {len(values) for values in curves.values() if isinstance(values, list)}
    if len(lengths) != 1:
        raise ValueError(f"record curves have unequal or no columns (lengths {sorted(lengths)})")
    (length,) = lengths
    return [{key: values[i] for key, values in curves.items()} for i in range(length)]


def recheck_record(record: dict) -> tuple[dict | None, dict | None]:
    """Re-apply the current CO rule to a run record, in place, from its stored curves.

    Sets the record's verdict and `catastrophic_overfitting_rule` (= RULE_VERSION).
    Returns (old verdict, new verdict). Raises ValueError when the record has no usable
    curves (nothing is changed then).
    """
    curves = (record.get("history") or {}).get("curves")
    if not isinstance(curves, dict) or not curves:
        raise ValueError("record has no history.curves to re-check")
    new = catastrophic_overfitting_field(history_from_curves(curves))
    old = record.get(RECORD_KEY)
    record[RECORD_KEY] = new
    record[RULE_KEY] = RULE_VERSION
    return old, new
