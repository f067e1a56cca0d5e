"""Make the bundled sample checkpoints in sample_checkpoints/ with fpe's own training code (seeded).

    python scripts/make_samples.py            # rewrites sample_checkpoints/*.safetensors, the clause map, README.md

Every file is what `fpe train` writes for the same settings (plain nn.Sequential names, the settings,
the data's hash and the final metrics in the metadata), so `fpe train ...` with the flags in the
README below reproduces it byte for byte.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fpe_cli.data import load_dataset, write_clause_map
from fpe_cli.train import TrainConfig
from fpe_cli.train_pipeline import train_file

OUT = Path(__file__).resolve().parents[1] / "sample_checkpoints"
DNF = "dnf:vars=48,clauses=16,k=3,outputs=or,encoding=pm1,sampling=planted,positives=0.5,train=4000,test=2000,seed=0"

SAMPLES = [  # (file, data, hidden widths, settings)
    ("digits_mlp.safetensors", "digits", [32], TrainConfig(epochs=60, lr=1e-3, batch_size=64, seed=0)),
    ("dnf_mlp.safetensors", DNF, [8], TrainConfig(epochs=300, lr=3e-3, batch_size=128, seed=0)),
    ("deep_mlp.safetensors", "digits", [48, 32, 24], TrainConfig(epochs=60, lr=1e-3, batch_size=64, seed=0)),
]

README = """# Sample checkpoints

Made by `python scripts/make_samples.py` with fpe's own training code; each is what `fpe train`
writes for these settings (plain `nn.Sequential` names `0.weight`, `0.bias`, `2.weight`, ...; relu;
float32; settings, data hash and final metrics in the `fpe.train.*` metadata).

| file | data | widths | epochs, lr, batch | bytes | test accuracy |
| --- | --- | --- | --- | --- | --- |
{rows}

Reproduce one with the CLI, e.g.:

```bash
{commands}
```

`dnf_mlp.safetensors` is the Boolean DNF task under superposition pressure: 16 clauses of 3 literals
over 48 variables (disjoint variables per clause), label = OR of the clauses, 8 hidden neurons (two
clauses per neuron). Generator spec (also in the file's `fpe.train.data` metadata):

    {dnf}

`dnf_clauses.json` is its clause map (`{{"groups": [[inputs of clause 0], ...], "num_inputs": 48}}`),
for `fpe expand dnf_mlp.safetensors --alpha 2 --split clause --clause-map dnf_clauses.json`.
Regenerate the data itself with `fpe data '{dnf}' -o dnf.npz --clause-map dnf_clauses.json`.
"""


def command(name: str, data: str, hidden: list[int], cfg: TrainConfig) -> str:
    return (f"fpe train --data '{data}' --hidden {','.join(map(str, hidden))} --epochs {cfg.epochs} --lr {cfg.lr} "
            f"--batch-size {cfg.batch_size} --seed {cfg.seed} -o {name}")


def main() -> int:
    OUT.mkdir(exist_ok=True)
    rows, commands = [], []
    for name, data, hidden, cfg in SAMPLES:
        doc = train_file(data, hidden, "relu", cfg, OUT / name, force=True)
        widths = "-".join(map(str, doc["widths"]))
        acc = doc["test"]["accuracy"]
        print(f"{name}: {widths}, test accuracy {acc:.4f}, {doc['bytes']} bytes", file=sys.stderr)
        rows.append(f"| `{name}` | `{data if data == 'digits' else 'dnf (below)'}` | {widths} | "
                    f"{cfg.epochs}, {cfg.lr}, {cfg.batch_size} | {doc['bytes']:,} | {acc:.4f} |")
        commands.append(command(name, data, hidden, cfg))
    dnf = load_dataset(DNF)
    write_clause_map(dnf.info["groups"], OUT / "dnf_clauses.json", dnf.num_inputs, force=True)
    (OUT / "README.md").write_text(README.format(rows="\n".join(rows), commands="\n".join(commands), dnf=DNF))
    print(json.dumps({"written": [s[0] for s in SAMPLES] + ["dnf_clauses.json", "README.md"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
