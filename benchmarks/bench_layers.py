"""Speed of an expanded MLP vs. the dense MLP at equal non-zero weights (forward, forward+backward).

Model d -> h -> d (default 1024 -> 4096 -> 1024), expanded at alpha 2 and 4 with:
  paper:        per-edge random split + global magnitude pruning, run as masked dense (the
                reference: W * M on every call) and as FPELinear's dense kernel (no mask multiply);
  grouped-G:    random split shared by groups of G parents, FPELinear's grouped kernel;
  structured:   input index mod alpha for every parent, FPELinear's grouped kernel (one group).
  ... + tie:    `--outgoing tie` (children's outgoing copies one shared parameter, no pruning), timed
                as the module `fpe finetune` trains (train.MaskedMLP with its gradient locks): the
                producer through the dense or grouped kernel, the consumer applied once to the
                sum of each parent's children; "grouped-h + tie" is one random partition shared
                by every parent (`--group-size h`).
Every number is a ratio to the dense model measured in the same run (median of repeats).

    python benchmarks/bench_layers.py [--d 1024 --h 4096 --batches 1 256 --alphas 2 4 --json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from fpe_cli.expand import PlanInputs, Target, expand_mlp
from fpe_cli.layers import FPELinear, masked_dense_linear
from fpe_cli.model import MLP, Layer
from fpe_cli.train import MaskedMLP, lock_gradients


class MaskedDenseMLP(nn.Module):
    def __init__(self, mlp: MLP):
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(l.weight.clone()) for l in mlp.layers])
        self.b = nn.ParameterList([nn.Parameter(l.bias.clone()) for l in mlp.layers])
        self.m = [l.mask for l in mlp.layers]

    def forward(self, x):
        for i, (w, b, m) in enumerate(zip(self.w, self.b, self.m)):
            x = masked_dense_linear(x, w, m, b)
            x = torch.relu(x) if i < len(self.w) - 1 else x
        return x


def fpe_module(mlp: MLP, alpha: int, group_size: int | None) -> nn.Module:
    layers = []
    for i, l in enumerate(mlp.layers):
        grouped = l.parents is not None and group_size is not None
        layers.append(FPELinear(l.weight, l.bias, l.mask, alpha=alpha if grouped else 1,
                                group_size=group_size if grouped else None, kernel="auto"))
        if i < len(mlp.layers) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def dense_module(d: int, h: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(module: nn.Module, x: torch.Tensor, repeat: int) -> tuple[float, float]:
    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    return timeit(fwd, repeat), timeit(fwd_bwd, repeat)


def expanded(d: int, h: int, alpha: int, split: str, group_size: int | None, seed: int = 0,
             outgoing: str = "copy") -> MLP:
    g = torch.Generator().manual_seed(seed)
    mlp = MLP([Layer("0.weight", torch.randn(h, d, generator=g) / d ** 0.5, "0.bias", torch.zeros(h)),
               Layer("2.weight", torch.randn(d, h, generator=g) / h ** 0.5, "2.bias", torch.zeros(d))])
    out = expand_mlp(mlp, [Target(0, alpha, split)], seed=seed, inputs=PlanInputs(group_size=group_size),
                     outgoing=outgoing).mlp
    if group_size:  # as `fpe expand --group-size` records it: fine-tuning then runs the grouped kernel
        out.metadata["fpe.settings"] = json.dumps({"group_size": group_size})
    return out


def finetune_module(mlp: MLP) -> nn.Module:
    """The module `fpe finetune` trains (train.MaskedMLP with its gradient-locking hooks)."""
    module = MaskedMLP(mlp)
    lock_gradients(module)
    return module


def run(d: int, h: int, batches: list[int], alphas: list[int], repeat: int) -> list[dict]:
    rows = []
    dense = dense_module(d, h)
    for batch in batches:
        x = torch.randn(batch, d)
        measure(dense, x, repeat)  # warm the allocator and thread pool before any timing
        base_f, base_fb = measure(dense, x, repeat)
        for alpha in alphas:
            configs = [
                ("paper, masked dense", MaskedDenseMLP(expanded(d, h, alpha, "random", None))),
                ("paper, FPELinear dense kernel", fpe_module(expanded(d, h, alpha, "random", None), alpha, None)),
                ("grouped-1024, FPELinear grouped", fpe_module(expanded(d, h, alpha, "random", 1024), alpha, 1024)),
                ("structured, FPELinear grouped", fpe_module(expanded(d, h, alpha, "structured", None), alpha, h)),
                ("paper split + tie, finetune module", finetune_module(expanded(d, h, alpha, "random", None, outgoing="tie"))),
                ("grouped-1024 + tie, finetune module", finetune_module(expanded(d, h, alpha, "random", 1024, outgoing="tie"))),
                (f"grouped-{h} + tie, finetune module", finetune_module(expanded(d, h, alpha, "random", h, outgoing="tie"))),
            ]
            for name, module in configs:
                f, fb = measure(module, x, repeat)
                again_f, again_fb = measure(dense, x, repeat)  # re-measure dense beside each config
                base_f, base_fb = min(base_f, again_f), min(base_fb, again_fb)
                rows.append({"batch": batch, "alpha": alpha, "config": name,
                             "forward_vs_dense": f / base_f, "fwd_bwd_vs_dense": fb / base_fb})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--alphas", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = run(args.d, args.h, args.batches, args.alphas, args.repeat)
    if args.json:
        print(json.dumps({"d": args.d, "h": args.h, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
        return
    print(f"{args.d} -> {args.h} -> {args.d}, float32, {torch.get_num_threads()} threads; time / dense model's time")
    print(f"{'batch':>5} {'alpha':>5}  {'config':<38} {'forward':>8} {'fwd+bwd':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['alpha']:>5}  {r['config']:<38} {r['forward_vs_dense']:>7.2f}x {r['fwd_bwd_vs_dense']:>7.2f}x")


if __name__ == "__main__":
    main()
