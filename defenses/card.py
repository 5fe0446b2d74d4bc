"""Published numbers as structured records: what a paper reported, under which protocol,
and which ROBench suite (if any) runs a comparable protocol.

Every number a `DefenseCard` quotes is one `Published` entry in `card.published`. The
leaderboard's reproduction table (`leaderboard.reproduction`) reads them as plain data
(`DefenseCard.to_dict()`), finds the matching row of the named suite and prints ROBench's
number next to the paper's (see docs/reproduction.md).

Only the standard library and `bench.config.ConfigError` are imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.config import ConfigError

#: Metrics a suite's evaluation reports (the leaderboard's columns, as percentages there).
BOARD_METRICS = ("clean", "pgd20", "cw20", "autoattack")
#: What a number was measured on: the best checkpoint, the last one, or the only model the
#: paper evaluated (the final one; its tables may show it as both best and last).
CHECKPOINTS = ("best", "last", "final-only")
#: How the paper picked its best checkpoint: on the test set, on a validation split held
#: out of the training set, no selection (final model only), or not stated.
SELECTIONS = ("test", "validation", "none", "not stated")

# Protocol differences shared by many entries (the wording the reproduction table prints).
FULL_TRAIN = ("data: the paper trains on all 50k training images; ROBench's suites train "
              "on 49k and hold 1k out for validation")
BEST_ON_TEST = ("best checkpoint: the paper selects it on the test set, ROBench on its 1k "
                "validation split; compare the paper's best with ROBench's last")
BEST_NOT_STATED = ("best checkpoint: how the paper selected it is not recorded here; "
                   "ROBench selects on its 1k validation split; compared with ROBench's last")
#: The attack an entry names when it gives none (its eps is the entry's `eps`).
DEFAULT_ATTACKS = {"clean": "none (clean test images)", "test_error": "none (clean test images)",
                   "pgd10": "PGD-10", "pgd20": "PGD-20", "pgd50": "PGD-50", "cw20": "CW-20",
                   "autoattack": "AutoAttack"}


@dataclass(frozen=True)
class Published:
    """One published number (a percentage) and the protocol it was measured under.

    value: the number, in percent (accuracy; `metric="test_error"` is an error rate).
    metric: `clean`, `pgd20`, `cw20` or `autoattack` (a column of ROBench's board), or
        another measure (`pgd10`, `pgd50`, `test_error`) that the board does not report.
    attack: the attack as the paper ran it (steps, step size, restarts, AA version).
    checkpoint: `best`, `last` or `final-only` (see CHECKPOINTS).
    method: the ROBench base method of the paper's row (`at`, `trades`, `fgsm_rs`,
        `n_fgsm`, `standard`); defenses: the ROBench defenses of that row, in order
        (empty: the plain method); params: defense parameters that pick the paper's
        variant, `{defense: {param: value}}` (a ROBench row matches when its effective
        parameters include these).
    label: the row's name in the paper (e.g. "AT+DOM_DA (AugMix)").
    architecture, dataset, eps, epochs, runs: the paper's setting (runs: how many seeds
        the number averages, 0 when not recorded).
    data_split: what the paper trained on and what it selected with.
    selection: how the paper picked its best checkpoint (SELECTIONS).
    source: where the number comes from (the paper's table, the authors' logs, or
        "quoted by <paper>").
    suite: the ROBench suite that runs the closest protocol, or None when none does.
    differences: the known protocol differences between the paper and that suite (or
        why no suite matches).
    note: anything else (e.g. the paper's text disagrees with its logs).
    """

    value: float
    metric: str
    checkpoint: str
    method: str
    defenses: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)
    label: str = ""
    attack: str = ""
    architecture: str = "PreActResNet-18"
    dataset: str = "CIFAR-10"
    eps: str = "8/255"
    epochs: int = 0
    runs: int = 0
    data_split: str = ""
    selection: str = "not stated"
    source: str = ""
    suite: str | None = None
    differences: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        where = f"Published({self.label or self.method} {self.metric} {self.checkpoint})"
        if isinstance(self.value, bool) or not isinstance(self.value, int | float) or not (
                math.isfinite(self.value) and 0.0 <= self.value <= 100.0):
            raise ConfigError(f"{where}: value must be a percentage in [0, 100], got "
                              f"{self.value!r}")
        if not (isinstance(self.metric, str) and self.metric):
            raise ConfigError(f"{where}: metric must be a non-empty string such as "
                              f"{BOARD_METRICS}")
        if self.checkpoint not in CHECKPOINTS:
            raise ConfigError(f"{where}: checkpoint must be one of {CHECKPOINTS}, got "
                              f"{self.checkpoint!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"{where}: selection must be one of {SELECTIONS}, got "
                              f"{self.selection!r}")
        if not (isinstance(self.method, str) and self.method):
            raise ConfigError(f"{where}: method must name a ROBench base method (e.g. 'at')")
        if self.suite is not None and not (isinstance(self.suite, str) and self.suite):
            raise ConfigError(f"{where}: suite must be a suite name or None, got "
                              f"{self.suite!r}")
        for name in ("defenses", "differences"):
            items = getattr(self, name)
            if isinstance(items, str) or not all(isinstance(i, str) for i in items):
                raise ConfigError(f"{where}: {name} must be a tuple of strings, got {items!r}")
            object.__setattr__(self, name, tuple(items))
        if not self.attack:
            object.__setattr__(self, "attack", DEFAULT_ATTACKS.get(self.metric, ""))
        if not isinstance(self.params, dict):
            raise ConfigError(f"{where}: params must be a dict {{defense: {{param: value}}}}")


def entries(protocol: dict, *numbers: tuple) -> tuple[Published, ...]:
    """Several numbers of one protocol (a row of a paper's table): `protocol` holds the
    shared `Published` fields; each number is `(metric, checkpoint, value)`, optionally
    with a fourth item, a dict of fields that differ for that number."""
    out = []
    for number in numbers:
        metric, checkpoint, value, *rest = number
        out.append(Published(**{**protocol, **(rest[0] if rest else {}), "metric": metric,
                                "checkpoint": checkpoint, "value": value}))
    return tuple(out)


def row(protocol: dict, metrics: tuple[str, ...], best: tuple[float, ...] = (),
        last: tuple[float, ...] = (), final_only: tuple[float, ...] = ()) -> tuple[Published, ...]:
    """One row of a paper's table: the values of `metrics` (in that order) at each
    checkpoint given, all under `protocol` (the shared `Published` fields)."""
    out: list[Published] = []
    for checkpoint, values in (("best", best), ("last", last), ("final-only", final_only)):
        if values and len(values) != len(metrics):
            raise ConfigError(f"published row {protocol.get('label', '')!r}: {len(values)} "
                              f"{checkpoint} values for {len(metrics)} metrics {metrics}")
        out += entries(protocol, *((m, checkpoint, v) for m, v in zip(metrics, values)))
    return tuple(out)
