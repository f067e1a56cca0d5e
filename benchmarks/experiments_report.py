"""Turn experiment runs into results.json / results.csv, a markdown report and PNG plots."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from fpe_cli.stats import linear_fit

CELL_COLUMNS = ["sweep", "hidden", "clauses", "alpha", "arm", "n", "dense_mean", "dense_se", "fpe_mean", "fpe_se",
                "relative_gain", "p_value", "capacity_fold", "cosine_fold", "weights_equal"]


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _p(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else ("<0.001" if x < 0.001 else f"{x:.3f}")


def cell_table(cells: list[dict], sweep: str, vary: str) -> list[str]:
    lines = [f"| {vary} | alpha | split | dense acc % | FPE acc % | rel. gain % | p | capacity x | non-sib cos x |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        if c["sweep"] != sweep:
            continue
        sig = " *" if c["p_value"] < 0.05 else ""
        lines.append(f"| {c[vary]} | {c['alpha']} | {c['arm']} | {_pct(c['dense_mean'])} ± {_pct(c['dense_se'])} | "
                     f"{_pct(c['fpe_mean'])} ± {_pct(c['fpe_se'])} | {_pct(c['relative_gain'])}{sig} | {_p(c['p_value'])} | "
                     f"{c['capacity_fold']:.2f} | {c['cosine_fold']:.2f} |")
    return lines


def regressions(cells: list[dict]) -> dict:
    ok = [c for c in cells if not math.isnan(c["relative_gain"])]
    return {metric: linear_fit([c[metric] for c in ok], [c["relative_gain"] for c in ok])
            for metric in ("capacity_fold", "cosine_fold")}


def write_plots(cells: list[dict], plots: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for sweep, vary in (("dnf_neurons", "hidden"), ("dnf_clauses", "clauses"), ("digits", "hidden")):
        mine = [c for c in cells if c["sweep"] == sweep]
        if not mine:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, alpha in zip(axes, (2, 4)):
            for arm in sorted({c["arm"] for c in mine}):
                pts = sorted((c[vary], 100 * c["relative_gain"], 100 * c["fpe_se"] / c["dense_mean"])
                             for c in mine if c["arm"] == arm and c["alpha"] == alpha)
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                                capsize=3, label=arm)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{sweep}, alpha {alpha}")
            ax.set_xlabel("hidden neurons (dense)" if vary == "hidden" else "clauses")
        axes[0].set_ylabel("relative gain over dense, %")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        path = plots / f"gain_vs_{vary}_{sweep}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric, label in ((axes[0], "capacity_fold", "feature capacity fold change (FPE / dense)"),
                              (axes[1], "cosine_fold", "non-sibling |cos| fold change (FPE / dense)")):
        for sweep in sorted({c["sweep"] for c in cells}):
            mine = [c for c in cells if c["sweep"] == sweep]
            ax.scatter([c[metric] for c in mine], [100 * c["relative_gain"] for c in mine], s=14, label=sweep)
        fit = regressions(cells)[metric]
        ax.set_title(f"r = {fit['r']:.2f}, p = {_p(fit['p'])}")
        ax.set_xlabel(label)
        ax.axhline(0, color="grey", lw=0.8)
    axes[0].set_ylabel("relative gain over dense, %")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = plots / "gain_vs_metric_fold.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return written + [path]


def write_report(root: Path, cells: list[dict], runs: list[dict], vs_random: list[dict], md: Path | None,
                 plots: Path | None) -> None:
    (root / "results.json").write_text(json.dumps({"cells": cells, "versus_random": vs_random, "runs": runs,
                                                   "regressions": regressions(cells)}, indent=1, allow_nan=True))
    with open(root / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, CELL_COLUMNS)
        w.writeheader()
        w.writerows({k: c[k] for k in CELL_COLUMNS} for c in cells)
    pngs = write_plots(cells, plots) if plots else []
    if md:
        md.write_text(markdown(cells, runs, vs_random, pngs, md.parent))
    print(f"{len(cells)} cells from {len(runs)} runs -> {root / 'results.json'}, {root / 'results.csv'}"
          + (f", {md}" if md else ""))


def versus_table(rows: list[dict]) -> list[str]:
    lines = ["| sweep | hidden | clauses | alpha | split | split acc % | random acc % | difference (points) | p |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        sig = " *" if r["p_value"] < 0.05 else ""
        lines.append(f"| {r['sweep']} | {r['hidden']} | {r['clauses'] if r['clauses'] is not None else '-'} | {r['alpha']} | "
                     f"{r['arm']} | {_pct(r['arm_mean'])} | {_pct(r['random_mean'])} | {100 * r['difference']:+.1f}{sig} | "
                     f"{_p(r['p_value'])} |")
    return lines


def markdown(cells: list[dict], runs: list[dict], vs_random: list[dict], pngs: list[Path], base: Path) -> str:
    out = ["# Evidence: FPE vs. dense at the same non-zero weight count", "",
           "Generated by `python benchmarks/experiments.py report results --md docs/results.md --plots docs/img` "
           "from the runs of `python benchmarks/experiments.py run experiments/*.yaml --out results --jobs 2`.",
           f"{len(runs)} training runs. Accuracy is test accuracy, mean ± standard error over seeds; relative gain = "
           "(acc_FPE - acc_dense) / acc_dense; p = paired t-test over seeds (same data, initialisation and first "
           "training phase in both arms); `*` marks p < 0.05. Fold changes are FPE / dense for the first layer.", ""]
    discussion = Path(__file__).resolve().parents[1] / "experiments" / "discussion.md"
    if discussion.exists():  # the hand-written reading of the tables, kept across regenerations
        out += [discussion.read_text().rstrip(), ""]
    for sweep, vary in (("dnf_neurons", "hidden"), ("dnf_clauses", "clauses"), ("digits", "hidden")):
        if any(c["sweep"] == sweep for c in cells):
            out += [f"## {sweep}", ""] + cell_table(cells, sweep, vary) + [""]
    out += ["## Each split against the random split (same seeds, paired t-test)", ""] + versus_table(vs_random) + [""]
    reg = regressions(cells)
    out += ["## Relative gain vs. interference fold change (all cells)", ""]
    for metric, fit in reg.items():
        out.append(f"- {metric}: slope {fit['slope']:.3f}, r = {fit['r']:.2f}, p = {_p(fit['p'])}, n = {fit['n']}")
    out.append("")
    for png in pngs:
        out.append(f"![{png.stem}]({Path(*png.parts[len(base.parts):]) if png.is_relative_to(base) else png})")
    return "\n".join(out) + "\n"
