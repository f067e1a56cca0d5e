"""One fine-tuning epoch of an expanded model relative to the dense model at equal non-zero weights.

Both models go through `fpe_cli.train.finetune` (masks locked: gradient hook, re-masking and optimizer
state zeroing after every step; masked dense matmuls), measured in the same run, interleaved, median
of repeats. The epoch time is (time of `epochs=K+1` - time of `epochs=1`) / K, so set-up and the
before/after evaluation are not counted. Ratios are what to compare across machines.

    python benchmarks/bench_finetune.py                          # digits, 64 -> 32 -> 10, alpha 2 and 4
    python benchmarks/bench_finetune.py --data synthetic --d 512 --hidden 2048 --samples 4096 --batch-size 256 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fpe_cli.data import from_arrays, load_dataset
from fpe_cli.expand import PlanInputs, Target, expand_mlp
from fpe_cli.train import finetune, init_mlp, thread_policy


def synthetic(d: int, samples: int, classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples + samples // 4, d, generator=gen)
    y = (x @ torch.randn(d, classes, generator=gen)).argmax(dim=1)
    n = samples
    return from_arrays("synthetic", {"x_train": x[:n].numpy(), "y_train": y[:n].numpy(),
                                     "x_test": x[n:].numpy(), "y_test": y[n:].numpy()})


def epoch_seconds(mlp, dataset, epochs: int, batch_size: int) -> float:
    def run(k: int) -> float:
        t0 = time.perf_counter()
        finetune(mlp, dataset, epochs=k, batch_size=batch_size, seed=0)
        return time.perf_counter() - t0

    total = run(epochs + 1)
    extra = total - run(1)  # the fixed cost of one call (set-up, first epoch) cancels out
    # on a loaded machine a tiny workload can time the longer run faster: then the plain mean
    return extra / epochs if extra > 0 else total / (epochs + 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits", help="digits, an .npz/dnf spec, or 'synthetic'")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--d", type=int, default=512, help="inputs of the synthetic data")
    ap.add_argument("--samples", type=int, default=8192, help="training samples of the synthetic data")
    ap.add_argument("--classes", type=int, default=10, help="classes of the synthetic data")
    ap.add_argument("--alphas", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per measurement")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads for models of 1M+ weights "
                    "(smaller ones always train on one thread: fpe_cli.train.thread_policy)")
    ap.add_argument("--group-size", type=int, default=None,
                    help="also time --group-size expansions (FPELinear's grouped kernel in fine-tuning)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ds = synthetic(args.d, args.samples, args.classes) if args.data == "synthetic" else load_dataset(args.data)
    dense = init_mlp([ds.num_inputs, args.hidden, ds.num_outputs], seed=0)
    models = {"dense": dense}
    for alpha in args.alphas:
        models[f"alpha {alpha}"] = expand_mlp(dense, [Target(0, alpha, "random")], seed=0).mlp
        if args.group_size:
            grouped = expand_mlp(dense, [Target(0, alpha, "random")], seed=0,
                                 inputs=PlanInputs(group_size=args.group_size)).mlp
            grouped.metadata["fpe.settings"] = json.dumps({"group_size": args.group_size})  # as fpe expand records it
            models[f"alpha {alpha} g{args.group_size}"] = grouped
    finetune(dense, ds, epochs=1, batch_size=args.batch_size)  # warm-up: imports, allocator, thread pool
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeat):
        for name, mlp in models.items():  # interleaved, so drift in machine load hits every model alike
            times[name].append(epoch_seconds(mlp, ds, args.epochs, args.batch_size))
    base = statistics.median(times["dense"])
    with thread_policy(dense):
        threads = torch.get_num_threads()
    rows = [{"model": name, "widths": mlp.widths, "weights": mlp.weight_budget(),
             "epoch_seconds": statistics.median(times[name]), "vs_dense": statistics.median(times[name]) / base}
            for name, mlp in models.items()]
    doc = {"data": ds.name, "train_samples": len(ds.x_train), "batch_size": args.batch_size, "threads": threads, "rows": rows}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{ds.name}: {len(ds.x_train)} training samples, batch {args.batch_size}, {threads} thread(s); "
          "one fine-tuning epoch, time / dense model's time")
    print(f"{'model':<9} {'widths':<16} {'weights':>9} {'epoch':>10} {'vs dense':>9}")
    for r in rows:
        widths = "-".join(map(str, r["widths"]))
        print(f"{r['model']:<9} {widths:<16} {r['weights']:>9,} {r['epoch_seconds'] * 1e3:>8.1f}ms {r['vs_dense']:>8.2f}x")


if __name__ == "__main__":
    main()
