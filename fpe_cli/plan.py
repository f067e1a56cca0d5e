"""Split plans: which child of each parent owns each of the parent's input edges (pure tensors).

A layer's plan is an int tensor `child` of the producer weight's shape (h, d): child[i, j] in
[0, alpha) is the child of parent i that owns edge (i, j); -1 where parent i has no edge j.
Edge-disjointness holds by construction (one owner per edge); validation checks coverage and
that no child is empty.

Strategies (all deterministic given the seed):
- random:     a fresh random permutation of each parent's edges, cut into alpha near-equal parts.
- structured: the k-th edge of each parent (in input order) goes to child k mod alpha; for a dense
              parent that is input index mod alpha, the same pattern for every parent.
- clause:     whole input groups (a user's clause map) dealt to children, balanced per parent.
- gram:       input features clustered by |cosine| of W's columns (the Gram matrix W^T W
              normalized), then whole clusters dealt to children like clause groups.
- activation: (ours) per parent, the edges' contributions w_ij * x_j on calibration samples where
              the parent is active are clustered by |correlation| (co-active inputs stay together),
              then dealt like clause groups. Needs calibration inputs (`--data`).
Selective expansion (ours): `children[i]` = 1 leaves parent i whole (its one child owns every
edge); only the `top` most polysemantic parents get alpha children.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .analysis import polysemanticity
from .errors import FPEError
from .model import true_per_row

STRATEGIES = ("random", "structured", "clause", "gram", "activation")
ROW_CHUNK = 1024  # rows planned at a time (bounded memory; fixed so results never depend on it)


@dataclass
class LayerPlan:
    weight_key: str
    alpha: int
    split: str
    child: torch.Tensor  # int16 (h, d): owner child of each edge, -1 off the parent's support
    children: torch.Tensor | None = None  # int64 (h,): children per parent (1 or alpha); None = alpha for all

    def child_counts(self) -> torch.Tensor:
        h = self.child.shape[0]
        return self.children if self.children is not None else torch.full((h,), self.alpha, dtype=torch.int64)


@dataclass
class SplitPlan:
    layers: list[LayerPlan]
    seed: int = 0
    settings: dict | None = None  # what shaped the split (split, clusters, group_size, expand_top): recorded with it

    def for_key(self, key: str) -> LayerPlan | None:
        return next((p for p in self.layers if p.weight_key == key), None)


def check_alpha_value(alpha: int) -> None:
    """alpha must be an integer in 2..32767 (plans store child indices as int16)."""
    if not isinstance(alpha, int) or isinstance(alpha, bool) or alpha < 2:
        raise FPEError(f"alpha must be an integer >= 2, got {alpha!r}")
    if alpha > 32767:
        raise FPEError(f"alpha {alpha} is too large")


def check_alpha(alpha: int, support: torch.Tensor, key: str) -> None:
    """alpha must be a valid value and no parent may have fewer edges than alpha."""
    check_alpha_value(alpha)
    counts = true_per_row(support)
    short = (counts < alpha).nonzero().flatten()
    if short.numel():
        i = int(short[0])
        raise FPEError(
            f"{key}: alpha {alpha} is larger than parent {i}'s {int(counts[i])} edges "
            f"({short.numel()} parent(s) affected), which would leave a child empty",
            "expand only the neurons that have enough edges with --expand-top N, lower --alpha, "
            "or leave this layer out with --ignore",
        )


def _owner_by_place(n: torch.Tensor, d: int, alpha: int) -> torch.Tensor:
    """int16 (r, d): the child owning the edge at each place of a row's random order (place * alpha // n), -1
    past the row's n edges; rows with the same n share one computed row."""
    position = torch.arange(d).unsqueeze(0)  # (1, d)
    values, inverse = torch.unique(n, return_inverse=True)  # at most r distinct counts
    counts = values.unsqueeze(1)  # (u, 1)
    rows = torch.where(position < counts, position * alpha // counts.clamp(min=1), -1)  # (u, d)
    return rows.to(torch.int16)[inverse]


def _rank_within_rows(keys: torch.Tensor) -> torch.Tensor:
    """rank[i, j] = position of keys[i, j] (non-negative floats) in row i sorted ascending (stable)."""
    order = stable_row_order(keys)  # (rows, d)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(keys.shape[1]).expand_as(order).contiguous())
    return rank


def stable_row_order(keys: torch.Tensor) -> torch.Tensor:
    """(r, d) float32 keys >= +0.0 -> int64 (r, d): each row's stable ascending argsort.

    Such floats order like their int32 bit patterns (< 2**31; -0.0 would not), so the key bits shifted
    left with the column index in the low bits are distinct integers that order exactly like (key,
    column): an unstable sort of them gives the stable argsort, and the index is read back from the low
    bits. numpy's integer sort (SIMD where the CPU has it) is about 10x faster than torch's stable argsort.
    """
    if keys.dtype != torch.float32:
        raise TypeError(f"stable_row_order sorts float32 keys, got {keys.dtype}")
    d = keys.shape[1]
    shift = max(1, (d - 1).bit_length())
    combined = keys.contiguous().view(torch.int32).numpy().astype(np.int64)  # the one (r, d) int64 buffer
    combined <<= shift
    combined |= np.arange(d, dtype=np.int64)
    combined.sort(axis=1)
    combined &= (1 << shift) - 1
    return torch.from_numpy(combined)


def plan_random(support: torch.Tensor, alpha: int, generator: torch.Generator) -> torch.Tensor:
    """Random permutation of each parent's edges cut into alpha parts of sizes differing by <= 1."""
    h, d = support.shape
    child = torch.full((h, d), -1, dtype=torch.int16)
    for start in range(0, h, ROW_CHUNK):
        sup = support[start:start + ROW_CHUNK]  # (r, d)
        keys = torch.rand(sup.shape, generator=generator)
        keys[~sup] = 2.0  # non-edges sort last
        order = stable_row_order(keys)  # (r, d): edges in random order (ties by column), then non-edges
        owner = _owner_by_place(true_per_row(sup), d, alpha)  # (r, d) by place
        child[start:start + ROW_CHUNK].scatter_(1, order, owner)
    return child


def plan_random_grouped(support: torch.Tensor, alpha: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """One random balanced partition of the inputs per group of `group_size` consecutive parents.

    Parents of a group share which inputs each child sees, so an expanded layer can run as a
    gather plus a batched matmul (fpe_cli.layers.FPELinear) instead of a masked dense matmul.
    """
    h, d = support.shape
    if group_size < 1:
        raise FPEError(f"--group-size must be >= 1, got {group_size}")
    child = torch.full((h, d), -1, dtype=torch.int16)
    for start in range(0, h, group_size):
        rank = _rank_within_rows(torch.rand(1, d, generator=generator))[0]  # a random permutation of inputs
        owner = (rank * alpha) // d  # (d,): child of each input in this group
        sup = support[start:start + group_size]
        child[start:start + group_size] = torch.where(sup, owner, -1).to(torch.int16)
    return child


def _check_no_empty_child(child: torch.Tensor, alpha: int, key: str, rows: torch.Tensor | None = None) -> None:
    """Every child of the parents in `rows` (bool (h,); None = all) owns an edge."""
    per_child = torch.zeros(child.shape[0], alpha, dtype=torch.int64)
    c = child.to(torch.int64)
    per_child.scatter_add_(1, c.clamp(min=0), (c >= 0).to(torch.int64))
    short = (per_child == 0).any(dim=1)
    empty = (short if rows is None else short & rows).nonzero().flatten()
    if empty.numel():
        raise FPEError(f"{key}: the shared split leaves a child of parent {int(empty[0])} without edges "
                       f"({empty.numel()} parent(s))", "use --split random without --group-size for sparse layers")


def plan_structured(support: torch.Tensor, alpha: int) -> torch.Tensor:
    rank = torch.cumsum(support.to(torch.int64), dim=1) - 1  # k-th edge of the row
    return torch.where(support, rank % alpha, -1).to(torch.int16)


def _deal_groups_row(sup_row: torch.Tensor, group: torch.Tensor, n_groups: int, alpha: int,
                     generator: torch.Generator) -> torch.Tensor:
    """Deal whole groups of one parent's edges to the least-loaded child (largest groups first)."""
    g = group[sup_row]  # group id of each edge
    sizes = torch.bincount(g, minlength=n_groups)
    tie = torch.rand(n_groups, generator=generator)
    order = sorted(range(n_groups), key=lambda k: (-int(sizes[k]), float(tie[k])))
    load = [0] * alpha
    owner_of_group = torch.zeros(n_groups, dtype=torch.int64)
    for k in order:
        if sizes[k] == 0:
            continue
        target = min(range(alpha), key=lambda c: (load[c], c))
        owner_of_group[k] = target
        load[target] += int(sizes[k])
    owner = owner_of_group[g]
    return _fill_empty_children(owner, alpha)


def _fill_empty_children(owner: torch.Tensor, alpha: int) -> torch.Tensor:
    """If fewer groups than children, move single edges from the largest child to empty ones."""
    counts = torch.bincount(owner, minlength=alpha)
    for c in range(alpha):
        if counts[c] == 0:
            donor = int(torch.argmax(counts))
            if counts[donor] <= 1:  # fewer edges than children: only a parent that selective expansion keeps whole
                break
            idx = int((owner == donor).nonzero()[-1])
            owner[idx] = c
            counts[donor] -= 1
            counts[c] += 1
    return owner


def plan_groups(support: torch.Tensor, alpha: int, groups: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Group-aligned split: `groups` (d,) int64 gives each input's group; -1 = its own group."""
    h, d = support.shape
    group = groups.clone()
    loose = group < 0
    group[loose] = torch.arange(int(loose.sum())) + (int(group.max()) + 1 if (~loose).any() else 0)
    _, group = torch.unique(group, return_inverse=True)  # dense ids 0..G-1
    n_groups = int(group.max()) + 1
    child = torch.full((h, d), -1, dtype=torch.int16)
    for i in range(h):
        row = support[i]
        child[i, row] = _deal_groups_row(row, group, n_groups, alpha, generator).to(torch.int16)
    return child


def gram_clusters(weight: torch.Tensor, n_clusters: int, generator: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Cluster the columns of W by |cosine| (sign-invariant spherical k-means); returns (d,) ids."""
    x = weight.detach().to(torch.float32).T  # (d, h): one row per input feature
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    d = x.shape[0]
    k = max(1, min(n_clusters, d))
    centers = x[torch.randperm(d, generator=generator)[:k]].clone()  # (k, h)
    assign = torch.zeros(d, dtype=torch.int64)
    for _ in range(iters):
        sim = x @ centers.T  # (d, k)
        new_assign = sim.abs().argmax(dim=1)
        if _ and torch.equal(new_assign, assign):
            break
        assign = new_assign
        signs = torch.sign(sim.gather(1, assign[:, None])).clamp(min=0) * 2 - 1  # (d, 1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x * signs)
        norms = sums.norm(dim=1, keepdim=True)
        centers = torch.where(norms > 0, sums / norms.clamp(min=1e-12), centers)
    return assign


def top_parents(weight: torch.Tensor, support: torch.Tensor, top: float, alpha: int = 1,
                score: torch.Tensor | None = None) -> torch.Tensor:
    """bool (h,): the `top` most polysemantic parents (a count >= 1, or a fraction in (0, 1)).

    Parents with fewer than `alpha` edges (dead or pruned neurons) cannot be split and are never chosen.
    `score` (h, any): the rows to rank, when they differ from the weight's (a layer whose input columns an
    earlier expansion copied is ranked on its rows before that); default weight * support.
    """
    h = weight.shape[0]
    k = int(top) if top >= 1 else max(1, round(top * h))
    if k < 1 or k > h:
        raise FPEError(f"--expand-top {top:g} selects {k} of {h} neurons", f"give a count in 1..{h} or a fraction in (0, 1)")
    splittable = support.sum(dim=1) >= alpha
    if k > int(splittable.sum()):
        raise FPEError(f"--expand-top {top:g} selects {k} neurons, but only {int(splittable.sum())} of {h} have at "
                       f"least alpha={alpha} input edges", f"select at most {int(splittable.sum())} neurons")
    rows = weight * support if score is None else score
    score = polysemanticity(rows).nan_to_num(1.0)  # the score `fpe analyze` reports; empty row -> 1
    score = torch.where(splittable, score, -math.inf)
    chosen = torch.zeros(h, dtype=torch.bool)
    chosen[torch.argsort(score, descending=True, stable=True)[:k]] = True
    return chosen


def plan_activation(weight: torch.Tensor, support: torch.Tensor, alpha: int, inputs: torch.Tensor,
                    clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Per parent: cluster edges by |correlation| of their contributions where the parent fires, deal clusters."""
    h, d = support.shape
    x = inputs.to(torch.float32)  # (N, d)
    pre = x @ (weight.to(torch.float32) * support).T  # (N, h)
    child = torch.full((h, d), -1, dtype=torch.int16)
    for i in range(h):
        row = support[i]
        active = pre[:, i] > pre[:, i].median()  # the samples where this parent responds most
        contrib = x[active][:, row] * weight[i, row].to(torch.float32)  # (A, n_i)
        if contrib.shape[0] < 2:
            child[i] = plan_random(row[None], alpha, generator)[0]
            continue
        ids = gram_clusters(contrib - contrib.mean(dim=0), clusters, generator)  # (n_i,) cluster of each edge
        group = torch.full((d,), -1, dtype=torch.int64)
        group[row] = ids
        child[i, row] = _deal_groups_row(row, group.clamp(min=0), int(ids.max()) + 1, alpha, generator).to(torch.int16)
    return child


def plan_layer(weight: torch.Tensor, support: torch.Tensor, alpha: int, split: str, *, key: str,
               generator: torch.Generator, groups: torch.Tensor | None = None,
               clusters: int | None = None, group_size: int | None = None,
               inputs: torch.Tensor | None = None, top: float | None = None,
               score: torch.Tensor | None = None) -> LayerPlan:
    """Plan one producer layer with the named strategy (optionally only for the top parents, ranked on `score`'s
    rows when given; see top_parents)."""
    if top is None:
        check_alpha(alpha, support, key)
        chosen = None
    else:  # only the chosen parents are split, and top_parents never picks one with fewer than alpha edges
        check_alpha_value(alpha)
        chosen = top_parents(weight, support, top, alpha, score)
    plan = _plan_all(weight, support, alpha, split, key=key, generator=generator, groups=groups,
                     clusters=clusters, group_size=group_size, inputs=inputs)
    if chosen is not None:
        plan.child[~chosen] = torch.where(support[~chosen], 0, -1).to(torch.int16)  # one child owns every edge
        plan.children = torch.where(chosen, alpha, 1).to(torch.int64)
    if split == "random" and group_size:
        _check_no_empty_child(plan.child, alpha, key, chosen)
    return plan


def _plan_all(weight: torch.Tensor, support: torch.Tensor, alpha: int, split: str, *, key: str,
              generator: torch.Generator, groups: torch.Tensor | None, clusters: int | None,
              group_size: int | None, inputs: torch.Tensor | None) -> LayerPlan:
    if split == "random" and group_size:
        child = plan_random_grouped(support, alpha, group_size, generator)  # empty children: checked by plan_layer
    elif split == "random":
        child = plan_random(support, alpha, generator)
    elif split == "structured":
        child = plan_structured(support, alpha)
    elif split == "clause":
        if groups is None:
            raise FPEError("--split clause needs a clause map", "pass --clause-map clauses.json")
        if groups.numel() != support.shape[1]:
            raise FPEError(
                f"{key}: the clause map covers {groups.numel()} inputs but the layer has {support.shape[1]}",
                "clause splits apply to the first layer; use a recipe to split deeper layers another way",
            )
        child = plan_groups(support, alpha, groups, generator)
    elif split in ("gram", "activation") and clusters is not None and clusters < alpha:
        raise FPEError(f"{key}: clusters={clusters} (--clusters or the recipe) is fewer than alpha {alpha}: the {split} "
                       f"split deals whole clusters to the {alpha} children, so it needs at least {alpha}",
                       f"set clusters to {alpha} or more, or leave it out (default {4 * alpha if split == 'gram' else 2 * alpha})")
    elif split == "gram":
        ids = gram_clusters(weight * support, clusters or 4 * alpha, generator)
        child = plan_groups(support, alpha, ids, generator)
    elif split == "activation":
        if inputs is None:
            raise FPEError("--split activation needs calibration inputs", "pass --data (a data set or .npz)")
        child = plan_activation(weight, support, alpha, inputs, clusters or 2 * alpha, generator)
    else:
        raise FPEError(f"unknown split {split!r}", f"choose one of: {', '.join(STRATEGIES)}")
    return LayerPlan(key, alpha, split, child)


def validate_layer_plan(plan: LayerPlan, support: torch.Tensor) -> list[str]:
    """Every problem of a plan against the layer it is applied to (empty = valid)."""
    key, child = plan.weight_key, plan.child
    if tuple(child.shape) != tuple(support.shape):
        return [f"{key}: plan shape {tuple(child.shape)} does not match the weight {tuple(support.shape)}"]
    problems = []
    if plan.alpha < 2:
        problems.append(f"{key}: plan alpha {plan.alpha} < 2")
    if plan.alpha > child.shape[1]:  # also keeps the (h, alpha) count below bounded by the weight's size
        return problems + [f"{key}: plan alpha {plan.alpha} is larger than a parent's {child.shape[1]} possible edges"]
    c = child.to(torch.int64)
    if bool(((c < -1) | (c >= plan.alpha)).any()):
        problems.append(f"{key}: plan has child indices outside [-1, {plan.alpha})")
    if bool((support & (c < 0)).any()):
        problems.append(f"{key}: plan leaves {int((support & (c < 0)).sum())} edge(s) of the parents unassigned")
    if bool((~support & (c >= 0)).any()):
        problems.append(f"{key}: plan assigns {int((~support & (c >= 0)).sum())} entries that are not edges of the parent")
    counts = plan.child_counts()
    if tuple(counts.shape) != (c.shape[0],) or bool(((counts < 1) | (counts > plan.alpha)).any()):
        problems.append(f"{key}: plan child counts must be 1..{plan.alpha} per parent")
    elif bool((c >= counts[:, None]).any()):
        problems.append(f"{key}: plan assigns edges to children a parent does not have")
    if not problems:
        per_child = torch.zeros(c.shape[0], plan.alpha, dtype=torch.int64)
        per_child.scatter_add_(1, c.clamp(min=0), support.to(torch.int64))
        exists = torch.arange(plan.alpha)[None, :] < counts[:, None]  # (h, alpha)
        exists &= (counts[:, None] > 1) | support.any(dim=1)[:, None]  # a dead parent kept whole has one empty child
        empty = int(((per_child == 0) & exists).sum())
        if empty:
            problems.append(f"{key}: plan leaves {empty} child(ren) without edges")
    return problems
