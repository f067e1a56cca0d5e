"""FPE invariants and parameter accounting (pure functions on MLPs and metadata dicts).

Invariants of an expanded model, each reported as a human-readable violation:
  - off-mask weights are exactly zero;
  - the number of weights (mask entries; tied column copies count once) equals the recorded budget,
    and the source's when given;
  - tied column copies hold equal values and masks;
  - siblings (children of one parent) own disjoint input edges;
  - with the source: every child's edges are a subset of its parent's, and the source is the file
    that was expanded (sha256);
  - an expanded model keeps a mask on every layer (without one, a pruned weight cannot be told from a
    trained zero and fine-tuning would train every entry);
  - with the source and a file that records no fine-tuning: every weight and bias is still its
    parent's in the source (or its 1/children share with outgoing="split").
"""

from __future__ import annotations

import json

import torch

from .errors import JSON_ERRORS
from .model import MLP, Layer, count_true, effective_weight, first_of_groups, row_blocks


def _col_parents(mlp: MLP, index: int) -> torch.Tensor | None:
    """Lineage of a layer's inputs: the previous layer's output lineage, if it was expanded."""
    return mlp.layers[index - 1].parents if index > 0 else None


def check_off_mask_zero(mlp: MLP) -> list[str]:
    out = []
    for layer in mlp.layers:
        if layer.mask is not None:
            n = count_true((layer.weight != 0) & ~layer.mask)
            if n:
                out.append(f"{layer.weight_key}: {n} weight(s) off the mask are not zero")
    return out


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t. torch's max/min reductions propagate NaN and keep +-Inf, so the extremes tell
    without a bool tensor of t's size (about 15x faster than isfinite(t).all() on large weights)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.amax())) and bool(torch.isfinite(t.amin()))


def non_finite_tensors(mlp: MLP) -> list[str]:
    """Names of the weights and biases holding NaN or Inf."""
    return [key for layer in mlp.layers for key, t in ((layer.weight_key, layer.weight), (layer.bias_key, layer.bias))
            if t is not None and not all_finite(t)]


def check_finite_values(mlp: MLP) -> list[str]:
    return [f"{key}: non-finite values" for key in non_finite_tensors(mlp)]


def check_siblings_disjoint(mlp: MLP) -> list[str]:
    out = []
    for layer in mlp.layers:
        if layer.parents is None:
            continue
        n_parents = int(layer.parents.max()) + 1 if layer.parents.numel() else 0
        owners = torch.zeros(n_parents, layer.in_features, dtype=torch.int32)
        owners.index_add_(0, layer.parents, layer.support().to(torch.int32))  # (parents, d): children owning each edge
        shared = count_true(owners > 1)
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
        differ = count_true((w != w[:, first]) | (support != support[:, first]))
        if differ:
            out.append(f"{layer.weight_key}: {differ} tied column entr(ies) differ from their group's first copy")
    return out


def check_budget(mlp: MLP, budget: int | None, source: MLP | None = None) -> list[str]:
    out = []
    have = mlp.weight_budget()
    if budget is None and source is None and mlp.is_expanded:  # a malformed budget: checkpoint.recorded_budget
        out.append("budget: the expanded model records no budget (fpe.budget), so its weight count cannot be "
                   "checked; pass --source to compare with the source's")
    if budget is not None and have != budget:
        out.append(f"budget: the model has {have} weights but its recorded budget is {budget}")
    if source is not None and have != source.weight_budget():
        out.append(f"budget: the model has {have} weights but the source has {source.weight_budget()}")
    return out


def _subset_violations(layer: Layer, src: Layer, rows: torch.Tensor, cols: torch.Tensor) -> list[str]:
    if (rows.numel() and int(rows.max()) >= src.out_features) or (cols.numel() and int(cols.max()) >= src.in_features):
        return [f"{layer.weight_key}: lineage points outside the source's {tuple(src.weight.shape)} weight"]
    parent_support = src.support()[rows][:, cols]  # (out', in') parent's edges seen from each child
    extra = count_true(layer.support() & ~parent_support)
    return [f"{layer.weight_key}: {extra} edge(s) are not edges of the parent in the source"] if extra else []


def check_masks_present(mlp: MLP) -> list[str]:
    """fpe writes a mask for every layer of an expanded model; a dropped one unlocks the pruned weights."""
    if not mlp.is_expanded:
        return []
    return [f"{layer.weight_key}: the expanded model has no mask for this layer (dropped?), so its pruned weights "
            "cannot be told from trained zeros and fine-tuning would train every entry"
            for layer in mlp.layers if layer.mask is None]


def _lineage_against_source(layer: Layer, src: Layer, rows: torch.Tensor, cols: torch.Tensor) -> list[str]:
    """The lineage must map the layer onto the source's weight: one row group per source output."""
    out = []
    if layer.parents is None and layer.out_features != src.out_features:
        out.append(f"{layer.weight_key}: {layer.out_features} outputs but the source's has {src.out_features}, "
                   "and the file has no lineage (fpe.children) for them")
    elif layer.parents is not None:
        n_parents = int(layer.parents.max()) + 1 if layer.parents.numel() else 0
        if n_parents != src.out_features:
            out.append(f"{layer.weight_key}: its lineage (fpe.children) names {n_parents} parents, "
                       f"but the source's weight has {src.out_features} outputs")
    n_cols = int(cols.max()) + 1 if cols.numel() else 0
    if n_cols != src.in_features:
        out.append(f"{layer.weight_key}: its {layer.in_features} inputs come from {n_cols} source inputs, "
                   f"but the source's weight has {src.in_features}")
    return out


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
        shape = _lineage_against_source(layer, src, rows, cols)
        out += shape if shape else _subset_violations(layer, src, rows, cols)
    return out


def _expansion_settings(metadata: dict[str, str]) -> dict | None:
    """The recorded expansion settings, when the file's weights should still be the source's: an
    expanded file that records no fine-tuning (`fpe.finetune.*`), with a known outgoing and bias rule."""
    if any(k.startswith("fpe.finetune.") for k in metadata) or "fpe.settings" not in metadata:
        return None
    try:
        settings = json.loads(metadata["fpe.settings"])
    except JSON_ERRORS:
        return None
    if not isinstance(settings, dict) or settings.get("outgoing") not in ("copy", "split", "tie") \
            or settings.get("bias", "copy") != "copy":
        return None
    return settings


def _differ(have: torch.Tensor, want: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """Entries (among `where`, if given) that differ by more than rounding (one unit in the last place of the
    stored dtype). Equal entries (nearly all, in a file that was not fine-tuned) skip the float64 arithmetic."""
    eps = torch.finfo(have.dtype).eps if have.is_floating_point() else 0.0
    want = want.expand_as(have)
    unequal = have != want
    if where is not None:
        unequal &= where
    at = unequal.nonzero(as_tuple=True)  # usually empty
    if at[0].numel():
        h, w = have[at].to(torch.float64), want[at].to(torch.float64)
        unequal[at] = (h - w).abs() > eps * torch.maximum(h.abs(), w.abs())
    return unequal


def _count_differing(layer: Layer, want: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> int:
    """Weights on the layer's support that differ from `want` (source-sized) seen through the lineage
    (`want[rows][:, cols]`), compared a bounded block of rows at a time (float64 temporaries of a whole
    widened layer took GBs)."""
    support = layer.support()
    return sum(count_true(_differ(layer.weight[block], want[rows[block]][:, cols], support[block]))
               for block in row_blocks(layer.out_features, layer.in_features))


def compares_values(mlp: MLP) -> bool:
    """Whether check_values_against_source compares values: an expanded file that records no fine-tuning."""
    return mlp.is_expanded and _expansion_settings(mlp.metadata) is not None


def check_values_against_source(mlp: MLP, source: MLP) -> list[str]:
    """An expanded file that was not fine-tuned holds its parents' weights: child row r of parent i and
    input column c copied from source input j hold W[i, j] (outgoing copy/tie) or W[i, j] / children(j)
    (split), and child biases copy the parent's. Anything else was edited, or expanded from another source."""
    if not compares_values(mlp) or len(mlp.layers) != len(source.layers):
        return []
    settings = _expansion_settings(mlp.metadata)
    out = []
    for k, (layer, src) in enumerate(zip(mlp.layers, source.layers)):
        rows = layer.parents if layer.parents is not None else torch.arange(layer.out_features)
        cols = _col_parents(mlp, k)
        cols = cols if cols is not None else torch.arange(layer.in_features)
        if rows.numel() != layer.out_features or cols.numel() != layer.in_features \
                or _lineage_against_source(layer, src, rows, cols):
            continue  # reported by check_against_source
        want = effective_weight(src)
        if settings["outgoing"] == "split" and k > 0 and mlp.layers[k - 1].parents is not None:
            counts = torch.bincount(cols, minlength=src.in_features).to(want.dtype)
            want = want / counts
        n = _count_differing(layer, want, rows, cols)
        if n:
            out.append(f"{layer.weight_key}: {n} weight(s) differ from their parent's in the source (the file records "
                       "no fine-tuning, so each should still hold its parent's value)")
        if layer.bias is not None and src.bias is not None and tuple(src.bias.shape) == (src.out_features,):
            nb = count_true(_differ(layer.bias, src.bias[rows]))
            if nb:
                out.append(f"{layer.bias_key}: {nb} bias(es) differ from their parent's in the source")
    return out


def check_invariants(mlp: MLP, budget: int | None, source: MLP | None = None,
                     source_sha: str | None = None, recorded_sha: str | None = None) -> list[str]:
    """Every violated invariant (empty list = all hold)."""
    problems = check_finite_values(mlp) + check_masks_present(mlp) + check_off_mask_zero(mlp)
    problems += check_siblings_disjoint(mlp) + check_ties(mlp)
    problems += check_budget(mlp, budget, source)
    if source is not None:
        if recorded_sha and source_sha and recorded_sha != source_sha:
            problems.append(f"source: its sha256 {source_sha[:12]}... is not the recorded {recorded_sha[:12]}...")
        elif not recorded_sha and source_sha and mlp.is_expanded:
            problems.append("source: the expanded file records no fpe.source_sha256, so the source cannot be "
                            "confirmed as the file that was expanded")
        problems += check_against_source(mlp, source)
        problems += check_values_against_source(mlp, source)
    return problems


def layer_counts(layer: Layer, hidden: bool) -> dict:
    """Counts of one layer. A tied layer is counted on its parameter matrix [out, parents] (each shared
    column once), so weights, non-zeros and sparsity describe the same entries."""
    weight, support = layer.weight, layer.support()
    if layer.tied is not None:
        first = first_of_groups(layer.tied)
        weight, support = weight[:, first], support[:, first]
    numel = weight.numel()
    active = layer.active_weights()
    return {
        "weight": layer.weight_key,
        "shape": list(layer.weight.shape),
        "dtype": str(layer.weight.dtype).replace("torch.", ""),
        "stored_elements": numel,  # entries of the dense matrix (the parameter matrix of a tied layer)
        "weights": active,  # weights that exist (mask entries, or non-zeros without a mask)
        "nonzero_weights": count_true((weight != 0) & support),  # an off-mask entry is no weight, zero or not
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
