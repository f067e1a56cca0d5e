"""Benchmark `fpe analyze` on a wide layer: time per metric, end-to-end time and peak memory.

Models (random float32, written to a temp dir):
  - plain:    d -> h -> 10, a dense checkpoint (default 4096 -> 16384 -> 10: W1 is 16384 x 4096, 256 MiB);
  - expanded: d -> h/alpha -> 10 expanded by `fpe expand --alpha alpha` (packed layout, masks and lineage),
              so its first layer is also h x d, with 1/alpha of the entries present (with --expanded);
  - grouped:  the same with `--group-size G` (splits shared by G parents: the grouped kernel) (with --group-size).
Each end-to-end run is a fresh subprocess calling `report_analysis.analyze_files` (the whole command
minus rendering); its peak RSS is the kernel's VmHWM, next to a subprocess that only imports fpe.
In-process, the metric functions of `fpe_cli.analysis` are timed one by one on the plain layer, and
the data-based part (`activation_stats` on --probe random samples, 10 classes) of every model is
timed on FPELinear's kernels (what `fpe analyze --data` runs) against the masked-dense reference
(`model.hidden_activations`: weight * mask on every batch), alternately in the same run (best of --repeat).

    python benchmarks/bench_analyze.py                       # 4096 -> 16384 -> 10
    python benchmarks/bench_analyze.py --size 1024x4096 --expanded --group-size 16 --json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time
from pathlib import Path
import fpe_cli.report_analysis as R
t0 = time.perf_counter()
if sys.argv[1] == 'analyze':
    R.analyze_files([Path(p) for p in sys.argv[2:]], top=10)
seconds = time.perf_counter() - t0
# VmHWM: this process's own peak RSS (ru_maxrss of a child can carry the parent's peak across exec)
peak = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM'))
print(seconds, peak)
"""


def make_plain(path: Path, d: int, h: int, out: int = 10, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"fc1.weight": torch.randn(h, d, generator=g) / d**0.5, "fc1.bias": torch.zeros(h),
               "fc2.weight": torch.randn(out, h, generator=g) / h**0.5, "fc2.bias": torch.zeros(out)}, str(path))


def make_expanded(tmp: Path, d: int, h: int, alpha: int, group_size: int | None = None) -> Path:
    narrow = tmp / "narrow.safetensors"
    if not narrow.exists():
        make_plain(narrow, d, h // alpha, seed=1)
    out = tmp / ("grouped.safetensors" if group_size else "expanded.safetensors")
    extra = ["--group-size", str(group_size)] if group_size else []
    subprocess.run([sys.executable, "-m", "fpe_cli", "expand", str(narrow), "--alpha", str(alpha), *extra,
                    "-o", str(out), "--force", "-q"], check=True)
    return out


def child(*args: str) -> tuple[float, int, float]:
    """(seconds inside the child, peak RSS bytes, wall seconds of the whole subprocess)."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD, *args], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    seconds, peak = res.stdout.split()
    return float(seconds), int(peak), wall


def metric_times(path: Path) -> dict:
    from fpe_cli import analysis as A
    from fpe_cli.checkpoint import load_checkpoint
    from fpe_cli.model import effective_weight

    layer = load_checkpoint(path).mlp.layers[0]
    w = effective_weight(layer)
    out = {}
    for name, fn in (("feature_capacity", lambda: A.feature_capacity(w)),
                     ("cosine_stats", lambda: A.cosine_stats(w, layer.parents)),
                     ("polysemanticity", lambda: A.polysemanticity(w))):
        t0 = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - t0
    return out


def reference_activation_stats(mlp, x, y, num_classes: int, batch: int) -> list:
    """What `activation_stats` computed before it used FPELinear's kernels: the masked-dense forward."""
    import torch

    from fpe_cli import analysis as A
    from fpe_cli.model import hidden_activations

    stats = [A.ActivationStats.empty(num_classes, layer.out_features) for layer in mlp.layers[:-1]]
    with torch.no_grad():
        for s in range(0, x.shape[0], batch):
            targets = A.label_matrix(y[s:s + batch], num_classes)  # (b, C)
            for st, acts in zip(stats, hidden_activations(mlp, x[s:s + batch])):  # weight * mask per batch
                st.add(acts, targets)
    return stats


def activation_times(path: Path, samples: int, repeat: int, classes: int = 10) -> dict:
    """activation_stats on the kernels vs. the masked-dense reference, alternately, best of `repeat` each."""
    import torch

    from fpe_cli import analysis as A
    from fpe_cli.checkpoint import load_checkpoint

    mlp = load_checkpoint(path).mlp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, mlp.layers[0].in_features, generator=g)  # (N, d)
    y = torch.randint(0, classes, (samples,), generator=g)
    best, out = {"kernels": float("inf"), "masked_dense": float("inf")}, {}
    for _ in range(repeat):
        for name, fn in (("masked_dense", lambda: reference_activation_stats(mlp, x, y, classes, A.BATCH)),
                         ("kernels", lambda: A.activation_stats(mlp, x, y, classes))):
            t0 = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    diff = max(float((a.class_sums - b.class_sums).abs().max()) for a, b in zip(out["kernels"], out["masked_dense"]))
    return {"samples": samples, "kernel": [st.kernel for st in out["kernels"]], "kernels_s": round(best["kernels"], 3),
            "masked_dense_s": round(best["masked_dense"], 3),
            "kernels_over_masked_dense": round(best["kernels"] / best["masked_dense"], 3), "max_abs_diff": diff}


def run(d: int, h: int, alpha: int, expanded: bool, group_size: int | None = None, probe: int = 0, repeat: int = 2) -> dict:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="fpe-bench-analyze-"))
    plain = tmp / "plain.safetensors"
    make_plain(plain, d, h)
    idle = child("idle")[1]
    rows = []
    models = [("plain", plain)] + ([("expanded", make_expanded(tmp, d, h, alpha))] if expanded else [])
    models += [("grouped", make_expanded(tmp, d, h, alpha, group_size))] if group_size else []
    for name, path in models:
        seconds, peak, wall = child("analyze", str(path))
        rows.append({"model": name, "file_bytes": path.stat().st_size, "analyze_s": round(seconds, 2),
                     "cli_wall_s": round(wall, 2), "peak_rss_bytes": peak, "peak_rss_mib": round(peak / 2**20),
                     "over_idle_mib": round((peak - idle) / 2**20), "under_4_gib": peak < 4 * 2**30})
        if probe:
            rows[-1]["activation_stats"] = activation_times(path, probe, repeat)
    return {"shape": [h, d], "layer": f"{d} -> {h} -> 10", "alpha": alpha if (expanded or group_size) else None,
            "group_size": group_size, "torch_threads": torch.get_num_threads(), "idle_rss_mib": round(idle / 2**20),
            "metrics_s": {k: round(v, 2) for k, v in metric_times(plain).items()}, "runs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4096x16384", help="d x h of the first layer (inputs x hidden neurons)")
    ap.add_argument("--alpha", type=int, default=4)
    ap.add_argument("--expanded", action="store_true", help="also analyze an fpe-expanded model of the same shape")
    ap.add_argument("--group-size", type=int, default=None, help="also analyze an expansion made with --group-size G")
    ap.add_argument("--probe", type=int, default=2048, help="probe samples for the activation-stats timing (0: skip it)")
    ap.add_argument("--repeat", type=int, default=2, help="activation-stats timings per path (best is reported)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    d, h = (int(v) for v in args.size.lower().split("x"))
    doc = run(d, h, args.alpha, args.expanded, args.group_size, args.probe, args.repeat)
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"fpe analyze, first layer {doc['layer']} (W1 {h} x {d} float32), {doc['torch_threads']} torch threads")
    print("metric times on the plain layer: " + ", ".join(f"{k} {v:.2f} s" for k, v in doc["metrics_s"].items()))
    print(f"{'model':<10} {'file MiB':>9} {'analyze s':>10} {'wall s':>8} {'peak RSS MiB':>13} {'over idle':>10} {'< 4 GiB':>8}")
    for r in doc["runs"]:
        print(f"{r['model']:<10} {r['file_bytes'] / 2**20:>9.0f} {r['analyze_s']:>10.2f} {r['cli_wall_s']:>8.2f} "
              f"{r['peak_rss_mib']:>13} {r['over_idle_mib']:>10} {str(r['under_4_gib']):>8}")
    print(f"(idle: a process that only imports fpe peaks at {doc['idle_rss_mib']} MiB)")
    for r in doc["runs"]:
        if "activation_stats" in r:
            a = r["activation_stats"]
            print(f"activation stats, {r['model']} ({a['samples']} samples, kernels {'/'.join(a['kernel'])}): "
                  f"{a['kernels_s']:.3f} s vs masked dense {a['masked_dense_s']:.3f} s = {a['kernels_over_masked_dense']:.2f}x "
                  f"(max |diff| of class sums {a['max_abs_diff']:.1e})")


if __name__ == "__main__":
    main()
