#!/usr/bin/env bash
# One command from a fresh clone: set up (with test extras) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/python -m pytest -q "$@"
