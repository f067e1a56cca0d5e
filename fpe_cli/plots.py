"""PNG plots for `fpe analyze --plots DIR` (matplotlib is an optional extra: `pip install 'fpe[plots]'`).

Three files, each with the models side by side (dense | expanded):
- gram.png      |G| = |W^T W| of the first analyzed layer (feature x feature overlaps)
- weights.png   the first layer's weights, masked (non-existent) entries marked in grey
- capacity.png  histograms of feature capacity, one panel per analyzed layer
Large layers are cropped (the title says to what), so a plot never needs more than a few MB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import analysis as A
from .errors import FPEError
from .model import effective_weight
from .outputs import atomic_output
from .report_analysis import AnalyzeResult

FILES = ("gram.png", "weights.png", "capacity.png")
MAX_FEATURES = 512  # Gram heatmap and weight image: at most this many features (columns)
MAX_NEURONS = 256  # weight image: at most this many neurons (rows)


def require_matplotlib():
    """The matplotlib Figure class, or a usage error (exit 2) that says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)  # files only, never a window
        from matplotlib.figure import Figure
    except ImportError:
        raise FPEError("--plots needs matplotlib, which is not installed", "pip install 'fpe[plots]'") from None
    return Figure


def _save(fig, path: Path, force: bool) -> Path:
    with atomic_output(path, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _crop_note(shown: int, total: int, what: str) -> str:
    return "" if shown == total else f" (first {shown} of {total} {what})"


def plot_gram(fig, result: AnalyzeResult) -> None:
    axes = fig.subplots(1, len(result.models), squeeze=False)[0]
    for ax, m in zip(axes, result.models):
        la = m.layers[0]
        layer = m.ckpt.mlp.layers[la.index]
        d = min(layer.in_features, MAX_FEATURES)
        g = A.gram(effective_weight(layer), features=torch.arange(d)).abs().numpy()  # (d, d)
        im = ax.imshow(g, cmap="magma", interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(f"{m.role}: |W^T W| of {la.key}{_crop_note(d, layer.in_features, 'features')}", fontsize=9)
        ax.set_xlabel("input feature")
        ax.set_ylabel("input feature")


def plot_weights(fig, result: AnalyzeResult) -> None:
    axes = fig.subplots(1, len(result.models), squeeze=False)[0]
    for ax, m in zip(axes, result.models):
        layer = m.ckpt.mlp.layers[0]
        rows, cols = min(layer.out_features, MAX_NEURONS), min(layer.in_features, MAX_FEATURES)
        w = effective_weight(layer)[:rows, :cols].float().numpy()  # (rows, cols)
        missing = (~layer.mask[:rows, :cols]).numpy() if layer.mask is not None else np.zeros_like(w, dtype=bool)
        limit = float(np.abs(w).max()) or 1.0
        cmap = _cmap("RdBu_r", bad="#bbbbbb")  # masked entries: weights that do not exist
        im = ax.imshow(np.ma.masked_array(w, missing), cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest",
                       aspect="auto")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if layer.parents is not None and rows <= 128:  # thin lines between parents' groups of children
            for r in torch.nonzero(layer.parents[1:rows] != layer.parents[: rows - 1]).flatten().tolist():
                ax.axhline(r + 0.5, color="black", linewidth=0.4)
        note = _crop_note(rows, layer.out_features, "neurons") + _crop_note(cols, layer.in_features, "inputs")
        ax.set_title(f"{m.role}: {layer.weight_key}{note}\ngrey = masked (no weight), {int(missing.sum())} entries",
                     fontsize=9)
        ax.set_xlabel("input")
        ax.set_ylabel("neuron" + (" (children grouped by parent)" if layer.parents is not None else ""))


def _cmap(name: str, bad: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def plot_capacity(fig, result: AnalyzeResult) -> None:
    n_layers = max(len(m.layers) for m in result.models)
    axes = fig.subplots(1, n_layers, squeeze=False)[0]
    bins = np.linspace(0.0, 1.0, 21)
    for i, ax in enumerate(axes):
        for m, color in zip(result.models, ("tab:blue", "tab:orange")):
            if i >= len(m.layers):
                continue
            cap = m.layers[i].capacity
            cap = cap[~torch.isnan(cap)].numpy()
            mean = m.layers[i].metrics["capacity_mean"]
            ax.hist(cap, bins=bins, alpha=0.55, color=color, label=f"{m.role} (mean {mean:.3f})")
        ax.set_title(f"feature capacity: {result.models[0].layers[i].key if i < len(result.models[0].layers) else ''}",
                     fontsize=9)
        ax.set_xlabel("capacity C_i (1 = no interference)")
        ax.set_ylabel("input features")
        ax.legend(fontsize=8)


def write_plots(result: AnalyzeResult, directory: Path, force: bool = False) -> list[Path]:
    """Write FILES into `directory` (created if missing); refuses to overwrite without `force`."""
    Figure = require_matplotlib()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw, size in zip(FILES, (plot_gram, plot_weights, plot_capacity), ((11, 5), (11, 5), (11, 4))):
        fig = Figure(figsize=(size[0] if len(result.models) == 2 else size[0] / 2 + 1, size[1]), layout="constrained")
        draw(fig, result)
        written.append(_save(fig, directory / name, force))
    return written


def check_plot_targets(directory: Path | None, force: bool) -> None:
    """Before any work: matplotlib present, and no existing plot overwritten without --force."""
    if directory is None:
        return
    require_matplotlib()
    existing = [n for n in FILES if (Path(directory) / n).exists()]
    if existing and not force:
        raise FPEError(f"{directory}: {', '.join(existing)} exist", "pass --force to overwrite")
