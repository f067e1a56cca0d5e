"""Run every benchmark and print one table of ratios (each measured within its own run).

Each script runs as its own process with `--json` (as if run by hand), at the sizes the README
reports; `--quick` uses tiny sizes to check that everything still runs (the numbers then mean
nothing). Ratios compare to a baseline measured in the same run; absolute times vary by machine.

    python benchmarks/run_all.py            # the README's figures, about 10 minutes on 2 cores
    python benchmarks/run_all.py --quick    # seconds; for CI and tests
    python benchmarks/run_all.py --json     # every script's JSON document, keyed by benchmark
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = {
    "layers": ["bench_layers.py"],
    "expand 2048x8192": ["bench_expand.py"],
    "expand 4096x16384": ["bench_expand.py", "--size", "4096x16384", "--repeat", "1"],
    "expand 5 layers 2048": ["bench_expand.py", "--size", "2048x2048", "--depth", "4", "--repeat", "1"],
    "finetune digits": ["bench_finetune.py"],
    "finetune synthetic": ["bench_finetune.py", "--data", "synthetic", "--hidden", "2048", "--batch-size", "256"],
    "finetune synthetic grouped": ["bench_finetune.py", "--data", "synthetic", "--hidden", "2048", "--batch-size", "256",
                                   "--group-size", "512"],
    "analyze": ["bench_analyze.py", "--size", "1024x4096", "--expanded", "--group-size", "1024", "--probe", "4096",
                "--repeat", "3"],
}
QUICK = {
    "layers": ["bench_layers.py", "--d", "16", "--h", "64", "--batches", "2", "--alphas", "4", "--repeat", "1"],
    "expand": ["bench_expand.py", "--size", "16x64", "--repeat", "1"],
    "finetune synthetic": ["bench_finetune.py", "--data", "synthetic", "--d", "16", "--hidden", "16", "--samples", "128",
                           "--alphas", "4", "--epochs", "1", "--repeat", "1"],
    "analyze": ["bench_analyze.py", "--size", "16x64", "--expanded", "--group-size", "16", "--probe", "32", "--repeat", "1"],
}


def run(script: list[str]) -> dict:
    out = subprocess.run([sys.executable, str(HERE / script[0]), *script[1:], "--json"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(script)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def rows_of(name: str, doc: dict) -> list[tuple[str, str, float]]:
    """(benchmark, measure, ratio) rows of one script's JSON document."""
    if name.startswith("layers"):
        return [(name, f"{r['config']}, batch {r['batch']}, alpha {r['alpha']}: fwd / fwd+bwd vs dense",
                 (r["forward_vs_dense"], r["fwd_bwd_vs_dense"])) for r in doc["rows"]]
    if name.startswith("expand"):
        return [(name, "fpe expand / I/O floor", doc["fpe_over_floor"]),
                (name, "lower bound (floor + required work alone) / I/O floor", doc["lower_bound_over_floor"]),
                (name, "peak RSS / dense-layout output", doc["peak_over_dense_output"]),
                (name, "packed file / dense input", doc["packed_over_input"])]
    if name.startswith("finetune"):
        return [(name, f"epoch, {r['model']} vs dense", r["vs_dense"]) for r in doc["rows"] if r["model"] != "dense"]
    if name.startswith("analyze"):
        return [(name, f"activation stats, {r['model']} ({'/'.join(r['activation_stats']['kernel'])} kernels) "
                 "vs masked dense", r["activation_stats"]["kernels_over_masked_dense"])
                for r in doc["runs"] if r.get("activation_stats")]
    return []


def fmt(value) -> str:
    return " / ".join(f"{v:.2f}x" for v in value) if isinstance(value, tuple) else f"{value:.2f}x"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that every benchmark runs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    docs = {}
    for name, script in (QUICK if args.quick else FULL).items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        docs[name] = run(script)
    if args.json:
        print(json.dumps(docs, indent=2))
        return
    rows = [row for name, doc in docs.items() for row in rows_of(name, doc)]
    width = max(len(measure) for _, measure, _ in rows)
    print(f"{'benchmark':<28} {'measure':<{width}} ratio")
    for name, measure, value in rows:
        print(f"{name:<28} {measure:<{width}} {fmt(value)}")


if __name__ == "__main__":
    main()
