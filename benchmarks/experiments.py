"""The evidence: dense vs. FPE at the same non-zero weight count, run through fpe's own library.

Protocol per trial (seed s; the data set, initialisation and shuffles all derive from s):
  1. train a dense MLP for `pre_epochs` (shared by every arm of the trial);
  2. dense arm: train it `post_epochs` more (fresh optimizer);
  3. FPE arms: expand it (alpha, split) and fine-tune `post_epochs` with the masks locked.
Both arms see the same total epochs, data and seeds and end with the same number of weights
(`fpe verify`'s budget invariant is asserted for every FPE model). Per cell: mean and standard error
of test accuracy over the seeds, relative gain (acc_FPE - acc_dense) / acc_dense, a paired t-test
p-value, and fold changes (FPE / dense) of the first layer's feature capacity and non-sibling |cos|.

    python benchmarks/experiments.py run experiments/*.yaml --out results --jobs 2   # the full evidence, ~16 min
    python benchmarks/experiments.py run experiments/*.yaml --out results --smoke   # CI: 2 seeds, few epochs
    python benchmarks/experiments.py report results --md docs/results.md --plots docs/img

Runs are appended to OUT/runs.jsonl as they finish, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from fpe_cli.analysis import cosine_stats, feature_capacity
from fpe_cli.data import load_dataset
from fpe_cli.expand import PlanInputs, Target, expand_mlp
from fpe_cli.model import MLP, effective_weight
from fpe_cli.stats import mean_se, paired_t_test
from fpe_cli.train import TrainConfig, evaluate, fit, init_mlp
from fpe_cli.verify import check_invariants

SWEEP_KEYS = ("hidden", "clauses", "alpha")


def parse_arm(text: str) -> dict:
    """`random`, `clause`, `gram`, `activation`, `structured`, with `+gN` (group size), `+topF` (selective)
    and `+tie` (outgoing copies tied: one parameter, no pruning)."""
    name, *mods = text.split("+")
    arm = {"label": text, "split": name, "group_size": None, "expand_top": None, "outgoing": "copy"}
    for mod in mods:
        if mod == "tie":
            arm["outgoing"] = "tie"
        elif mod.startswith("g"):
            arm["group_size"] = int(mod[1:])
        elif mod.startswith("top"):
            arm["expand_top"] = float(mod[3:])
        else:
            raise ValueError(f"unknown arm modifier {mod!r} in {text!r}")
    return arm


def load_spec(path: Path, smoke: bool) -> dict:
    spec = yaml.safe_load(Path(path).read_text())
    spec.setdefault("name", Path(path).stem)
    for key in SWEEP_KEYS:
        spec[key] = spec.get(key) if isinstance(spec.get(key), list) else [spec.get(key)]
    if smoke:  # the pipeline, not the numbers: two seeds, two points per sweep, a few epochs
        spec.update(seeds=2, pre_epochs=min(spec["pre_epochs"], 3), post_epochs=min(spec["post_epochs"], 3))
        for key in ("hidden", "clauses"):
            spec[key] = spec[key][:2]
        spec["alpha"] = spec["alpha"][:1]
    return spec


def clause_groups(dataset) -> torch.Tensor | None:
    members = dataset.info.get("groups")
    if not members:
        return None
    groups = torch.full((dataset.num_inputs,), -1, dtype=torch.int64)
    for g, inputs in enumerate(members):
        groups[inputs] = g
    return groups


def layer_metrics(mlp: MLP) -> dict:
    """Interference of the first layer: mean feature capacity, mean |cos| over non-sibling neurons."""
    layer = mlp.layers[0]
    w = effective_weight(layer)
    cap = feature_capacity(w)
    cos = cosine_stats(w, layer.parents)
    return {"capacity": float(torch.nanmean(cap)), "cosine": cos["cosine_mean_abs_non_sibling"]}


def run_trial(spec: dict, hidden: int, clauses, seed: int, done: set, emit) -> None:
    """One seed of one sweep point: the dense arm and every (alpha, arm) not yet in `done`."""
    todo = [(a, arm) for a in spec["alpha"] for arm in spec["arms"] if key(spec, hidden, clauses, seed, a, arm) not in done]
    dense_key = key(spec, hidden, clauses, seed, None, "dense")
    if not todo and dense_key in done:
        return
    data = load_dataset(spec["data"].format(clauses=clauses, seed=seed))
    cfg = {**spec.get("train", {}), "seed": seed}
    pre, _ = fit(init_mlp([data.num_inputs, hidden, data.num_outputs], spec.get("activation", "relu"), seed), data,
                 TrainConfig(epochs=spec["pre_epochs"], **cfg))
    post = TrainConfig(epochs=spec["post_epochs"], **cfg)
    base = {"sweep": spec["name"], "hidden": hidden, "clauses": clauses, "seed": seed}
    if dense_key not in done:
        t0 = time.perf_counter()
        dense, metrics = fit(pre, data, post)
        emit({**base, "alpha": None, "arm": "dense", "accuracy": metrics["test"]["accuracy"],
              "weights": dense.weight_budget(), "seconds": time.perf_counter() - t0, **layer_metrics(dense)})
    for alpha, arm in todo:
        emit({**base, "alpha": alpha, "arm": arm, **run_fpe_arm(pre, data, post, alpha, parse_arm(arm), seed)})


def run_fpe_arm(pre: MLP, data, post: TrainConfig, alpha: int, arm: dict, seed: int) -> dict:
    t0 = time.perf_counter()
    inputs = PlanInputs(groups=clause_groups(data), group_size=arm["group_size"], calibration=data.x_train[:512])
    result = expand_mlp(pre, [Target(0, alpha, arm["split"], arm["expand_top"])], seed=seed, inputs=inputs,
                        outgoing=arm["outgoing"])
    tuned, metrics = fit(result.mlp, data, post)
    metrics["before"] = evaluate(result.mlp, data, "test")
    problems = check_invariants(tuned, result.budget)
    if problems:
        raise RuntimeError(f"FPE invariants violated after fine-tuning: {problems}")
    return {"accuracy": metrics["test"]["accuracy"], "accuracy_after_expand": metrics["before"]["accuracy"], "weights": tuned.weight_budget(),
            "hidden_after": tuned.widths[1], "seconds": time.perf_counter() - t0, **layer_metrics(tuned)}


def key(spec: dict, hidden, clauses, seed, alpha, arm) -> str:
    return json.dumps([spec["name"], hidden, clauses, seed, alpha, arm])


def run(spec_path: Path, out: Path, smoke: bool) -> None:
    spec = load_spec(spec_path, smoke)
    spec["arms"] = spec.pop("splits")
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    done = set()
    if runs_path.exists():
        for line in runs_path.read_text().splitlines():
            r = json.loads(line)
            done.add(key(spec, r["hidden"], r["clauses"], r["seed"], r["alpha"], r["arm"]))
    points = list(itertools.product(spec["hidden"], spec["clauses"], range(spec["seeds"])))
    with open(runs_path, "a") as fh:
        def emit(row: dict) -> None:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(f"  {row['sweep']} h={row['hidden']} clauses={row['clauses']} seed={row['seed']} "
                  f"{row['arm']}@{row['alpha']}: acc {row['accuracy']:.4f} ({row['seconds']:.1f}s)", file=sys.stderr)

        for i, (hidden, clauses, seed) in enumerate(points, 1):
            print(f"[{spec['name']}] point {i}/{len(points)}", file=sys.stderr)
            run_trial(spec, hidden, clauses, seed, done, emit)


def run_parallel(specs: list[Path], out: Path, smoke: bool, jobs: int) -> None:
    """One child process per spec, at most `jobs` at a time (each trains on one thread)."""
    import subprocess

    pending, running = list(specs), []
    while pending or running:
        while pending and len(running) < jobs:
            spec = pending.pop(0)
            cmd = [sys.executable, __file__, "run", str(spec), "--out", str(out)] + (["--smoke"] if smoke else [])
            running.append((spec, subprocess.Popen(cmd)))
        time.sleep(0.5)
        for spec, proc in list(running):
            if proc.poll() is not None:
                running.remove((spec, proc))
                if proc.returncode:
                    raise SystemExit(f"{spec}: exited with {proc.returncode}")


def aggregate(rows: list[dict]) -> list[dict]:
    """One cell per (sweep, hidden, clauses, alpha, arm): FPE vs. the dense arm of the same seeds."""
    dense = {(r["sweep"], r["hidden"], r["clauses"], r["seed"]): r for r in rows if r["arm"] == "dense"}
    groups: dict = {}
    for r in rows:
        if r["arm"] != "dense":
            groups.setdefault((r["sweep"], r["hidden"], r["clauses"], r["alpha"], r["arm"]), []).append(r)
    cells = []
    for (sweep, hidden, clauses, alpha, arm), runs in sorted(groups.items(), key=lambda kv: cell_order(*kv[0])):
        pairs = [(r, dense[(sweep, hidden, clauses, r["seed"])]) for r in runs if (sweep, hidden, clauses, r["seed"]) in dense]
        fpe_acc, dense_acc = [p[0]["accuracy"] for p in pairs], [p[1]["accuracy"] for p in pairs]
        (mf, sf), (md, sd) = mean_se(fpe_acc), mean_se(dense_acc)
        _, p = paired_t_test(fpe_acc, dense_acc)
        cells.append({
            "sweep": sweep, "hidden": hidden, "clauses": clauses, "alpha": alpha, "arm": arm, "n": len(pairs),
            "dense_mean": md, "dense_se": sd, "fpe_mean": mf, "fpe_se": sf,
            "relative_gain": (mf - md) / md if md else math.nan, "p_value": p,
            "capacity_fold": mean_se([a["capacity"] / b["capacity"] for a, b in pairs])[0],
            "cosine_fold": mean_se([a["cosine"] / b["cosine"] for a, b in pairs if b["cosine"]])[0],
            "weights_equal": all(a["weights"] == b["weights"] for a, b in pairs),
        })
    return cells


ARM_ORDER = ["random", "structured", "random+g4", "gram", "clause", "activation", "activation+top0.5"]


def cell_order(sweep, hidden, clauses, alpha, arm) -> tuple:
    rank = ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER)
    return (sweep, hidden or 0, clauses or 0, alpha or 0, rank, arm)


def versus_random(rows: list[dict]) -> list[dict]:
    """Each non-random arm against the random split on the same seeds (paired t-test)."""
    by = {(r["sweep"], r["hidden"], r["clauses"], r["alpha"], r["arm"], r["seed"]): r["accuracy"] for r in rows}
    out = []
    for (sweep, hidden, clauses, alpha, arm) in sorted({k[:5] for k in by if k[4] not in ("dense", "random")},
                                                       key=lambda k: cell_order(*k)):
        seeds = sorted(k[5] for k in by if k[:5] == (sweep, hidden, clauses, alpha, arm)
                       and (sweep, hidden, clauses, alpha, "random", k[5]) in by)
        a = [by[(sweep, hidden, clauses, alpha, arm, s)] for s in seeds]
        b = [by[(sweep, hidden, clauses, alpha, "random", s)] for s in seeds]
        if len(seeds) >= 2:
            _, p = paired_t_test(a, b)
            out.append({"sweep": sweep, "hidden": hidden, "clauses": clauses, "alpha": alpha, "arm": arm, "n": len(seeds),
                        "arm_mean": mean_se(a)[0], "random_mean": mean_se(b)[0], "difference": mean_se(a)[0] - mean_se(b)[0],
                        "p_value": p})
    return out


def read_runs(root: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(root.rglob("runs.jsonl")) for line in p.read_text().splitlines() if line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run sweeps (resumable)")
    r.add_argument("specs", nargs="+", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--smoke", action="store_true", help="2 seeds, a few epochs: checks the pipeline, not the numbers")
    r.add_argument("--jobs", type=int, default=1, help="run this many specs at once, one process each (one per core)")
    rep = sub.add_parser("report", help="aggregate runs into JSON, CSV, markdown and plots")
    rep.add_argument("root", type=Path)
    rep.add_argument("--md", type=Path)
    rep.add_argument("--plots", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is faster and keeps runs deterministic
    if args.cmd == "run":
        if args.jobs > 1 and len(args.specs) > 1:
            run_parallel(args.specs, args.out, args.smoke, args.jobs)
            return
        for spec in args.specs:
            run(spec, args.out / Path(spec).stem, args.smoke)
        return
    from experiments_report import write_report  # noqa: E402 (sibling module)

    runs = read_runs(args.root)
    write_report(args.root, aggregate(runs), runs, versus_random(runs), args.md, args.plots)


if __name__ == "__main__":
    main()
