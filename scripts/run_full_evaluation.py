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

This script never imports defense code: planning, each run's training and each run's
evaluation happen in processes of their own (see `bench/runner.py`). A run that fails
is reported in one line and the others go on; the script exits with status 2 if any
failed (`--debug` shows tracebacks).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.config import load_suite  # noqa: E402
from bench.planning import plan_runs as plan  # noqa: E402,F401  (in-process, for tests)
from bench.runner import Launch, plan_in_child, run_one  # noqa: E402
from bench.worker import USER_ERRORS  # noqa: E402


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
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (default: torch's default)")
    parser.add_argument("--debug", action="store_true", help="tracebacks of failures")
    args = parser.parse_args(argv)
    launch = Launch(Path(args.results), args.data_root, args.device, not args.quiet,
                    args.threads, args.debug)
    try:
        suite = load_suite(args.suite)
        specs = plan_in_child(
            args.suite,
            None if args.defenses is None else [d for d in args.defenses.split(",") if d],
            None if args.methods is None else [m for m in args.methods.split(",") if m],
            None if args.seeds is None else [int(s) for s in args.seeds.split(",")],
            launch)
    except (*USER_ERRORS, ValueError) as exc:
        print(f"run_full_evaluation: error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    failures = []
    for number, spec in enumerate(specs, 1):
        print(f"[{number}/{len(specs)}] {spec.row_name} seed {spec.seed} "
              f"({time.perf_counter() - start:.0f}s elapsed)", flush=True)
        try:
            result = run_one(spec, Path(args.results), data_root=args.data_root,
                             device=args.device, progress=not args.quiet, suite=suite,
                             threads=args.threads, debug=args.debug)
        except KeyboardInterrupt:
            print(f"run_full_evaluation: interrupted in {spec.row_name} seed {spec.seed}; "
                  "finished runs are kept and a run resumes from its last checkpoint: run the "
                  "same command again to go on", file=sys.stderr)
            return 130
        except USER_ERRORS as exc:
            print(f"run_full_evaluation: error in {spec.row_name} seed {spec.seed}: {exc}",
                  file=sys.stderr, flush=True)
            failures.append(spec)
            continue
        print(f"    record: {result.record_path}", flush=True)
    from leaderboard.compile import write_leaderboard

    out = Path(args.out) if args.out else Path(args.results) / "leaderboard"
    try:
        for path in write_leaderboard(Path(args.results), out):
            print(path)
    except ValueError as exc:  # no usable record at all
        print(f"run_full_evaluation: error: {exc}", file=sys.stderr)
        return 2
    if failures:
        print(f"run_full_evaluation: {len(failures)} of {len(specs)} run(s) failed: "
              + ", ".join(f"{s.row_name} seed {s.seed}" for s in failures)
              + " (finished runs are kept; fix the cause and run the same command again "
              "to resume)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
