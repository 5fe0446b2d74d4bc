#!/usr/bin/env bash
# Creates .venv (if missing) and installs ROBench with its dev extras into it.
# Sourced by scripts/quickstart.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "creating $ROOT/.venv"
    "$PY" -m venv "$ROOT/.venv"
fi
# shellcheck disable=SC1091
. "$ROOT/.venv/bin/activate"
if ! python -c "import bench, torch, pyautoattack, pandas, pytest, torchattacks" 2>/dev/null \
        || [ "$ROOT/pyproject.toml" -nt "$ROOT/.venv/.robench-installed" ]; then
    echo "installing ROBench and its dependencies into .venv (first time: a few minutes)"
    python -m pip install -q --upgrade pip
    python -m pip install -q -e "$ROOT[dev]"
    touch "$ROOT/.venv/.robench-installed"
fi
# Fashion-MNIST from Debian's package where we can install it (root, apt).
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian package dataset-fashion-mnist"
    (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) >/dev/null \
        || echo "warning: could not install dataset-fashion-mnist; torchvision will try to download it"
fi
