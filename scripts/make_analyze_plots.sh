#!/usr/bin/env bash
# Regenerate docs/img/analyze_*.png: fpe analyze on the DNF sample, dense vs. its clause-split expansion.
set -euo pipefail
cd "$(dirname "$0")/.."
fpe="${FPE:-.venv/bin/fpe}"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
data='dnf:vars=48,clauses=16,k=3,outputs=or,encoding=pm1,sampling=planted,positives=0.5,train=4000,test=2000,seed=0'
"$fpe" expand sample_checkpoints/dnf_mlp.safetensors --alpha 2 --split clause \
  --clause-map sample_checkpoints/dnf_clauses.json -o "$work/dnf.clause.safetensors" -q
"$fpe" analyze sample_checkpoints/dnf_mlp.safetensors "$work/dnf.clause.safetensors" --data "$data" --plots "$work/plots"
mkdir -p docs/img
for f in gram weights capacity; do cp "$work/plots/$f.png" "docs/img/analyze_$f.png"; done
