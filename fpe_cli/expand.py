"""Apply split plans to an MLP and restore the weight budget (pure: tensors in, tensors out).

The algorithm (method.md section 2), for each targeted hidden layer k in order:
  1. plan: child[i, j] = which of parent i's alpha children owns edge (i, j);
  2. producer rows: child c of parent i is row alpha*i + c of W_k' and keeps W_k[i, j] where
     child[i, j] == c (sibling supports are disjoint by construction);
  3. biases: each child copies the parent's bias;
  4. consumer columns: each child copies the parent's outgoing column of W_{k+1} (or 1/alpha of it
     with outgoing="split"), widening the next layer's input.
Then once, globally over all weight matrices: prune the smallest-magnitude existing weights until
the number of weights equals the source's budget exactly (ties: earlier layer, then row-major order).

outgoing="tie" (ours, an option beside the paper's rule): the copies stay one shared parameter
(`Layer.tied`), so the consumer applies the parent's column once to the sum of its children's
activations; the budget then holds without pruning (the producer's edges are only partitioned)
and a grouped split runs fastest (see fpe_cli.layers; the evidence sweep shows it costs accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hashlib

import torch

from .errors import FPEError
from .model import (MLP, Layer, count_true, empty_rows, first_of_groups, forward, hidden_activations, row_blocks,
                    sibling_sum)
from .plan import LayerPlan, SplitPlan, plan_layer, validate_layer_plan

OUTGOING = ("copy", "split", "tie")


@dataclass
class Target:
    """One hidden layer to expand: the producer layer's index in the chain and how to split it."""

    index: int
    alpha: int
    split: str = "random"
    top: float | None = None  # expand only the top parents by polysemanticity (count, or fraction < 1)


@dataclass
class PlanInputs:
    """What the split strategies may need beyond the weights."""

    groups: torch.Tensor | None = None  # (d_in,) clause group of each model input, for `clause`
    clusters: int | None = None  # feature clusters for `gram` / `activation`
    group_size: int | None = None  # share random partitions among this many parents
    calibration: torch.Tensor | None = None  # (N, d_in) model inputs, for `activation`


@dataclass
class ExpandResult:
    mlp: MLP
    plan: SplitPlan
    budget: int
    before: list[int]  # weights per matrix in the source
    after: list[int]  # weights per matrix after expansion and pruning
    pruned: list[int]  # weights pruned per matrix
    dead_children: list[int] = field(default_factory=list)  # children left with no input edge, per matrix


def split_rows(layer: Layer, plan: LayerPlan) -> Layer:
    """Producer: (h, d) -> (sum of children, d); parent i's children are consecutive rows.

    With alpha children for every parent, child c of parent i is row alpha*i + c.
    """
    alpha, (h, d) = plan.alpha, layer.weight.shape
    support = layer.support()
    owner = plan.child.to(torch.int64).clamp(min=0).unsqueeze(1)  # (h, 1, d); non-edges park in child 0
    values = layer.weight.masked_fill(~support, 0).unsqueeze(1)  # (h, 1, d)
    weight = torch.zeros(h, alpha, d, dtype=layer.weight.dtype).scatter_(1, owner, values)  # (h, alpha, d)
    mask = torch.zeros(h, alpha, d, dtype=torch.bool).scatter_(1, owner, support.unsqueeze(1))  # (h, alpha, d)
    counts = plan.child_counts()  # (h,)
    weight, mask = weight.view(alpha * h, d), mask.view(alpha * h, d)  # (alpha*h, d)
    if plan.children is not None:  # selective expansion: drop the children a parent does not have
        keep = (torch.arange(alpha)[None, :] < counts[:, None]).view(-1)  # (alpha*h,)
        weight, mask = weight[keep], mask[keep]
    bias = layer.bias.repeat_interleave(counts) if layer.bias is not None else None  # (rows,)
    parents = torch.arange(h).repeat_interleave(counts)  # (rows,)
    return Layer(layer.weight_key, weight, layer.bias_key, bias, mask, parents, layer.tied)


def outgoing_values(weight: torch.Tensor, copies: int | torch.Tensor, outgoing: str) -> torch.Tensor:
    """A consumer's columns as each of their copies will hold them: the parent's (copy) or a 1/copies share (split)."""
    if outgoing not in OUTGOING:
        raise FPEError(f"unknown --outgoing {outgoing!r}", f"choose one of: {', '.join(OUTGOING)}")
    if outgoing in ("copy", "tie"):
        return weight
    return weight / (copies if isinstance(copies, int) else copies.to(weight.dtype))


def copy_columns(layer: Layer, alpha: int | torch.Tensor, outgoing: str) -> Layer:
    """Consumer: (C, h) -> (C, children); each child's column copies its parent's (or a 1/children share).

    `alpha` is an int (every parent) or an int64 (h,) tensor of children per parent.
    """
    weight = outgoing_values(layer.weight, alpha, outgoing).repeat_interleave(alpha, dim=1)  # (C, alpha*h)
    mask = layer.support().repeat_interleave(alpha, dim=1)
    tied = None
    if outgoing == "tie":  # the copies stay one parameter: record each column's parent
        tied = torch.arange(layer.in_features).repeat_interleave(alpha, dim=0)
    return Layer(layer.weight_key, weight, layer.bias_key, layer.bias, mask, layer.parents, tied)


@dataclass
class Origin:
    """What an expanded layer's weights are made of: a source-sized weight whose column j appears copies[j] times.

    Splitting rows moves each edge to exactly one child and copying columns repeats them, so the
    multiset of the expanded layer's magnitudes is the origin's, each counted copies[j] times: the
    pruning threshold can be selected on the (alpha times smaller) origin.
    """

    weight: torch.Tensor  # (out, in) values as the expanded layer holds them (outgoing shares applied)
    mask: torch.Tensor  # bool (out, in): the weights that exist
    copies: torch.Tensor | None = None  # int64 (in,) copies of each column; None = one each

    @classmethod
    def of(cls, layer: Layer) -> "Origin":
        return cls(layer.weight, layer.support())


DIGIT = 16  # bits per radix-select pass


@dataclass(frozen=True)
class _Key:
    """How magnitudes become sortable integers: float32 bits (float16/bfloat16 convert exactly), or
    float64 bits when any layer is float64 (a float32 key would round 1 + 1e-12 to 1 and call 1e300 Inf)."""

    float_dtype: torch.dtype
    int_dtype: torch.dtype
    width: int
    first_non_finite: int  # top digit of +Inf: exponent all ones

    @property
    def not_a_weight(self) -> int:
        """Bit pattern parked on non-edges: above every finite magnitude (it is a NaN pattern; non-edges
        are counted, so a real NaN there is still found)."""
        return (1 << (self.width - 1)) - 1

    @classmethod
    def for_origins(cls, origins: list["Origin"]) -> "_Key":
        if any(o.weight.dtype == torch.float64 for o in origins):
            return cls(torch.float64, torch.int64, 64, 0x7FF0)
        return cls(torch.float32, torch.int32, 32, 0x7F80)


def _column_groups(origin: Origin):
    """(columns, multiplicity) pairs covering the origin's columns; columns is a slice when all share one."""
    if origin.copies is None:
        return [(slice(None), 1)]
    values = torch.unique(origin.copies)
    if values.numel() == 1:
        return [(slice(None), int(values[0]))]
    return [((origin.copies == v).nonzero().flatten(), int(v)) for v in values]


def _magnitude_bits(origin: Origin, key: _Key):
    """(bit patterns of |w|, multiplicity, non-edges) blocks over an origin; non-edges hold key.not_a_weight.

    For non-negative floats the IEEE bit pattern orders exactly like the value, so selecting on
    the bits selects on the magnitudes.
    """
    rows, cols = origin.weight.shape
    for columns, copies in _column_groups(origin):
        for r in row_blocks(rows, cols):
            w, m = origin.weight[r][:, columns], origin.mask[r][:, columns]
            bits = w.abs().to(key.float_dtype).view(key.int_dtype)
            yield torch.where(m, bits, key.not_a_weight).view(-1), copies, m.numel() - count_true(m)


def _histogram(origins: list[Origin], key: _Key, select) -> tuple[torch.Tensor, int]:
    """Counts of the 16-bit digits `select(bits)` returns, each weight counted as often as it is copied,
    and the number of non-edges scanned (copies counted too)."""
    hist = torch.zeros(1 << DIGIT, dtype=torch.int64)
    non_edges = 0
    for origin in origins:
        for bits, copies, holes in _magnitude_bits(origin, key):
            picked = select(bits)
            hist += copies * torch.bincount(picked, minlength=1 << DIGIT)[: 1 << DIGIT]
            non_edges += copies * holes
    return hist, non_edges


def _select_threshold(origins: list[Origin], excess: int) -> tuple[float, int]:
    """The excess-th smallest |w| among existing weights, and how many are strictly smaller.

    A radix select on the bit patterns, 16 bits per pass (two passes for float32 keys, four for
    float64): exact, with memory bounded by one row chunk instead of an array of every magnitude.
    """
    key = _Key.for_origins(origins)
    prefix, below = 0, 0
    for shift in range(key.width - DIGIT, -1, -DIGIT):
        if shift == key.width - DIGIT:
            hist, non_edges = _histogram(origins, key, lambda b: b >> shift)
            non_finite = int(hist[key.first_non_finite:].sum()) - non_edges  # non-edges sit in the top bucket
            if non_finite:
                raise FPEError("non-finite (NaN or Inf) weights cannot be ranked by magnitude", "fix or retrain the checkpoint")
            hist[key.not_a_weight >> shift] -= non_edges
        else:
            hist, _ = _histogram(origins, key, lambda b: (b[(b >> (shift + DIGIT)) == prefix] >> shift) & 0xFFFF)
        cum = hist.cumsum(0)
        digit = int(torch.searchsorted(cum, excess - below))  # first digit whose running count reaches it
        below += int(cum[digit - 1]) if digit else 0
        prefix = (prefix << DIGIT) | digit
    threshold = torch.tensor([prefix], dtype=torch.int64).to(key.int_dtype).view(key.float_dtype)
    return float(threshold), below


def _prune_layer(layer: Layer, threshold: float, ties_to_prune: int) -> tuple[int, int]:
    """Prune |w| < threshold, then the first `ties_to_prune` |w| == threshold; returns (pruned, ties left).

    Magnitudes are compared in float64 (exact for every float dtype, and a Python float threshold is one)."""
    before = count_true(layer.mask)
    limit = torch.tensor(threshold, dtype=torch.float64)
    for rows in row_blocks(layer.out_features, layer.in_features):
        w, mask = layer.weight[rows], layer.mask[rows]
        mag, bound = w.abs(), limit
        if w.dtype != torch.float64:  # float32 compares exactly when the threshold is a float32 value
            exact32 = float(limit.to(torch.float32)) == threshold
            mag, bound = (mag.to(torch.float32), limit.to(torch.float32)) if exact32 else (mag.to(torch.float64), limit)
        keep = mag >= bound
        if ties_to_prune > 0:
            tie_idx = (mask & (mag == bound)).view(-1).nonzero().flatten()[:ties_to_prune]
            keep.view(-1)[tie_idx] = False
            ties_to_prune -= tie_idx.numel()
        drop = mask & ~keep
        mask &= keep  # views: edit the layer in place
        w.masked_fill_(drop, 0)
    return before - count_true(layer.mask), ties_to_prune


def prune_to_budget(layers: list[Layer], budget: int, origins: list[Origin] | None = None) -> list[int]:
    """Remove the globally smallest |w| among existing weights until exactly `budget` remain.

    Ties are broken deterministically: earlier layer first, then row-major position.
    `origins` (one per layer, optional) let the threshold be selected on source-sized tensors.
    Returns the number pruned per layer. Mutates the layers' masks and weights in place.
    """
    excess = sum(count_true(layer.mask) for layer in layers) - budget
    if excess <= 0:
        return [0] * len(layers)
    threshold, below = _select_threshold(origins or [Origin.of(layer) for layer in layers], excess)
    ties_to_prune = excess - below
    pruned = []
    for layer in layers:
        count, ties_to_prune = _prune_layer(layer, threshold, ties_to_prune)
        pruned.append(count)
    return pruned


def _ensure_masks(mlp: MLP, fresh: set[int]) -> MLP:
    """A copy with explicit masks whose tensors pruning may edit in place.

    Layers in `fresh` are about to be replaced by new tensors (split or copied), so only the others
    are cloned.
    """
    out = mlp.copy()
    for i, layer in enumerate(out.layers):
        # lineage is relative to the file being expanded: re-expanding an expanded file leaves the layers it
        # does not split without lineage (they keep its masks), and split layers get theirs from split_rows
        layer.parents = None
        if layer.mask is None:
            layer.mask = layer.weight != 0
        elif i not in fresh:
            layer.mask = layer.mask.clone()
        if i not in fresh:
            layer.weight = layer.weight.clone()
    return out


def expand_mlp(mlp: MLP, targets: list[Target], *, seed: int = 0, outgoing: str = "copy",
               plan: SplitPlan | None = None, inputs: PlanInputs | None = None, prune: bool = True) -> ExpandResult:
    """Expand every target hidden layer in order, then prune globally back to the source budget."""
    if len(mlp.layers) < 2:
        raise FPEError("the model has no hidden layer to expand (a single linear layer)")
    _check_targets(mlp, targets)
    if any(layer.tied is not None for layer in mlp.layers):
        raise FPEError("the model already has tied columns (expanded with --outgoing tie); expanding it again "
                       "is not supported", "expand the dense source instead")
    inputs = inputs or PlanInputs()
    before = [layer.active_weights() for layer in mlp.layers]
    budget = sum(before)
    work = _ensure_masks(mlp, {t.index for t in targets} | {t.index + 1 for t in targets})
    generator = split_generator(seed)
    plans = []
    origins = [Origin.of(layer) for layer in work.layers]
    for target in sorted(targets, key=lambda t: t.index):
        layer_plan = _plan_for(work, target, plan, generator, inputs, scored=mlp.layers[target.index])
        plans.append(layer_plan)
        work.layers[target.index] = split_rows(work.layers[target.index], layer_plan)  # the origin is unchanged
        counts = layer_plan.alpha if layer_plan.children is None else layer_plan.children
        consumer = work.layers[target.index + 1]
        copies = torch.full((consumer.in_features,), counts, dtype=torch.int64) if isinstance(counts, int) else counts
        origins[target.index + 1] = Origin(outgoing_values(consumer.weight, counts, outgoing), consumer.support(), copies)
        work.layers[target.index + 1] = copy_columns(consumer, counts, outgoing)
    # tied copies are one parameter each: the budget holds without pruning
    prune = prune and outgoing != "tie"
    pruned = prune_to_budget(work.layers, budget, origins) if prune else [0] * len(work.layers)
    after = [layer.active_weights() for layer in work.layers]
    dead = [empty_rows(layer.mask) for layer in work.layers]
    return ExpandResult(work, SplitPlan(plans, seed), budget, before, after, pruned, dead)


def split_generator(seed: int) -> torch.Generator:
    """The split's random stream, derived from the seed by hashing.

    Seeding it with `seed` directly would replay the stream that `torch.manual_seed(seed)` gave
    nn.Linear's initialisation, so random splits could line up with the weights' values.
    """
    digest = hashlib.sha256(f"fpe.split:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _check_targets(mlp: MLP, targets: list[Target]) -> None:
    if not targets:
        raise FPEError("no layer selected for expansion", "check --targets/--ignore or the recipe")
    hidden = len(mlp.layers) - 1
    for t in targets:
        if not 0 <= t.index < hidden:
            raise FPEError(f"layer {t.index} is not a hidden layer (the model has {hidden})")
    if len({t.index for t in targets}) != len(targets):
        raise FPEError("a layer is targeted twice")


def layer_inputs(work: MLP, index: int, x: torch.Tensor) -> torch.Tensor:
    """Inputs that layer `index` of the (partly expanded) network sees for model inputs x: (N, d_index)."""
    return x if index == 0 else hidden_activations(MLP(work.layers[: index + 1], work.activation), x)[index - 1]


def _plan_for(work: MLP, target: Target, plan: SplitPlan | None, generator: torch.Generator,
              inputs: PlanInputs, scored: Layer) -> LayerPlan:
    """The plan of one target. `scored` is the layer as the input file holds it: --expand-top ranks its rows
    (as `fpe analyze` does), not the rows whose columns an earlier target has already copied."""
    producer = work.layers[target.index]
    support = producer.support()
    if plan is None:
        if target.split == "clause" and target.index != 0:
            raise FPEError(f"{producer.weight_key}: a clause split needs input features; only the first layer has them",
                           "split deeper layers with random, structured or gram (recipe per target)")
        calib = layer_inputs(work, target.index, inputs.calibration) if (
            target.split == "activation" and inputs.calibration is not None) else None
        weight, tied = producer.weight, producer.tied
        if tied is not None:  # tied input columns are one edge each: plan on the parents' columns
            first = first_of_groups(tied)
            weight, support = weight[:, first], support[:, first]
            calib = sibling_sum(calib, tied) if calib is not None else None
        layer_plan = plan_layer(weight, support, target.alpha, target.split, key=producer.weight_key,
                                generator=generator, groups=inputs.groups, clusters=inputs.clusters,
                                group_size=inputs.group_size, inputs=calib, top=target.top,
                                score=scored.weight * scored.support() if target.top is not None else None)
        if tied is not None:
            layer_plan.child = layer_plan.child[:, tied]  # each copy goes to the child owning its parent column
        return layer_plan
    layer_plan = plan.for_key(producer.weight_key)
    if layer_plan is None:
        raise FPEError(f"the plan has no entry for {producer.weight_key}",
                       f"it covers: {', '.join(p.weight_key for p in plan.layers) or 'nothing'}")
    if layer_plan.alpha != target.alpha:
        raise FPEError(f"the plan splits {producer.weight_key} with alpha {layer_plan.alpha}, but alpha {target.alpha} "
                       "was asked for", f"pass --alpha {layer_plan.alpha} (or the recipe's alpha) to apply this plan")
    problems = validate_layer_plan(layer_plan, support)
    if not problems and producer.tied is not None:
        child = layer_plan.child.to(torch.int64)
        if not torch.equal(child, child[:, first_of_groups(producer.tied)][:, producer.tied]):
            problems.append(f"{producer.weight_key}: the plan gives copies of one tied column to different children")
    if problems:
        raise FPEError("the plan does not match the model: " + "; ".join(problems))
    return layer_plan


def function_drift(dense: MLP, expanded: MLP, x: torch.Tensor) -> dict[str, float]:
    """How far the expanded model's outputs move from the dense model's on probe inputs x (N, d)."""
    y0 = forward(dense, x)  # (N, C)
    y1 = forward(expanded, x, apply_masks=False)  # expansion leaves exact zeros off the mask
    diff = (y1 - y0).norm()
    return {
        "probe_samples": int(x.shape[0]),
        "relative_l2": float(diff / y0.norm().clamp(min=1e-12)),
        "max_abs_diff": float((y1 - y0).abs().max()) if y0.numel() else 0.0,
        "cosine": float(torch.nn.functional.cosine_similarity(y0.flatten(), y1.flatten(), dim=0)),
        # an exact fraction k / N (a float32 mean would print 30/37 as 0.81081080436...)
        "argmax_agreement": int((y0.argmax(1) == y1.argmax(1)).sum()) / y0.shape[0] if y0.shape[1] > 1 else float("nan"),
    }
