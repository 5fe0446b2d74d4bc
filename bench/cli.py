"""The `robench` command line.

    robench run --suite SUITE --method METHOD [--defense NAME[:k=v,...]]... [--seed N]
                [--compile [MODE]]
    robench board --suite SUITE [--defenses ...] [--workers N | --ray [ADDRESS]]
    robench cost --suite SUITE [--defenses ...] [--rounds R] [--steps N]
    robench evaluate RUN_DIR
    robench show RUN_DIR [--out PATH] [--no-plot]
    robench verify [RESULTS] [--reevaluate K]
    robench check PATH.py:Class | NAME
    robench leaderboard [--results DIR] [--out DIR] [--strict]
    robench recheck-co [--results DIR] [--dry-run]
    robench export RUN_DIR --robustbench OUT [--checkpoint last|best] [--suite SUITE]
    robench list

Importing this module imports no defense code: `run` trains in a child process, and
`evaluate` (the process the runner starts) never touches a defense.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.compiled import add_compile_argument
from bench.config import (
    METHODS,
    ConfigError,
    RunSpec,
    Suite,
    list_suites,
    load_suite,
    parse_defense_arg,
)
from bench.records import RecordError
from bench.worker import USER_ERRORS as CHILD_USER_ERRORS
from bench.worker import child_main
from leaderboard.records import InvalidRecordError, RecordsNotFoundError

# errors with a message written for the user: printed without a traceback, exit code 2
USER_ERRORS = (*CHILD_USER_ERRORS, RecordsNotFoundError, InvalidRecordError)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="results", help="results folder (default: results/)")
    parser.add_argument("--data-root", default=None,
                        help="dataset folder (default: $ROBENCH_DATA or ~/.cache/robench/data)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the training and evaluation processes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robench", description="ROBench: a fair leaderboard of defenses against robust "
        "overfitting in adversarial training.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train and evaluate one run")
    run.add_argument("--suite", default="fmnist-quick",
                     help=f"suite name or path to a .toml ({', '.join(list_suites())})")
    run.add_argument("--method", default="at", help=f"base method: {', '.join(METHODS)}")
    run.add_argument("--defense", action="append", default=[], metavar="NAME[:k=v,...]",
                     help="a defense (repeatable): registered name or path/to/file.py:Class")
    run.add_argument("--seed", type=int, default=None, help="seed (default: the suite's first)")
    add_compile_argument(run)
    _add_common(run)

    from bench.full_run import add_arguments as add_board_arguments

    board = sub.add_parser("board", help="run every row of a suite (N runs at a time, or on "
                           "Ray), then compile the leaderboard")
    add_board_arguments(board)

    cost = sub.add_parser("cost", help="time every row of a suite side by side in one "
                          "process: the leaderboard's cost ratios, independent of the load")
    cost.add_argument("--suite", default="fmnist-quick")
    cost.add_argument("--defenses", default=None,
                      help="comma-separated defenses (default: every registered one)")
    cost.add_argument("--methods", default=None, help="baseline methods (default: the suite's)")
    cost.add_argument("--rounds", type=int, default=5, help="rounds of one block per row")
    cost.add_argument("--steps", type=int, default=None,
                      help="training steps per phase (default: 20, or one epoch if shorter)")
    _add_common(cost)

    ev = sub.add_parser("evaluate", help="(re-)evaluate a finished run folder")
    ev.add_argument("run_dir")
    ev.add_argument("--suite", default=None, help="suite file, if not a built-in suite")
    ev.add_argument("--suite-json", default=None, help=argparse.SUPPRESS)  # '-': stdin
    ev.add_argument("--data-root", default=None)
    ev.add_argument("--device", default=None)
    ev.add_argument("--threads", type=int, default=None, help="CPU threads")
    ev.add_argument("--quiet", action="store_true")
    ev.add_argument("--error-file", default=None, help=argparse.SUPPRESS)

    sh = sub.add_parser("show", help="one run: its curves as a PNG (train vs validation, best "
                        "epoch marked) and a summary of its record (metrics, flags, costs)")
    sh.add_argument("run_dir")
    sh.add_argument("--out", default=None,
                    help="the PNG: a .png file, or a folder (default: RUN_DIR/curves.png)")
    sh.add_argument("--no-plot", action="store_true", help="the text summary only")

    ve = sub.add_parser("verify", help="validate every record under RESULTS against its "
                        "schema and its checkpoints; optionally re-evaluate some")
    ve.add_argument("results", nargs="?", default="results")
    ve.add_argument("--reevaluate", type=int, default=0, metavar="K",
                    help="re-evaluate K records (chosen at random) and compare the numbers")
    ve.add_argument("--seed", type=int, default=0, help="which K records (default 0)")
    ve.add_argument("--data-root", default=None)
    ve.add_argument("--device", default=None)

    ch = sub.add_parser("check", help="the submission gate: static and dynamic checks of a "
                        "defense (PATH.py:Class or a registered name)")
    ch.add_argument("defense", help="path/to/file.py:Class, or a registered name")
    ch.add_argument("--static-only", action="store_true", help="skip the smoke-suite runs")

    lb = sub.add_parser("leaderboard", help="compile every record.json into tables")
    lb.add_argument("--results", default="results")
    lb.add_argument("--out", default=None, help="output folder (default: RESULTS/leaderboard)")
    lb.add_argument("--strict", action="store_true",
                    help="an invalid record is an error (default: left out with a warning)")

    co = sub.add_parser("recheck-co", help="re-apply the current catastrophic-overfitting rule "
                        "to existing records, from the curves they store (no retraining)")
    co.add_argument("--results", default="results")
    co.add_argument("--dry-run", action="store_true", help="report changes, write nothing")

    ex = sub.add_parser("export", help="an evaluated run as a RobustBench-style model entry "
                        "(JSON), a plain state_dict and its architecture")
    ex.add_argument("run_dir")
    ex.add_argument("--robustbench", required=True, metavar="OUT",
                    help="folder to write the entry, the state_dict and the architecture into")
    ex.add_argument("--checkpoint", choices=("last", "best"), default="last",
                    help="which checkpoint (default: last)")
    ex.add_argument("--suite", default=None, help="suite file, if not the built-in suite the "
                    "record names")

    sub.add_parser("list", help="suites, methods and defenses with their cards")
    for name, command in sub.choices.items():
        if name != "board":  # has its own
            command.add_argument("--debug", action="store_true",
                                 help="show the traceback of an error")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from bench.runner import run_one

    suite = load_suite(args.suite)
    defenses = tuple(parse_defense_arg(d) for d in args.defense)
    seed = suite.seeds[0] if args.seed is None else args.seed
    spec = RunSpec(suite=suite.name, method=args.method, defenses=defenses, seed=seed)
    result = run_one(spec, Path(args.results), data_root=args.data_root, device=args.device,
                     progress=not args.quiet, suite=suite, threads=args.threads,
                     debug=args.debug, compile=args.compile)
    record = json.loads(result.record_path.read_text())
    m = record["metrics"]["model"]
    aa = m["last"].get("autoattack")
    label = record["evaluation"]["autoattack"].get("label") or "AutoAttack"
    print(f"{spec.row_name} seed {spec.seed}: last clean {m['last']['clean']:.4f}, "
          f"PGD-20 {m['last']['pgd20']:.4f}, {label} {'n/a' if aa is None else f'{aa:.4f}'}, "
          f"worst case {m['last']['worst_case']:.4f}; best epoch "
          f"{record['history']['best_epoch']}")
    marks = [f"{f['check']} ({f['model']}, {f['checkpoint']})" for f in record["flags"]
             if f["level"] != "note"]
    if marks:
        print("flags: " + ", ".join(marks))
    print(f"record: {result.record_path}")
    return 0


def cmd_board(args: argparse.Namespace) -> int:
    from bench.full_run import main as board_main

    return board_main(args)


def cmd_cost(args: argparse.Namespace) -> int:
    from bench.cost import cost_table, measure_cost, write_cost
    from bench.curves import pick_device
    from bench.full_run import comma_list
    from bench.runner import Launch

    if args.rounds < 1 or (args.steps is not None and args.steps < 1):
        raise ConfigError("robench cost: --rounds and --steps must be at least 1")
    threads = args.threads or (1 if pick_device(args.device).type == "cpu" else None)
    launch = Launch(Path(args.results), args.data_root, args.device, False, threads,
                    args.debug)
    document = measure_cost(
        args.suite, comma_list(args.defenses), comma_list(args.methods),
        launch, args.steps, args.rounds, say=(lambda text: None) if args.quiet else print)
    print(cost_table(document))
    print(f"written: {write_cost(document, Path(args.results))}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    def evaluate() -> None:
        import torch

        from bench.curves import pick_device
        from bench.data import build_splits
        from bench.evaluate import evaluate_run

        run_dir = Path(args.run_dir)
        spec_path = run_dir / "spec.json"
        if not spec_path.exists():
            raise RecordError(f"{run_dir} is not a run folder (no spec.json)")
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.suite_json == "-":  # the launcher's suite, on stdin
            suite = Suite.from_dict(json.loads(sys.stdin.read()))
        else:
            spec = RunSpec.from_dict(json.loads(spec_path.read_text())["spec"])
            suite = load_suite(args.suite or spec.suite)
        splits = build_splits(suite.data, args.data_root, suite.curves.size, with_test=True)
        evaluate_run(run_dir, suite, splits, device=pick_device(args.device),
                     progress=not args.quiet)
        print(f"record: {run_dir / 'record.json'}")

    if args.error_file:  # started by the launcher (which holds the run's lock): its protocol
        from bench.lifeline import die_with_parent

        die_with_parent()
        return child_main(evaluate, args.error_file, args.debug)
    from bench.errors import RunBusyError
    from bench.locks import FolderLock

    if not (Path(args.run_dir) / "spec.json").exists():
        raise RecordError(f"{args.run_dir} is not a run folder (no spec.json)")
    lock = FolderLock(Path(args.run_dir), "robench evaluate")
    if not lock.try_acquire():
        raise RunBusyError(f"{args.run_dir} is being trained or evaluated by {lock.owner()}; "
                           "evaluate it once that is done")
    try:
        evaluate()
    finally:
        lock.release()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from bench.show import show

    print(show(args.run_dir, args.out, plot=not args.no_plot))
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from leaderboard.compile import write_leaderboard

    out = Path(args.out) if args.out else Path(args.results) / "leaderboard"
    paths = write_leaderboard(Path(args.results), out, strict=args.strict)
    for path in paths:
        print(path)
    return 0


def cmd_recheck_co(args: argparse.Namespace) -> int:
    from bench.overfitting import RULE_KEY, RULE_VERSION, recheck_record
    from bench.records import write_json_atomic
    from leaderboard.records import RECORD_NAME, how_to_make_records

    root = Path(args.results)
    paths = sorted(root.rglob(RECORD_NAME)) if root.is_dir() else []
    if not paths:
        raise RecordError(how_to_make_records(root))
    changed = updated = skipped = 0
    for path in paths:
        try:
            record = json.loads(path.read_text())
            rule_before = record.get(RULE_KEY)
            old, new = recheck_record(record)
        except (ValueError, AttributeError) as exc:  # unreadable JSON or no curves
            print(f"skipped {path}: {exc}", file=sys.stderr)
            skipped += 1
            continue
        if old == new and rule_before == RULE_VERSION:
            continue
        if old != new:
            changed += 1
            print(f"{record.get('row_name', '?')} seed {record.get('spec', {}).get('seed')}: "
                  f"CO epoch {_co_text(old)} -> {_co_text(new)} ({path})")
        updated += 1
        if not args.dry_run:
            write_json_atomic(path, record)
    verb = "would update" if args.dry_run else "updated"
    print(f"{len(paths)} record(s) checked with CO rule v{RULE_VERSION}: {verb} {updated} "
          f"({changed} verdict(s) changed), {skipped} skipped")
    return 0


def _co_text(verdict: dict | None) -> str:
    return "none" if not verdict else str(verdict.get("epoch"))


def cmd_export(args: argparse.Namespace) -> int:
    from bench.export import export_robustbench, summary_line

    paths = export_robustbench(Path(args.run_dir), Path(args.robustbench),
                               checkpoint=args.checkpoint, suite=args.suite)
    print(summary_line(paths))
    for path in paths:
        print(path)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from defenses.base import list_defenses

    print("Suites:")
    for name in list_suites():
        suite = load_suite(name)
        print(f"  {name:18s} {suite.description}")
        print(f"  {'':18s} methods: {', '.join(suite.methods)}")
        for defense, values in suite.defense_overrides.items():
            print(f"  {'':18s} sets {defense}: {values}")
    print("Methods:", ", ".join(METHODS))
    print("Defenses:")
    for name, cls in list_defenses().items():
        card = cls.card
        print(f"  {name:10s} {card.name}: {card.paper} ({card.venue}) {card.link}")
        print(f"  {'':10s} parameters {cls.params}; methods {list(cls.methods) or 'all'}; "
              f"slots {list(cls.slots) or 'none'}; extra data: {card.extra_data}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from bench.verify import verify_results

    return verify_results(Path(args.results), reevaluate=args.reevaluate, seed=args.seed,
                          data_root=args.data_root, device=args.device)


def cmd_check(args: argparse.Namespace) -> int:
    from bench.check import check_defense

    return check_defense(args.defense, dynamic=not args.static_only)


COMMANDS = {"run": cmd_run, "board": cmd_board, "cost": cmd_cost, "evaluate": cmd_evaluate,
            "show": cmd_show,
            "verify": cmd_verify, "check": cmd_check, "leaderboard": cmd_leaderboard,
            "recheck-co": cmd_recheck_co, "export": cmd_export, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"robench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception as exc:
        if args.debug:
            raise
        text = " ".join(str(exc).split())
        print(f"robench: internal error: {type(exc).__name__}: {text} (rerun with --debug for "
              "the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("robench: interrupted; what was computed is kept (a run resumes from its last "
              "checkpoint): run the same command again to go on", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
