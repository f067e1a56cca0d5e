"""Interference and polysemanticity metrics (docs/method.md section 4): pure functions on tensors.

Conventions: a weight W has shape (neurons, features) = (out, in) and is the *effective* weight
(off-mask entries exactly zero). Row r is neuron r; column i is feature i's vector W_i in neuron space.
`parents` (int64, (out,)) is an expanded layer's lineage: siblings are rows with the same parent.

Metrics (NaN marks "undefined", e.g. an all-zero column or row; summaries skip NaN):
- feature capacity   C_i = (W_i . W_i)^2 / sum_j (W_i . W_j)^2 in [0, 1]; sum_i C_i <= rank(W) <= #neurons.
- neuron cosine      mean |cos(w_r, w_s)| over all pairs r < s of non-zero rows, and over non-sibling pairs.
- polysemanticity    per neuron: exp(entropy(p)), p_j = w_rj^2 / sum_k w_rk^2 — the effective number of
                     input features driving the neuron (1 = one feature, d = all d features equally).
- class selectivity  per neuron: exp(entropy(q)), q_c = |m_c| / sum_k |m_k| with m_c the neuron's mean
                     activation on class c — the effective number of classes it responds to.
- dead / density     a neuron is active on a sample when its activation is > 0; dead = active on none;
                     density = fraction of (sample, neuron) pairs that are active.

Scale: everything runs in blocks of `chunk` rows or features, so a (16384, 4096) float32 layer never
builds a (16384, 16384) or an (in, in)-squared temporary; peak extra memory is about one normalised
copy of W plus one (chunk, out) block. `progress(n)` is called after each block with the units done.
Probe activations run through FPELinear's kernels (`layers.KernelMLP`), the forward fine-tuning uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import FPEError
from .layers import KernelMLP
from .model import MLP, Layer, effective_weight

Progress = Callable[[int], None] | None
CHUNK = 1024
BATCH = 1024  # probe samples per forward pass (a (BATCH, width) activation block per hidden layer)
GATHER_BYTES = 256 * 2**20  # bound on the grouped kernel's gathered copy of a probe block (smaller blocks if needed)
METRICS = ("capacity_mean", "capacity_median", "capacity_sum", "capacity_fraction_below_half",
           "cosine_mean_abs", "cosine_mean_abs_non_sibling", "polysemanticity_mean", "polysemanticity_median",
           "class_selectivity_mean", "dead_fraction", "activation_density")


def _tick(progress: Progress) -> None:
    if progress is not None:
        progress(1)


def _blocks(n: int, chunk: int):
    return ((s, min(s + chunk, n)) for s in range(0, n, chunk))


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def _nanmedian(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.double().quantile(0.5)) if x.numel() else math.nan  # mean of the two middles when even


def _entropy_exp(p_unnorm: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row of a non-negative (n, k) float64 matrix, normalised; NaN for all-zero rows."""
    total = p_unnorm.sum(dim=1, keepdim=True)  # (n, 1)
    p = p_unnorm / total.clamp(min=1e-300)
    out = torch.exp(-torch.special.xlogy(p, p).sum(dim=1))  # (n,)
    return out.masked_fill(total.squeeze(1) == 0, math.nan)


# ---------------------------------------------------------------- weight-based metrics


def gram(w: torch.Tensor, *, features: torch.Tensor | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """G = W^T W (float32, (in, in)), accumulated over row blocks; `features` picks a column subset."""
    cols = w if features is None else w[:, features]
    g = torch.zeros(cols.shape[1], cols.shape[1], dtype=torch.float32)
    for s, e in _blocks(cols.shape[0], chunk):
        block = cols[s:e].float()  # (b, in)
        g.addmm_(block.T, block)
    return g


def feature_capacity(w: torch.Tensor, *, chunk: int = CHUNK, progress: Progress = None) -> torch.Tensor:
    """C_i for every feature (column), float64 (in,); NaN for all-zero columns.

    Row block B of G = W^T W is W[:, B]^T W, (|B|, in): the denominators sum_j G_ij^2 come from one
    block at a time, so the full Gram matrix is never held (nor squared) in memory.
    """
    w32 = w.float()
    d = w32.shape[1]
    cap = torch.empty(d, dtype=torch.float64)
    for s, e in _blocks(d, chunk):
        g = (w32[:, s:e].T @ w32).double()  # (b, in)
        diag = g[torch.arange(e - s), torch.arange(s, e)]  # (b,) = |W_i|^2
        denom = (g * g).sum(dim=1)
        cap[s:e] = torch.where(diag > 0, diag * diag / denom.clamp(min=1e-300), torch.full_like(diag, math.nan))
        _tick(progress)
    return cap


def capacity_summary(cap: torch.Tensor, neurons: int) -> dict:
    """Mean, median, sum (compare with `neurons`: the sum never exceeds it) and fraction below 0.5."""
    kept = cap[~torch.isnan(cap)]
    n = kept.numel()
    return {
        "capacity_mean": _nanmean(kept), "capacity_median": _nanmedian(kept),
        "capacity_sum": float(kept.sum()) if n else math.nan,
        "capacity_fraction_below_half": float((kept < 0.5).double().mean()) if n else math.nan,
        "features_counted": n, "features_zero": int(cap.numel() - n), "neurons": neurons,
    }


def _sibling_pairs(parents: torch.Tensor) -> int:
    counts = torch.bincount(parents).long()
    return int((counts * (counts - 1) // 2).sum())


def cosine_stats(w: torch.Tensor, parents: torch.Tensor | None = None, *, chunk: int = CHUNK,
                 progress: Progress = None) -> dict:
    """Mean |cos| between neuron rows over all pairs and over non-sibling pairs (all-zero rows excluded).

    Row block [s, e) is compared with rows s.. only (the strict upper triangle), as a (b, n - s) block.
    """
    w32 = w.float()
    norms = w32.norm(dim=1)  # (out,)
    keep = norms > 0
    u = w32[keep].div_(norms[keep, None])  # (n, in) unit rows; boolean indexing already copied
    par = parents[keep] if parents is not None else None
    n = u.shape[0]
    total = sib = 0.0
    for s, e in _blocks(n, chunk):
        sim = (u[s:e] @ u[s:].T).abs_()  # (b, n - s)
        sim[:, : e - s].triu_(1)  # only pairs r < s'
        total += float(sim.sum(dtype=torch.float64))
        if par is not None:
            same = par[s:e, None] == par[None, s:]  # (b, n - s)
            sib += float(sim.masked_select(same).sum(dtype=torch.float64))
        _tick(progress)
    pairs = n * (n - 1) // 2
    sib_pairs = _sibling_pairs(par) if par is not None and n else 0
    other = pairs - sib_pairs
    return {
        "cosine_mean_abs": total / pairs if pairs else math.nan,
        "cosine_mean_abs_non_sibling": (total - sib) / other if other else math.nan,
        "cosine_mean_abs_sibling": sib / sib_pairs if sib_pairs else math.nan,
        "pairs": pairs, "sibling_pairs": sib_pairs, "zero_rows": int((~keep).sum()),
    }


def polysemanticity(w: torch.Tensor, *, chunk: int = CHUNK, progress: Progress = None) -> torch.Tensor:
    """Per neuron exp(entropy(p)), p_j = w_j^2 / sum_k w_k^2: effective number of input features, (out,).

    1 when one input drives the neuron, d when d inputs contribute equally; NaN for an all-zero row.
    Invariant to scaling a neuron's row (and to permuting neurons or features).
    """
    out = torch.empty(w.shape[0], dtype=torch.float64)
    for s, e in _blocks(w.shape[0], chunk):
        out[s:e] = _entropy_exp(w[s:e].double() ** 2)  # (b,)
        _tick(progress)
    return out


# ---------------------------------------------------------------- data-based metrics


@dataclass
class ActivationStats:
    """Running sums for one hidden layer over a probe set (streamed in batches)."""

    class_sums: torch.Tensor  # float64 (C, h): sum of activations over samples of class c
    class_counts: torch.Tensor  # float64 (C,)
    active_counts: torch.Tensor  # int64 (h,): samples with activation > 0
    samples: int = 0
    kernel: str | None = None  # FPELinear kernel the activations came from ('dense' or 'grouped')

    @classmethod
    def empty(cls, num_classes: int, width: int) -> "ActivationStats":
        return cls(torch.zeros(num_classes, width, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64),
                   torch.zeros(width, dtype=torch.int64))

    def add(self, acts: torch.Tensor, targets: torch.Tensor) -> None:
        """acts (N, h); targets (N, C) float 0/1 (one-hot or multi-label)."""
        self.class_sums += (targets.float().T @ acts.float()).double()  # (C, h); float64 across batches
        self.class_counts += targets.double().sum(dim=0)
        self.active_counts += (acts > 0).sum(dim=0)
        self.samples += acts.shape[0]


def label_matrix(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels (N,) -> one-hot (N, C); a multi-label (N, C) 0/1 matrix passes through."""
    if y.ndim == 2:
        return y.to(torch.float64)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise FPEError(f"labels must lie in 0..{num_classes - 1}, found {int(y.min())}..{int(y.max())}")
    return torch.nn.functional.one_hot(y.long(), num_classes).to(torch.float64)


def activation_stats(mlp: MLP, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, batch: int = BATCH,
                     progress: Progress = None) -> list[ActivationStats]:
    """One ActivationStats per hidden layer, from the probe inputs x (N, d) and labels y, in batches.

    Activations (float32, whatever the checkpoint's dtype) come from FPELinear's kernels, as in fine-tuning
    and evaluation (`layers.KernelMLP`: masks applied once, grouped blocks where the recorded split allows);
    `model.hidden_activations`, the masked-dense reference, is the oracle the tests compare against.
    """
    stats = [ActivationStats.empty(num_classes, layer.out_features) for layer in mlp.layers[:-1]]
    with torch.no_grad():
        module = KernelMLP(mlp)
        for st, kernel in zip(stats, module.kernels):
            st.kernel = kernel
        rows = max(1, GATHER_BYTES // (4 * module.gather_width)) if module.gather_width else batch  # small groups gather a lot
        for s, e in _blocks(x.shape[0], batch):
            targets = label_matrix(y[s:e], num_classes)  # (b, C)
            for a, b in _blocks(e - s, rows):
                for st, acts in zip(stats, module.hidden_activations(x[s + a:s + b])):
                    st.add(acts, targets[a:b])
            _tick(progress)
    return stats


def class_selectivity(stats: ActivationStats) -> torch.Tensor:
    """Effective number of classes per neuron, (h,): exp(entropy) of |class-conditional mean activation|."""
    seen = stats.class_counts > 0
    means = stats.class_sums[seen] / stats.class_counts[seen, None]  # (C_seen, h)
    return _entropy_exp(means.abs().T)


def data_metrics(stats: ActivationStats) -> tuple[dict, dict[str, torch.Tensor]]:
    """(layer summary, per-neuron tensors) from a layer's activation statistics."""
    density = stats.active_counts.double() / max(stats.samples, 1)  # (h,)
    classes = class_selectivity(stats)
    summary = {"class_selectivity_mean": _nanmean(classes), "dead_fraction": float((stats.active_counts == 0).double().mean()),
               "activation_density": float(density.mean()), "samples": stats.samples}
    return summary, {"class_selectivity": classes, "density": density}


# ---------------------------------------------------------------- whole layers and models


@dataclass
class LayerAnalysis:
    """Every metric of one layer: `metrics` (scalars, see METRICS) and per-neuron / per-feature tensors."""

    key: str
    index: int
    shape: tuple[int, int]
    parents: torch.Tensor | None
    capacity: torch.Tensor  # (in,)
    polysemanticity: torch.Tensor  # (out,)
    norms: torch.Tensor  # (out,)
    metrics: dict
    neuron_data: dict[str, torch.Tensor] = field(default_factory=dict)  # class_selectivity, density (out,)

    @property
    def alpha(self) -> int | None:
        if self.parents is None or not self.parents.numel():
            return None
        counts = torch.bincount(self.parents)
        return int(counts.max()) if int(counts.max()) == int(counts.min()) else None


def analyzed_layers(mlp: MLP) -> list[int]:
    """Layers whose rows are hidden neurons (all but the output layer); a single layer is analyzed itself."""
    return list(range(len(mlp.layers) - 1)) if len(mlp.layers) > 1 else [0]


def work_units(mlp: MLP, chunk: int = CHUNK) -> int:
    """Number of progress ticks analyze_mlp will make without data (for a progress bar's total)."""
    blocks = lambda n: -(-n // chunk)  # noqa: E731
    return sum(blocks(mlp.layers[i].in_features) + 2 * blocks(mlp.layers[i].out_features) for i in analyzed_layers(mlp))


def analyze_layer(layer: Layer, index: int = 0, *, chunk: int = CHUNK, progress: Progress = None) -> LayerAnalysis:
    w = effective_weight(layer)
    cap = feature_capacity(w, chunk=chunk, progress=progress)
    cos = cosine_stats(w, layer.parents, chunk=chunk, progress=progress)
    poly = polysemanticity(w, chunk=chunk, progress=progress)
    metrics = {**capacity_summary(cap, layer.out_features), **cos,
               "polysemanticity_mean": _nanmean(poly), "polysemanticity_median": _nanmedian(poly)}
    return LayerAnalysis(layer.weight_key, index, tuple(w.shape), layer.parents, cap, poly, w.float().norm(dim=1), metrics)


def analyze_mlp(mlp: MLP, stats: list[ActivationStats] | None = None, *, chunk: int = CHUNK,
                progress: Progress = None) -> list[LayerAnalysis]:
    """Weight metrics of every analyzed layer, plus data metrics when activation stats are given."""
    out = []
    for i in analyzed_layers(mlp):
        la = analyze_layer(mlp.layers[i], i, chunk=chunk, progress=progress)
        if stats is not None and i < len(stats):
            summary, la.neuron_data = data_metrics(stats[i])
            la.metrics.update(summary)
        out.append(la)
    return out


# ---------------------------------------------------------------- dense vs. expanded


def fold_change(expanded: float, dense: float) -> float:
    """expanded / dense; NaN when either is undefined or dense is 0."""
    if expanded is None or dense is None or math.isnan(expanded) or math.isnan(dense) or dense == 0:
        return math.nan
    return expanded / dense


def lineage(dense: LayerAnalysis, expanded: LayerAnalysis) -> torch.Tensor:
    """Parent (dense row) of every expanded row; an unexpanded layer of the same width maps 1:1."""
    parents = expanded.parents
    if parents is None:
        if expanded.shape[0] != dense.shape[0]:
            raise FPEError(f"{expanded.key}: {expanded.shape[0]} neurons, no lineage, but the dense layer has {dense.shape[0]}",
                           "give the dense model first and a file written by fpe expand second")
        return torch.arange(dense.shape[0])
    n_parents = int(parents.max()) + 1 if parents.numel() else 0
    if n_parents != dense.shape[0]:
        raise FPEError(f"{expanded.key}: its lineage has {n_parents} parent neurons but the dense layer {dense.key} has "
                       f"{dense.shape[0]}", "the second model must be expanded from the first")
    return parents


def _children_mean(values: torch.Tensor, parents: torch.Tensor, n_parents: int) -> torch.Tensor:
    """Mean over each parent's children, ignoring NaN children, (n_parents,); NaN when none is defined."""
    ok = ~torch.isnan(values)
    sums = torch.zeros(n_parents, dtype=torch.float64).index_add_(0, parents[ok], values[ok].double())
    counts = torch.zeros(n_parents, dtype=torch.float64).index_add_(0, parents[ok], torch.ones(int(ok.sum()), dtype=torch.float64))
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, math.nan))


def top_indices(score: torch.Tensor, n: int) -> list[int]:
    """Indices of the n largest scores, NaN last, ties by index (deterministic)."""
    key = torch.nan_to_num(score.double(), nan=-math.inf)
    return torch.argsort(key, descending=True, stable=True)[:n].tolist()


def _parent_rows(dense: LayerAnalysis, expanded: LayerAnalysis, parents: torch.Tensor, top: int) -> list[dict]:
    n = dense.shape[0]
    child_poly = _children_mean(expanded.polysemanticity, parents, n)
    child_cls = _children_mean(expanded.neuron_data["class_selectivity"], parents, n) if expanded.neuron_data else None
    rows = []
    for p in top_indices(dense.polysemanticity, top):
        row = {"parent": p, "children": torch.nonzero(parents == p).flatten().tolist(),
               "polysemanticity_dense": float(dense.polysemanticity[p]),
               "polysemanticity_children_mean": float(child_poly[p]),
               "polysemanticity_fold_change": fold_change(float(child_poly[p]), float(dense.polysemanticity[p]))}
        if child_cls is not None and dense.neuron_data:
            d_cls = float(dense.neuron_data["class_selectivity"][p])
            row.update(class_selectivity_dense=d_cls, class_selectivity_children_mean=float(child_cls[p]),
                       class_selectivity_fold_change=fold_change(float(child_cls[p]), d_cls))
        rows.append(row)
    return rows


def compare(dense: list[LayerAnalysis], expanded: list[LayerAnalysis], top: int = 10) -> list[dict]:
    """Per layer: every metric's fold change (expanded / dense) and the `top` most polysemantic parents."""
    if len(dense) != len(expanded):
        raise FPEError(f"the models have {len(dense)} and {len(expanded)} hidden layers",
                       "compare a dense model with a model expanded from it")
    out = []
    for d, x in zip(dense, expanded):
        parents = lineage(d, x)
        folds = {m: fold_change(x.metrics.get(m, math.nan), d.metrics.get(m, math.nan)) for m in METRICS}
        # a dense layer has no siblings: its non-sibling value is its all-pairs value
        folds["cosine_mean_abs_non_sibling"] = fold_change(x.metrics["cosine_mean_abs_non_sibling"], d.metrics["cosine_mean_abs"])
        out.append({"layer": x.key, "dense_layer": d.key, "neurons_dense": d.shape[0], "neurons_expanded": x.shape[0],
                    "fold_change": folds, "top_parents": _parent_rows(d, x, parents, top)})
    return out
