"""Run a suite for every registered defense (or a given list), then compile the
leaderboard. Resumable: finished runs are skipped, half-done runs continue.

    python scripts/run_full_evaluation.py --suite fmnist-quick
    python scripts/run_full_evaluation.py --suite cifar10-linf --defenses awp --seeds 0,1,2

Each entry of --defenses is `NAME[:k=v,...]` or `METHOD+NAME+...` (e.g.
`trades+awp`). The plain methods of --methods (default: the suite's `methods`, e.g.
`at`) are always run as baselines. A defense without a method prefix runs with each of
those methods it composes with; one that composes with none of them runs with its own
first method of the same kind (multi-step or single-step) as the suite's methods, e.g.
CURE (TRADES only) as `trades+cure` on an AT suite, and is skipped with a note when
there is none (LAP, single-step only, on a multi-step suite). Every method a row uses
also gets its plain row, so every row has its reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import USER_ERRORS  # noqa: E402
from bench.config import (  # noqa: E402
    METHOD_KIND,
    METHODS,
    ConfigError,
    RunSpec,
    check_method,
    load_suite,
    parse_defense_arg,
)
from bench.runner import run_one, validate_spec  # noqa: E402
from defenses.base import list_defenses  # noqa: E402


def plan(suite_name: str, defenses: list[str] | None, methods: list[str] | None,
         seeds: list[int] | None) -> list[RunSpec]:
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
    for spec in specs_out:
        validate_spec(spec, suite)  # fail before any training
    return specs_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="fmnist-quick")
    parser.add_argument("--defenses", default=None,
                        help="comma-separated defenses (default: every registered one)")
    parser.add_argument("--methods", default=None,
                        help="baseline methods, comma-separated (default: the suite's)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default: the suite's)")
    parser.add_argument("--results", default="results")
    parser.add_argument("--out", default=None,
                        help="leaderboard folder (default RESULTS/leaderboard)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        specs = plan(
            args.suite,
            None if args.defenses is None else [d for d in args.defenses.split(",") if d],
            None if args.methods is None else [m for m in args.methods.split(",") if m],
            None if args.seeds is None else [int(s) for s in args.seeds.split(",")],
        )
    except (ConfigError, ValueError) as exc:
        print(f"run_full_evaluation: error: {exc}", file=sys.stderr)
        return 2
    suite = load_suite(args.suite)
    start = time.perf_counter()
    for number, spec in enumerate(specs, 1):
        print(f"[{number}/{len(specs)}] {spec.row_name} seed {spec.seed} "
              f"({time.perf_counter() - start:.0f}s elapsed)", flush=True)
        try:
            result = run_one(spec, Path(args.results), data_root=args.data_root,
                             device=args.device, progress=not args.quiet, suite=suite)
        except USER_ERRORS as exc:
            print(f"run_full_evaluation: error in {spec.row_name} seed {spec.seed}: {exc}\n"
                  f"(finished runs are kept; run the same command again to resume)",
                  file=sys.stderr)
            return 2
        print(f"    record: {result.record_path}", flush=True)
    from leaderboard.compile import write_leaderboard

    out = Path(args.out) if args.out else Path(args.results) / "leaderboard"
    for path in write_leaderboard(Path(args.results), out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
