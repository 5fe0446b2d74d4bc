"""Expands a full evaluation (a suite, defenses, methods, seeds) into run specs.

Each entry of `defenses` is `NAME[:k=v,...]` or `METHOD+NAME+...` (e.g. `trades+NAME`).
The plain methods (default: the suite's `methods`, e.g. `at`) are always run as
baselines. A defense without a method prefix runs with each of those methods it composes
with; one that composes with none of them runs with its own first method of the same kind
(multi-step or single-step) as the suite's methods, e.g. a TRADES-only defense as
`trades+NAME` on an AT suite, and is skipped with a note when there is none (a
single-step-only defense on a multi-step suite). Every method a row uses also gets its plain
row, so every row has its reference.

Planning reads the defenses' declared methods, so it imports defense code: the launcher
runs it in a child process (`python -m bench.worker plan`), never in its own.
"""

from __future__ import annotations

import sys

from bench.config import (
    METHOD_KIND,
    METHODS,
    ConfigError,
    RunSpec,
    check_method,
    load_suite,
    parse_defense_arg,
)


def plan_runs(suite_name: str, defenses: list[str] | None, methods: list[str] | None,
              seeds: list[int] | None) -> list[RunSpec]:
    """The run specs of a full evaluation, each validated."""
    return [spec for spec, _ in plan_runs_with_params(suite_name, defenses, methods, seeds)]


def plan_runs_with_params(suite_name: str, defenses: list[str] | None,
                          methods: list[str] | None, seeds: list[int] | None
                          ) -> list[tuple[RunSpec, dict[str, dict]]]:
    """The plan, each run with its defenses' effective parameters (from the validation that
    builds them once)."""
    from bench.worker import validate_spec
    from defenses.base import list_defenses

    suite = load_suite(suite_name)
    seeds = seeds if seeds is not None else list(suite.seeds)
    methods = methods if methods is not None else list(suite.methods)
    for method in methods:
        check_method(method)  # a clear error before the plan looks up the method's kind
    combos: list[tuple[str, tuple]] = [(m, ()) for m in methods]
    registry = list_defenses()
    for entry in defenses if defenses is not None else list(registry):
        parts = entry.split("+")
        if parts[0] in METHODS:
            combos.append((parts[0], tuple(parse_defense_arg(d) for d in parts[1:])))
            continue
        specs = tuple(parse_defense_arg(d) for d in parts)
        cls = registry.get(specs[0].name)  # unknown or file-based: validate_spec decides
        usable = [m for m in methods if cls is None or not cls.methods or m in cls.methods]
        if not usable:
            kinds = {METHOD_KIND[m] for m in methods}
            usable = [m for m in cls.methods if METHOD_KIND[m] in kinds][:1]
            message = (f"{entry}: composes with {list(cls.methods)}, but suite "
                       f"{suite.name!r} runs {methods}")
            if usable:
                print(f"note {message}: running it as {usable[0]}+{entry}, with a "
                      f"plain {usable[0]} row as its reference", file=sys.stderr)
            elif defenses is not None:
                raise ConfigError(f"{message}; prefix a method, e.g. "
                                  f"{cls.methods[0]}+{entry}, or pick another suite")
            else:
                print(f"skipped {message}", file=sys.stderr)
        combos.extend((m, specs) for m in usable)
    for method in dict.fromkeys(m for m, _ in combos):  # every row's reference
        if (method, ()) not in combos:
            combos.append((method, ()))
    specs_out = [RunSpec(suite.name, m, d, seed) for m, d in combos for seed in seeds]
    # fail before any training; building the defenses also gives their parameters
    return [(spec, validate_spec(spec, suite)) for spec in specs_out]
