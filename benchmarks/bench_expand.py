"""Benchmark `fpe expand` against the I/O floor, and its peak memory.

For a random d -> h -> d float32 MLP, measured in one run on this machine:
  - floor: plain safetensors `load_file` of the input + `save_file` of the output's tensors;
  - fpe:   `fpe_cli.pipeline.expand_file` (in process, imports excluded) and the `fpe expand` CLI
           (a subprocess: interpreter and torch import included);
  - where fpe's time goes: read (+ sha256), check (finite), expand (plan, split, copy, prune),
           drift (dense and expanded forward on 256 probes), write (pack + atomic write), each / floor;
  - peak RSS of a subprocess that runs the expansion, against one that only imports fpe, and
    relative to the size of the dense-layout output;
  - a lower bound: the floor plus the work `fpe expand` cannot skip, each timed alone in this run
    (reading and hashing the input, whose sha256 the output records, and the drift's two forward
    passes, the dense model's and the expanded model's, which has as many non-zero weights and so
    needs at least the dense model's arithmetic). No implementation of the command on this machine
    can be faster than it; it is what a target below it runs into.
Ratios are what to compare across machines; absolute times vary.

    python benchmarks/bench_expand.py                 # 2048 -> 8192 -> 2048, alpha 4
    python benchmarks/bench_expand.py --size 4096x16384 --alpha 4 --json
    python benchmarks/bench_expand.py --probe-samples 0     # without the drift report
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys
from pathlib import Path
from fpe_cli.pipeline import ExpandOptions, expand_file
if sys.argv[1] == 'expand':
    expand_file(ExpandOptions(Path(sys.argv[2]), alpha=int(sys.argv[3]), output=Path(sys.argv[4]), force=True,
                              layout=sys.argv[5]))
# VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's peak across exec)
print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')))
"""


def make_model(path: Path, d: int, h: int, seed: int = 0, depth: int = 1) -> None:
    """d -> h (-> h ...) -> d with `depth` hidden layers, as nn.Sequential names."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    widths = [d] + [h] * depth + [d]
    tensors = {}
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        tensors[f"{2 * i}.weight"] = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
        tensors[f"{2 * i}.bias"] = torch.zeros(n_out)
    save_file(tensors, str(path))


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def required_work(src: Path, probe_samples: int, repeat: int) -> dict[str, float]:
    """The work `fpe expand` must do beyond the floor, each part timed alone (best of `repeat`): read and
    sha256 the input, and the drift's dense forward pass twice (the expanded model's forward has as many
    non-zero weights, so at least the same arithmetic)."""
    import torch

    from fpe_cli.checkpoint import load_checkpoint
    from fpe_cli.model import forward
    from fpe_cli.stfile import sha256_file

    out = {"read_sha256": timed(lambda: sha256_file(src), repeat)}
    if probe_samples:
        mlp = load_checkpoint(src).mlp
        x = torch.randn(probe_samples, mlp.widths[0])
        out["drift_two_dense_forwards"] = 2 * timed(lambda: forward(mlp, x), repeat)  # as function_drift runs it
    return out


def peak_rss(*args: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def run(d: int, h: int, alpha: int, repeat: int, depth: int = 1, probe_samples: int = 256) -> dict:
    from safetensors.torch import load_file, save_file

    from fpe_cli.pipeline import ExpandOptions, expand_file

    tmp = Path(tempfile.mkdtemp(prefix="fpe-bench-"))
    src, out, dense, floor_out = (tmp / n for n in ("in.safetensors", "out.safetensors", "dense.safetensors", "floor.safetensors"))
    make_model(src, d, h, depth=depth)
    opts = ExpandOptions(src, alpha=alpha, output=out, force=True, probe_samples=probe_samples)
    runs: list[dict] = []
    expand_file(opts)  # the output to copy for the floor; also warms the page cache
    out_tensors = load_file(str(out))
    fpe_s = floor_s = float("inf")
    for _ in range(repeat):  # interleaved, best of each: disk write-back hits both alike
        fpe_s = min(fpe_s, timed(lambda: expand_file(opts, timings=runs.append({}) or runs[-1]), 1))
        floor_s = min(floor_s, timed(lambda: (load_file(str(src)), save_file(out_tensors, str(floor_out))), 1))
    phases = min(runs, key=lambda t: sum(t.values()))  # the phases of the fastest run
    required_s = required_work(src, probe_samples, repeat)
    env = dict(os.environ)
    cli_s = timed(lambda: subprocess.run([sys.executable, "-m", "fpe_cli", "expand", str(src), "--alpha", str(alpha),
                                          "--probe-samples", str(probe_samples), "-o", str(out), "--force", "-q"],
                                         check=True, env=env), 1)
    expand_file(ExpandOptions(src, alpha=alpha, output=dense, force=True, layout="dense"))
    peak = peak_rss("expand", str(src), str(alpha), str(out), "packed")
    idle = peak_rss("idle")
    result = {
        "shape": " -> ".join(map(str, [d] + [h] * depth + [d])), "alpha": alpha, "probe_samples": probe_samples, "threads": __import__("torch").get_num_threads(),
        "input_bytes": src.stat().st_size, "packed_bytes": out.stat().st_size, "dense_layout_bytes": dense.stat().st_size,
        "floor_s": floor_s, "fpe_s": fpe_s, "cli_s": cli_s,
        "fpe_over_floor": fpe_s / floor_s, "cli_over_floor": cli_s / floor_s,
        "packed_over_input": out.stat().st_size / src.stat().st_size,
        "peak_rss_bytes": peak, "import_rss_bytes": idle,
        "peak_over_dense_output": peak / dense.stat().st_size,
        "peak_minus_import_over_dense_output": (peak - idle) / dense.stat().st_size,
        "phases_s": phases, "phases_over_floor": {k: v / floor_s for k, v in phases.items()},
        "required_s": required_s, "lower_bound_over_floor": (floor_s + sum(required_s.values())) / floor_s,
    }
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2048x8192", help="DxH: a D -> H -> D MLP")
    ap.add_argument("--alpha", type=int, default=4)
    ap.add_argument("--depth", type=int, default=1, help="hidden layers (4 gives a 5-layer MLP)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--probe-samples", type=int, default=256, help="fpe expand --probe-samples (0: no drift)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    d, h = (int(v) for v in args.size.lower().split("x"))
    r = run(d, h, args.alpha, args.repeat, args.depth, args.probe_samples)
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"fpe expand {r['shape']} float32, alpha {r['alpha']}, --probe-samples {r['probe_samples']}, {r['threads']} threads")
    print(f"  fpe (in process) / I/O floor : {r['fpe_over_floor']:.1f}x  ({r['fpe_s']:.2f} s vs {r['floor_s']:.2f} s)")
    print(f"  fpe CLI (with imports) / floor: {r['cli_over_floor']:.1f}x")
    print("  phases / floor                : " + ", ".join(f"{k} {v:.1f}x" for k, v in r["phases_over_floor"].items()))
    print(f"  lower bound / floor           : {r['lower_bound_over_floor']:.1f}x  (floor + "
          + " + ".join(f"{k} {v / r['floor_s']:.1f}x" for k, v in r["required_s"].items()) + ", each timed alone)")
    print(f"  packed file / dense input     : {r['packed_over_input']:.3f}x")
    print(f"  peak RSS / dense-layout output: {r['peak_over_dense_output']:.2f}x "
          f"({(r['peak_rss_bytes'] - r['import_rss_bytes']) / r['dense_layout_bytes']:.2f}x above the import baseline)")


if __name__ == "__main__":
    main()
