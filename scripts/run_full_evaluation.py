"""Run a suite for every registered defense (or a given list), then compile the
leaderboard; the same as `robench board` (see `bench/full_run.py` for the planning rules).

    python scripts/run_full_evaluation.py --suite fmnist-quick
    python scripts/run_full_evaluation.py --suite fmnist-quick --workers 2 --quiet
    python scripts/run_full_evaluation.py --suite cifar10-linf --defenses awp --seeds 0,1,2
    python scripts/run_full_evaluation.py --suite cifar10-linf --ray ray://head:10001

Resumable: finished runs are skipped, half-done runs continue. A run that fails is
reported in one line and the others go on; the script exits with status 2 if any failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.full_run import cli  # noqa: E402
from bench.planning import plan_runs as plan  # noqa: E402,F401  (in-process, for tests)


def main(argv: list[str] | None = None) -> int:
    return cli(argv, prog="run_full_evaluation")


if __name__ == "__main__":
    sys.exit(main())
