"""A full evaluation: plan a suite's rows (every registered defense or a given list, with
their baselines), run them (one after another, N at a time, or as Ray tasks), then compile
the leaderboard. `robench board` and `scripts/run_full_evaluation.py` are this module.

Each entry of --defenses is `NAME[:k=v,...]` or `METHOD+NAME+...` (e.g. `trades+NAME`);
how entries become rows with their baselines: `bench/planning.py`.

The launcher never imports defense code: planning, each run's training and each run's
evaluation happen in processes of their own (`bench/runner.py`). A run that fails is
reported in one line and the others go on; the command exits with status 2 if any failed
(`--debug` shows tracebacks). Resumable: finished runs are kept, half-done runs continue.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.compiled import add_compile_argument
from bench.config import load_suite
from bench.progress import JobProgress
from bench.runner import Launch, plan_with_params_in_child
from bench.scheduler import Outcome, available_cores, run_plan, threads_per_run
from bench.worker import USER_ERRORS


def comma_list(text: str | None) -> list[str] | None:
    """`a,b,,c` -> ['a', 'b', 'c']; None (the option not given) stays None."""
    return None if text is None else [item for item in text.split(",") if item]


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--workers", type=int, default=None,
                        help="runs at a time on this machine (default: one per CPU core, "
                        "each with one thread, on the CPU; 1 on a GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (default: the cores divided by --workers)")
    add_compile_argument(parser)
    parser.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                        help="run each run as a Ray task: on the cluster at ADDRESS, or "
                        "(no ADDRESS) the one RAY_ADDRESS names or a local one")
    parser.add_argument("--quiet", action="store_true",
                        help="one line per finished run, no progress bars")
    parser.add_argument("--debug", action="store_true", help="tracebacks of failures")


def default_workers(device: str | None) -> int:
    """On the CPU, one run per core with one thread each: on 2 cores as fast as one run
    at a time with 2 threads (measured, docs/scale-out.md), and a run's numbers then do
    not depend on how many cores the machine has. On a GPU, one run at a time."""
    import torch

    gpu = device.startswith("cuda") if device else torch.cuda.is_available()
    return 1 if gpu else available_cores()


def main(args: argparse.Namespace, prog: str = "robench board") -> int:
    if args.workers is not None and args.workers < 1:
        print(f"{prog}: error: --workers must be at least 1, got {args.workers}",
              file=sys.stderr)
        return 2
    results = Path(args.results).resolve()
    planning = Launch(results, args.data_root, args.device, not args.quiet, args.threads,
                      args.debug, compile=args.compile)
    try:
        suite = load_suite(args.suite)
        specs, expected_params = plan_with_params_in_child(
            args.suite,
            comma_list(args.defenses), comma_list(args.methods),
            None if args.seeds is None else [int(s) for s in comma_list(args.seeds)],
            planning)
    except (*USER_ERRORS, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.ray is not None:
            from bench.ray_launch import run_plan_on_ray

            planning.expected_params = expected_params
            outcomes = run_plan_on_ray(specs, suite, planning, args.ray,
                                       JobProgress(specs, 1, JobProgress.choose_mode(args.quiet)))
        else:
            workers = args.workers or default_workers(args.device)
            launch = Launch(results, args.data_root, args.device, not args.quiet,
                            threads_per_run(workers, args.threads, args.device), args.debug,
                            expected_params=expected_params, compile=args.compile)
            progress = JobProgress(specs, workers, JobProgress.choose_mode(args.quiet))
            outcomes = run_plan(specs, suite, launch, workers, progress)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished runs are kept and a run resumes from its last "
              "checkpoint: run the same command again to go on", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return finish(outcomes, results, args, prog)


def finish(outcomes: list[Outcome], results: Path, args: argparse.Namespace, prog: str) -> int:
    from leaderboard.compile import write_leaderboard

    out = Path(args.out) if args.out else results / "leaderboard"
    failed = [o for o in outcomes if o.status == "failed"]
    if len(failed) < len(outcomes):
        try:
            for path in write_leaderboard(results, out):
                print(path)
        except ValueError as exc:  # no usable record at all
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
    if failed:
        for outcome in failed:
            print(f"{prog}: error in {outcome.spec.row_name} seed {outcome.spec.seed}: "
                  f"{outcome.message}", file=sys.stderr)
        print(f"{prog}: {len(failed)} of {len(outcomes)} run(s) failed: "
              + ", ".join(f"{o.spec.row_name} seed {o.spec.seed}" for o in failed)
              + " (finished runs are kept; fix the cause and run the same command again to "
              "resume)", file=sys.stderr)
        return 2
    return 0


def cli(argv: list[str] | None = None, prog: str = "robench board") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return main(parser.parse_args(argv), prog)
