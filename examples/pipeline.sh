#!/usr/bin/env bash
# The whole FPE workflow on scikit-learn's digits, as a compression engineer would run it:
#   data -> train a dense baseline -> expand (same non-zero weights) -> fine-tune with masks locked
#   -> evaluate side by side with the dense model trained for the same total epochs -> count parameters.
#
#   bash examples/pipeline.sh                      # fpe on PATH; works in a temp dir, removed at the end
#   EPOCHS=100 HIDDEN=16 ALPHA=4 SEED=1 KEEP=1 bash examples/pipeline.sh
#
# Under torchrun, any train/finetune step runs data-parallel, e.g.:
#   torchrun --standalone --nproc-per-node 2 -m fpe_cli finetune dense.fpe.safetensors --data digits.npz
set -euo pipefail

EPOCHS="${EPOCHS:-100}"   # dense training epochs; fine-tuning gets as many again
HIDDEN="${HIDDEN:-8}"     # hidden width of the dense model
ALPHA="${ALPHA:-4}"      # children per hidden neuron
SEED="${SEED:-0}"

work="$(mktemp -d "${TMPDIR:-/tmp}/fpe-pipeline.XXXXXX")"
if [[ -z "${KEEP:-}" ]]; then trap 'rm -rf "$work"' EXIT; else echo "working in $work" >&2; fi
cd "$work"

# 1. Data: the built-in set as a plain .npz (x_train, y_train, x_test, y_test) other tools can read too.
fpe data digits -o digits.npz

# 2. A dense baseline, and the same model trained for as many epochs again (the fair comparison).
fpe train --data digits.npz --hidden "$HIDDEN" --epochs "$EPOCHS" --seed "$SEED" -o dense.safetensors
fpe finetune dense.safetensors --data digits.npz --epochs "$EPOCHS" --seed "$SEED" -o dense.2x.safetensors

# 3. Expand: every hidden neuron -> ALPHA children with disjoint input edges; weights stay the same count.
fpe expand dense.safetensors --alpha "$ALPHA" --split random --seed "$SEED" --data digits.npz -o dense.fpe.safetensors

# 4. Fine-tune with every mask locked (same layout back: packed), then check FPE's invariants (exit 3 if broken).
fpe finetune dense.fpe.safetensors --data digits.npz --epochs "$EPOCHS" --seed "$SEED" -o dense.fpe.ft.safetensors
fpe verify dense.fpe.ft.safetensors --source dense.safetensors

# 5. Side by side at equal non-zero weights, then the parameter and byte counts of the result.
fpe evaluate dense.safetensors dense.2x.safetensors dense.fpe.safetensors dense.fpe.ft.safetensors --data digits.npz
fpe params dense.fpe.ft.safetensors

# 6. For scripts: one JSON document per command.
fpe evaluate dense.2x.safetensors dense.fpe.ft.safetensors --data digits.npz --json > results.json
python3 - results.json <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["models"]
dense, fpe = rows
assert dense["weights"] == fpe["weights"], "equal non-zero weight budget"
gain = (fpe["test"]["accuracy"] - dense["test"]["accuracy"]) / dense["test"]["accuracy"]
print(f"dense {dense['test']['accuracy']:.4f} vs FPE {fpe['test']['accuracy']:.4f} at {fpe['weights']} weights "
      f"(relative gain {gain:+.2%})")
EOF
