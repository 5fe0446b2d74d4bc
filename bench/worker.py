"""The processes the launcher starts (`bench/runner.py`); not a user command.

    python -m bench.worker train  --error-file F [--debug]  < {"spec", "suite", ...}
    python -m bench.worker plan   --error-file F [--debug]  < {"suite", "defenses", ...}
    python -m bench.worker params --error-file F [--debug]  < {"suite", "spec"}
    python -m bench.worker cost   --error-file F [--debug]  < {"suite", "specs", ...} + commands

`train` and `cost` are the only kinds of process that run defense hooks. `train` validates
the spec, builds the training splits (never the test split) and trains or resumes the run.
`cost` (`bench/cost_probe.py`) runs blocks of training steps of each row on command, for
`robench cost` to time from outside. `plan` expands a full evaluation into run specs (it
reads the defenses' declared methods and builds each run's defenses, which runs their
constructors and `check_run`) and prints them as JSON, each with its defenses' effective
parameters; `params` prints those of one run (the launcher checks a finished run's record
against them before reusing it). Each writes its one-line error to the error file and
exits with status 2 (the user's input or defense code failed) or 1 (an internal error;
`--debug` prints its traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.config import ConfigError, RunSpec, Suite, check_method
from bench.data import DataNotFoundError
from bench.errors import (
    DefenseError,
    LockLostError,
    NonFiniteLossError,
    RunBusyError,
    RunFailedError,
    RunMismatchError,
)
from bench.lifeline import die_with_parent
from bench.records import RecordError

# errors with a message written for the user: one line, no traceback, exit status 2
USER_ERRORS = (ConfigError, DataNotFoundError, RecordError, RunMismatchError, NonFiniteLossError,
               DefenseError, RunFailedError, RunBusyError, LockLostError, TimeoutError)


def validate_spec(spec: RunSpec, suite: Suite) -> dict[str, dict]:
    """Fail fast on unknown methods/defenses/parameters and slot conflicts,
    before any data is loaded or any training starts (imports the defenses). Returns each
    defense's effective parameters (defaults < method defaults < suite < run), as the
    record and the checkpoints store them."""
    from defenses.registry import build_defenses

    check_method(spec.method)
    return {d.name: dict(d.hparams) for d in build_defenses(spec.defenses, spec.method, suite)}


def train(payload: dict) -> None:
    import torch

    from bench.curves import pick_device
    from bench.data import build_splits
    from bench.engine import Trainer
    from bench.runner import run_dir_for

    if payload.get("threads"):
        torch.set_num_threads(int(payload["threads"]))
    suite = Suite.from_dict(payload["suite"])
    spec = RunSpec.from_dict(payload["spec"])
    validate_spec(spec, suite)
    run_dir = run_dir_for(spec, Path(payload["results"]))
    splits = build_splits(suite.data, payload.get("data_root"), suite.curves.size)
    Trainer(spec, suite, splits, run_dir, device=pick_device(payload.get("device")),
            progress=bool(payload.get("progress", True)),
            compile=payload.get("compile") or False).train()


def plan(payload: dict) -> None:
    from bench.planning import plan_runs_with_params

    planned = plan_runs_with_params(payload["suite"], payload.get("defenses"),
                                    payload.get("methods"), payload.get("seeds"))
    # with each run, its defenses' effective parameters: the launcher (which never imports
    # defense code) checks a finished run's record against them before reusing it
    print(json.dumps([{**spec.to_dict(), "effective_params": params}
                      for spec, params in planned], default=str))


def params(payload: dict) -> None:
    """One run's effective defense parameters (what `validate_spec` returns), as JSON."""
    suite = Suite.from_dict(payload["suite"])
    print(json.dumps(validate_spec(RunSpec.from_dict(payload["spec"]), suite), default=str))


def report(error_file: str | None, message: str) -> None:
    """The one line goes to the error file (the launcher prints it) or to stderr."""
    message = " ".join(message.split())  # one line, whatever the exception's text held
    if error_file:
        Path(error_file).write_text(message + "\n")
    else:
        print(f"robench: error: {message}", file=sys.stderr)


def child_main(action: Callable[[], None], error_file: str | None, debug: bool) -> int:
    """Run `action`; turn its failure into one line (exit 2 for the user's errors, 1 for
    internal ones), with the traceback on stderr under `debug`."""
    try:
        action()
    except USER_ERRORS as exc:
        if debug:
            traceback.print_exc()
        report(error_file, str(exc))
        return 2
    except KeyboardInterrupt:
        report(error_file, "interrupted; what was computed is kept, run the same command "
                           "again to resume")
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        report(error_file, f"internal error: {type(exc).__name__}: {exc} (rerun with --debug "
                           "for the traceback)")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("command", choices=("train", "plan", "params", "cost"))
    parser.add_argument("--error-file", default=None)
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    die_with_parent()
    if args.command == "cost":  # the payload is the first line; commands follow
        from bench.cost_probe import serve

        payload = json.loads(sys.stdin.readline())
        return child_main(lambda: serve(payload), args.error_file, args.debug)
    payload = json.loads(sys.stdin.read())
    action = {"train": train, "plan": plan, "params": params}[args.command]
    return child_main(lambda: action(payload), args.error_file, args.debug)


if __name__ == "__main__":
    sys.exit(main())
