"""FPE invariants and parameter accounting (pure functions on MLPs and metadata dicts).

Invariants of an expanded model, each reported as a human-readable violation:
  - off-mask weights are exactly zero;
  - the number of weights (mask entries; tied column copies count once) equals the recorded budget,
    and the source's when given;
  - tied column copies hold equal values and masks;
  - siblings (children of one parent) own disjoint input edges;
  - with the source: every child's edges are a subset of its parent's, and the source is the file
    that was expanded (sha256).
"""

from __future__ import annotations

import torch

from .model import MLP, Layer, effective_weight, first_of_groups


def _col_parents(mlp: MLP, index: int) -> torch.Tensor | None:
    """Lineage of a layer's inputs: the previous layer's output lineage, if it was expanded."""
    return mlp.layers[index - 1].parents if index > 0 else None


def check_off_mask_zero(mlp: MLP) -> list[str]:
    out = []
    for layer in mlp.layers:
        if layer.mask is not None:
            n = int(((layer.weight != 0) & ~layer.mask).sum())
            if n:
                out.append(f"{layer.weight_key}: {n} weight(s) off the mask are not zero")
    return out


def non_finite_tensors(mlp: MLP) -> list[str]:
    """Names of the weights and biases holding NaN or Inf."""
    return [key for layer in mlp.layers for key, t in ((layer.weight_key, layer.weight), (layer.bias_key, layer.bias))
            if t is not None and not bool(torch.isfinite(t).all())]


def check_finite_values(mlp: MLP) -> list[str]:
    return [f"{key}: non-finite values" for key in non_finite_tensors(mlp)]


def check_siblings_disjoint(mlp: MLP) -> list[str]:
    out = []
    for layer in mlp.layers:
        if layer.parents is None or layer.mask is None:
            continue
        n_parents = int(layer.parents.max()) + 1 if layer.parents.numel() else 0
        owners = torch.zeros(n_parents, layer.in_features, dtype=torch.int32)
        owners.index_add_(0, layer.parents, layer.mask.to(torch.int32))  # (parents, d): children owning each edge
        shared = int((owners > 1).sum())
        if shared:
            out.append(f"{layer.weight_key}: {shared} input edge(s) are owned by more than one sibling")
    return out


def check_ties(mlp: MLP) -> list[str]:
    """Tied columns (copies of one parameter) must hold equal values and masks."""
    out = []
    for layer in mlp.layers:
        if layer.tied is None:
            continue
        first = first_of_groups(layer.tied)[layer.tied]  # (in,): the first copy of each column's group
        w, support = effective_weight(layer), layer.support()
        differ = int(((w != w[:, first]) | (support != support[:, first])).sum())
        if differ:
            out.append(f"{layer.weight_key}: {differ} tied column entr(ies) differ from their group's first copy")
    return out


def check_budget(mlp: MLP, budget: int | None, source: MLP | None = None) -> list[str]:
    out = []
    have = mlp.weight_budget()
    if budget is not None and have != budget:
        out.append(f"budget: the model has {have} weights but its recorded budget is {budget}")
    if source is not None and have != source.weight_budget():
        out.append(f"budget: the model has {have} weights but the source has {source.weight_budget()}")
    return out


def _subset_violations(layer: Layer, src: Layer, rows: torch.Tensor, cols: torch.Tensor) -> list[str]:
    if (rows.numel() and int(rows.max()) >= src.out_features) or (cols.numel() and int(cols.max()) >= src.in_features):
        return [f"{layer.weight_key}: lineage points outside the source's {tuple(src.weight.shape)} weight"]
    parent_support = src.support()[rows][:, cols]  # (out', in') parent's edges seen from each child
    extra = int((layer.support() & ~parent_support).sum())
    return [f"{layer.weight_key}: {extra} edge(s) are not edges of the parent in the source"] if extra else []


def check_against_source(mlp: MLP, source: MLP) -> list[str]:
    if len(mlp.layers) != len(source.layers):
        return [f"the source has {len(source.layers)} layers, the model {len(mlp.layers)}"]
    out = []
    for k, (layer, src) in enumerate(zip(mlp.layers, source.layers)):
        rows = layer.parents if layer.parents is not None else torch.arange(layer.out_features)
        cols = _col_parents(mlp, k)
        cols = cols if cols is not None else torch.arange(layer.in_features)
        if rows.numel() != layer.out_features or cols.numel() != layer.in_features:
            out.append(f"{layer.weight_key}: lineage does not match the weight shape")
            continue
        out += _subset_violations(layer, src, rows, cols)
    return out


def check_invariants(mlp: MLP, budget: int | None, source: MLP | None = None,
                     source_sha: str | None = None, recorded_sha: str | None = None) -> list[str]:
    """Every violated invariant (empty list = all hold)."""
    problems = check_finite_values(mlp) + check_off_mask_zero(mlp) + check_siblings_disjoint(mlp) + check_ties(mlp)
    problems += check_budget(mlp, budget, source)
    if source is not None:
        if recorded_sha and source_sha and recorded_sha != source_sha:
            problems.append(f"source: its sha256 {source_sha[:12]}... is not the recorded {recorded_sha[:12]}...")
        problems += check_against_source(mlp, source)
    return problems


def layer_counts(layer: Layer, hidden: bool) -> dict:
    """Counts of one layer. A tied layer is counted on its parameter matrix [out, parents] (each shared
    column once), so weights, non-zeros and sparsity describe the same entries."""
    weight = layer.weight if layer.tied is None else layer.weight[:, first_of_groups(layer.tied)]
    numel = weight.numel()
    active = layer.active_weights()
    return {
        "weight": layer.weight_key,
        "shape": list(layer.weight.shape),
        "dtype": str(layer.weight.dtype).replace("torch.", ""),
        "stored_elements": numel,  # entries of the dense matrix (the parameter matrix of a tied layer)
        "weights": active,  # weights that exist (mask entries, or non-zeros without a mask)
        "nonzero_weights": int((weight != 0).sum()),
        "biases": layer.bias.numel() if layer.bias is not None else 0,
        "neurons_out": layer.out_features,
        "hidden": hidden,
        "sparsity": 1.0 - active / numel if numel else 0.0,
        "expanded": layer.parents is not None,
        "tied": layer.tied is not None,  # tied column copies count once in "weights"
    }


def model_counts(mlp: MLP) -> dict:
    n = len(mlp.layers)
    layers = [layer_counts(layer, hidden=i < n - 1) for i, layer in enumerate(mlp.layers)]
    return {
        "layers": layers,
        "total": {
            "weights": sum(c["weights"] for c in layers),
            "nonzero_weights": sum(c["nonzero_weights"] for c in layers),
            "biases": sum(c["biases"] for c in layers),
            "stored_elements": sum(c["stored_elements"] for c in layers),
            "hidden_neurons": sum(c["neurons_out"] for c in layers if c["hidden"]),
        },
    }
