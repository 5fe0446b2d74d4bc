#!/usr/bin/env bash
# Installs ROBench (into .venv), runs the fmnist-quick suite for every defense
# and the AT baseline over the suite's seeds, and compiles the leaderboard into
# results/leaderboard/. Resumable: run it again after an interruption.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python scripts/run_full_evaluation.py --suite fmnist-quick "$@"
BOARD="$ROOT/results/leaderboard/leaderboard.md"
if [ -f "$BOARD" ]; then  # (with --results elsewhere, the script printed where it is)
    echo
    echo "leaderboard: $BOARD"
    cat "$BOARD"
fi
