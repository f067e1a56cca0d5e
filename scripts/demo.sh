#!/usr/bin/env bash
# One command from a fresh clone: set up, expand a bundled sample checkpoint at alpha 4, count its parameters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh data
mkdir -p out
.venv/bin/fpe expand sample_checkpoints/digits_mlp.safetensors --alpha 4 --data digits \
  -o out/digits_mlp.fpe4.safetensors --force
.venv/bin/fpe params out/digits_mlp.fpe4.safetensors
.venv/bin/fpe verify out/digits_mlp.fpe4.safetensors --source sample_checkpoints/digits_mlp.safetensors
