#!/usr/bin/env bash
# Create .venv (if missing) and install fpe with the CPU build of torch pinned by constraints.txt.
# Usage: bash scripts/setup.sh [extras]   e.g. bash scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-data}"
python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[${extras}]"
