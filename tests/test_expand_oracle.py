"""Expansion against a plain reference written here (python loops), and hypothesis properties.

The oracle rebuilds W', b', masks and lineage from the source and the split plan edge by edge, and
performs the budget pruning by sorting (|w|, layer, flat index) tuples: the documented rule.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fpe_cli.checkpoint import load_checkpoint, save_checkpoint
from fpe_cli.errors import FPEError
from fpe_cli.expand import Target, copy_columns, expand_mlp, prune_to_budget, split_rows, PlanInputs
from fpe_cli.model import MLP, Layer, forward
from fpe_cli.plan import LayerPlan, plan_layer, plan_random, stable_row_order, validate_layer_plan
from fpe_cli.verify import check_invariants

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- building blocks


def random_mlp(widths, *, dtype=torch.float32, seed=0, bias=True, zero_frac=0.0, alpha=2) -> MLP:
    """A dense MLP with optional exact zeros (each row keeps at least `alpha` non-zeros)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for k, (d, h) in enumerate(zip(widths, widths[1:])):
        w = torch.randn(h, d, generator=g)
        if zero_frac:
            keep = torch.rand(h, d, generator=g) >= zero_frac
            for i in range(h):  # keep at least alpha edges per row
                idx = torch.randperm(d, generator=g)[:alpha]
                keep[i, idx] = True
            w = w * keep
        b = torch.randn(h, generator=g) if bias else None
        layers.append(Layer(f"{2 * k}.weight", w.to(dtype), f"{2 * k}.bias" if bias else None,
                            b.to(dtype) if bias else None))
    return MLP(layers, "relu")


def oracle_expand(src: MLP, plans: dict[int, LayerPlan], outgoing: str = "copy"):
    """Unpruned expansion by hand. Returns per layer (weights as nested lists, masks, biases, parents).

    Values are kept as 0-d tensors of the source dtype so `outgoing=split` divides exactly as torch does.
    """
    layers = []
    for layer in src.layers:
        w = [[layer.weight[i, j] for j in range(layer.in_features)] for i in range(layer.out_features)]
        m = [[bool(layer.weight[i, j] != 0) for j in range(layer.in_features)] for i in range(layer.out_features)]
        b = [layer.bias[i] for i in range(layer.out_features)] if layer.bias is not None else None
        layers.append({"w": w, "m": m, "b": b, "parents": None})
    for k in sorted(plans):
        plan, prod, cons = plans[k], layers[k], layers[k + 1]
        alpha = plan.alpha
        h, d = len(prod["w"]), len(prod["w"][0])
        zero = torch.zeros((), dtype=src.layers[k].weight.dtype)
        new_w, new_m, new_b, parents = [], [], [], []
        for i in range(h):  # parent
            for c in range(alpha):  # child c of parent i is row alpha*i + c
                row_w, row_m = [], []
                for j in range(d):  # edge
                    owned = int(plan.child[i, j]) == c
                    row_w.append(prod["w"][i][j] if owned else zero)
                    row_m.append(owned)
                    if owned:
                        assert prod["m"][i][j], "a plan may only assign existing edges"
                new_w.append(row_w)
                new_m.append(row_m)
                parents.append(i)
                if prod["b"] is not None:
                    new_b.append(prod["b"][i])
        layers[k] = {"w": new_w, "m": new_m, "b": new_b if prod["b"] is not None else None, "parents": parents}
        cw, cm = [], []
        for o in range(len(cons["w"])):
            row_w, row_m = [], []
            for i in range(h):
                for _c in range(alpha):
                    v = cons["w"][o][i]
                    row_w.append(v / alpha if outgoing == "split" else v)
                    row_m.append(cons["m"][o][i])
            cw.append(row_w)
            cm.append(row_m)
        layers[k + 1] = dict(cons, w=cw, m=cm)
    return layers


def oracle_prune(layers, budget: int):
    """Global magnitude pruning by sorting every existing weight as (|w|, layer, flat index)."""
    entries = []
    for li, layer in enumerate(layers):
        cols = len(layer["m"][0])
        for r, row in enumerate(layer["m"]):
            for c, exists in enumerate(row):
                if exists:
                    entries.append((abs(float(layer["w"][r][c])), li, r * cols + c))
    entries.sort()
    for _, li, flat in entries[: max(0, len(entries) - budget)]:
        cols = len(layers[li]["m"][0])
        r, c = divmod(flat, cols)
        layers[li]["m"][r][c] = False
        layers[li]["w"][r][c] = torch.zeros((), dtype=layers[li]["w"][r][c].dtype)
    return layers


def assert_matches_oracle(got: MLP, want, dtype) -> None:
    for layer, ref in zip(got.layers, want):
        assert layer.weight.dtype == dtype
        assert layer.mask.tolist() == ref["m"]
        ref_w = torch.stack([torch.stack(row) for row in ref["w"]]).to(dtype)
        assert torch.equal(layer.weight.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           ref_w.view(torch.int16 if dtype != torch.float32 else torch.int32)), "weights differ bitwise"
        if ref["b"] is None:
            assert layer.bias is None
        else:
            assert torch.equal(layer.bias, torch.stack(ref["b"]))
        if ref["parents"] is None:
            assert layer.parents is None
        else:
            assert layer.parents.tolist() == ref["parents"]


def masked_reference_forward(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """Masked dense matmul, written out: h <- relu(h @ (W * M)^T + b)."""
    h = x.to(torch.float64)
    for k, layer in enumerate(mlp.layers):
        w = layer.weight.to(torch.float64) * layer.mask.to(torch.float64)
        h = h @ w.T
        if layer.bias is not None:
            h = h + layer.bias.to(torch.float64)
        if k < len(mlp.layers) - 1:
            h = torch.clamp(h, min=0)
    return h


def plan_edges_ok(plan: LayerPlan, support: torch.Tensor) -> None:
    """Coverage, only-edges, range and non-empty children, checked by loops over parents."""
    h, d = support.shape
    for i in range(h):
        sizes = [0] * plan.alpha
        for j in range(d):
            c = int(plan.child[i, j])
            if bool(support[i, j]):
                assert 0 <= c < plan.alpha, f"edge ({i},{j}) has no owner"
                sizes[c] += 1
            else:
                assert c == -1, f"non-edge ({i},{j}) assigned to child {c}"
        assert min(sizes) >= 1, f"parent {i} has an empty child: {sizes}"
        if plan.split in ("random", "structured"):
            assert max(sizes) - min(sizes) <= 1, f"parent {i} unbalanced: {sizes}"


# ---------------------------------------------------------------- fixed oracle tests


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("outgoing", ["copy", "split"])
def test_one_hidden_layer_matches_oracle(dtype, outgoing):
    src = random_mlp([7, 5, 3], dtype=dtype, seed=3, zero_frac=0.2, alpha=3)
    res = expand_mlp(src, [Target(0, 3, "random")], seed=11, outgoing=outgoing)
    want = oracle_prune(oracle_expand(src, {0: res.plan.layers[0]}, outgoing), src.weight_budget())
    assert_matches_oracle(res.mlp, want, dtype)
    assert res.budget == src.weight_budget() == sum(res.after)


@pytest.mark.parametrize("split", ["random", "structured", "gram"])
def test_three_hidden_layers_match_oracle(split):
    src = random_mlp([6, 5, 4, 4, 3], seed=5)
    targets = [Target(0, 2, split), Target(1, 3, split), Target(2, 2, split)]
    res = expand_mlp(src, targets, seed=2)
    plans = {k: res.plan.layers[n] for n, k in enumerate([0, 1, 2])}
    assert_matches_oracle(res.mlp, oracle_prune(oracle_expand(src, plans), src.weight_budget()), torch.float32)
    # the later layers were split on their already widened inputs
    assert res.plan.layers[1].child.shape == (4, 10) and res.plan.layers[2].child.shape == (4, 12)


def test_only_some_layers_targeted_matches_oracle():
    src = random_mlp([6, 5, 4, 4, 3], seed=8)
    res = expand_mlp(src, [Target(1, 2, "random")], seed=4)
    assert res.mlp.widths == [6, 5, 8, 4, 3]
    want = oracle_prune(oracle_expand(src, {1: res.plan.layers[0]}), src.weight_budget())
    assert_matches_oracle(res.mlp, want, torch.float32)


def test_split_rows_and_copy_columns_match_oracle():
    src = random_mlp([6, 4, 3], seed=1, zero_frac=0.3, alpha=2)
    gen = torch.Generator().manual_seed(0)
    w1 = src.layers[0]
    w1.mask = w1.weight != 0
    src.layers[1].mask = src.layers[1].weight != 0
    plan = plan_layer(w1.weight, w1.mask, 2, "random", key=w1.weight_key, generator=gen)
    want = oracle_expand(random_mlp([6, 4, 3], seed=1, zero_frac=0.3, alpha=2), {0: plan})
    rows = split_rows(w1, plan)
    cols = copy_columns(src.layers[1], 2, "copy")
    assert rows.mask.tolist() == want[0]["m"]
    assert rows.weight.tolist() == [[float(v) for v in r] for r in want[0]["w"]]
    assert rows.bias.tolist() == [float(v) for v in want[0]["b"]]
    assert rows.parents.tolist() == want[0]["parents"]
    assert cols.mask.tolist() == want[1]["m"]
    assert cols.weight.tolist() == [[float(v) for v in r] for r in want[1]["w"]]
    # before pruning: siblings disjoint and their union is exactly the parent's edges
    for i in range(w1.out_features):
        union = torch.zeros(w1.in_features, dtype=torch.int64)
        for c in range(2):
            union += rows.mask[2 * i + c].to(torch.int64)
        assert union.tolist() == w1.mask[i].to(torch.int64).tolist()


def test_prune_ties_earlier_layer_then_row_major():
    """Equal magnitudes everywhere: the rule must drop the first entries of the first layer."""
    l1 = Layer("a.weight", torch.ones(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    l2 = Layer("b.weight", -torch.ones(2, 2), mask=torch.ones(2, 2, dtype=torch.bool))
    pruned = prune_to_budget([l1, l2], budget=5)
    assert pruned == [5, 0]
    assert l1.mask.flatten().tolist() == [False] * 5 + [True]
    l1 = Layer("a.weight", torch.ones(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    l2 = Layer("b.weight", torch.full((2, 2), 0.5), mask=torch.ones(2, 2, dtype=torch.bool))
    assert prune_to_budget([l1, l2], budget=7) == [0, 3]  # smaller magnitudes go first, row-major
    assert l2.mask.flatten().tolist() == [False, False, False, True]
    l1 = Layer("a.weight", torch.ones(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    l2 = Layer("b.weight", torch.full((2, 2), 0.5), mask=torch.ones(2, 2, dtype=torch.bool))
    assert prune_to_budget([l1, l2], budget=5) == [1, 4]
    assert l1.mask.flatten().tolist() == [False, True, True, True, True, True]
    assert not l2.mask.any() and float(l2.weight.abs().sum()) == 0


def test_prune_matches_sorting_oracle_with_many_ties():
    g = torch.Generator().manual_seed(0)
    layers = [Layer(f"{k}.weight", (torch.randint(-3, 4, (5, 6), generator=g) / 2).to(torch.float16)) for k in range(3)]
    for layer in layers:
        layer.mask = layer.weight != 0
    ref = [{"w": [[layer.weight[i, j] for j in range(6)] for i in range(5)], "m": layer.mask.tolist()} for layer in layers]
    budget = sum(int(layer.mask.sum()) for layer in layers) - 17
    prune_to_budget(layers, budget)
    oracle_prune(ref, budget)
    for layer, want in zip(layers, ref):
        assert layer.mask.tolist() == want["m"]
        assert layer.weight.tolist() == [[float(v) for v in row] for row in want["w"]]


@pytest.mark.parametrize("coarse", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_matches_sorting_oracle_on_larger_layers(dtype, coarse):
    """Thousands of weights (selection code paths differ from tiny arrays); coarse values give many ties."""
    g = torch.Generator().manual_seed(1)
    shapes = [(40, 50), (30, 80), (10, 30)]
    values = [torch.randn(s, generator=g) for s in shapes]
    layers = [Layer(f"{k}.weight", (v.mul(4).round().div(4) if coarse else v).to(dtype)) for k, v in enumerate(values)]
    for layer in layers:
        layer.mask = layer.weight != 0
    flat = [(layer.weight.flatten().tolist(), layer.mask.flatten().tolist()) for layer in layers]
    total = sum(int(layer.mask.sum()) for layer in layers)
    budget = total * 2 // 5
    entries = sorted((abs(w), li, i) for li, (ws, ms) in enumerate(flat) for i, (w, m) in enumerate(zip(ws, ms)) if m)
    dropped = {(li, i) for _, li, i in entries[: total - budget]}
    pruned = prune_to_budget(layers, budget)
    assert sum(int(layer.mask.sum()) for layer in layers) == budget
    for li, layer in enumerate(layers):
        want_mask = [m and (li, i) not in dropped for i, m in enumerate(flat[li][1])]
        assert layer.mask.flatten().tolist() == want_mask
        assert layer.weight.flatten().tolist() == [w if keep else 0.0 for w, keep in zip(flat[li][0], want_mask)]
        assert pruned[li] == sum(1 for d in dropped if d[0] == li)


def test_forward_equals_masked_matmul_reference():
    src = random_mlp([9, 6, 5, 4], seed=7)
    res = expand_mlp(src, [Target(0, 3, "random"), Target(1, 2, "structured")], seed=1)
    x = torch.randn(32, 9, generator=torch.Generator().manual_seed(1))
    got = forward(res.mlp, x, dtype=torch.float64)
    torch.testing.assert_close(got, masked_reference_forward(res.mlp, x), rtol=1e-12, atol=1e-12)
    # forward must ignore off-mask garbage: corrupt an off-mask entry, output unchanged
    layer = res.mlp.layers[0]
    off = (~layer.mask).nonzero()[0]
    layer.weight = layer.weight.clone()
    layer.weight[off[0], off[1]] = 123.0
    torch.testing.assert_close(forward(res.mlp, x, dtype=torch.float64), got, rtol=0, atol=0)


def test_structural_identity_without_bias_or_pruning():
    """No bias, identity activation, copied outgoing columns, no pruning: children sum to the parent."""
    src = random_mlp([8, 5, 4, 3], seed=2, bias=False)
    src.activation = "identity"
    res = expand_mlp(src, [Target(0, 4, "random"), Target(1, 2, "gram")], seed=3, prune=False)
    res.mlp.activation = "identity"
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(forward(res.mlp, x, dtype=torch.float64), forward(src, x, dtype=torch.float64))
    # unpruned counts: layer 0 keeps its 40 edges, layer 1's 20 columns are copied 4x, layer 2's 12 copied 2x
    assert res.after == [40, 80, 24]


def test_structured_plan_is_index_mod_alpha_for_dense_parents():
    w = torch.randn(4, 10)
    plan = plan_layer(w, w != 0, 3, "structured", key="w", generator=torch.Generator())
    for i in range(4):
        assert plan.child[i].tolist() == [j % 3 for j in range(10)]


def test_clause_plan_keeps_groups_together():
    d, alpha = 12, 2
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    w = torch.randn(6, d)
    plan = plan_layer(w, w != 0, alpha, "clause", key="w", generator=torch.Generator().manual_seed(0), groups=groups)
    plan_edges_ok(plan, w != 0)
    for i in range(6):
        for g in range(4):
            owners = {int(plan.child[i, j]) for j in range(d) if int(groups[j]) == g}
            assert len(owners) == 1, f"group {g} split across children of parent {i}"


def test_different_seeds_give_different_random_plans():
    src = random_mlp([32, 16, 4], seed=0)
    plans = [expand_mlp(src, [Target(0, 4, "random")], seed=s).plan.layers[0].child for s in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(plans[a], plans[b])
    again = expand_mlp(src, [Target(0, 4, "random")], seed=2).plan.layers[0].child
    assert torch.equal(again, plans[2])


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 6), cols=st.integers(0, 300), levels=st.sampled_from([2, 7, 1 << 24]),
       seed=st.integers(0, 2**31 - 1))
def test_stable_row_order_is_torch_stable_argsort(rows, cols, levels, seed):
    """The integer-sort trick behind the random split equals torch's stable argsort, ties included
    (few distinct key levels force many ties; 2.0 is what non-edges get)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, levels, (rows, cols), generator=g).to(torch.float32) / levels
    keys[torch.rand(rows, cols, generator=g) < 0.2] = 2.0
    assert torch.equal(stable_row_order(keys), torch.argsort(keys, dim=1, stable=True))


def test_random_plan_is_a_random_permutation_cut_in_alpha_parts():
    """plan_random against its definition written out: per row, a stable argsort of the generator's keys
    (non-edges last), the k-th edge in that order goes to child k * alpha // n."""
    g = torch.Generator().manual_seed(3)
    support = torch.rand(40, 23, generator=g) < 0.7
    got = plan_random(support, 3, torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)
    keys = torch.rand(support.shape, generator=gen)  # one chunk: 40 rows < ROW_CHUNK
    keys[~support] = 2.0
    for i in range(support.shape[0]):
        n = int(support[i].sum())
        order = sorted(range(support.shape[1]), key=lambda j: (float(keys[i, j]), j))
        for place, j in enumerate(order):
            assert int(got[i, j]) == (place * 3 // n if place < n else -1)


def test_alpha_larger_than_edges_is_refused_not_silent():
    src = random_mlp([3, 4, 2])
    with pytest.raises(FPEError, match="larger than parent"):
        expand_mlp(src, [Target(0, 4, "random")])


def test_validate_plan_reports_problems():
    w = torch.randn(3, 4)
    plan = plan_layer(w, w != 0, 2, "random", key="w", generator=torch.Generator().manual_seed(0))
    assert validate_layer_plan(plan, w != 0) == []
    broken = LayerPlan("w", 2, "random", plan.child.clone())
    broken.child[0, 0] = -1
    assert any("unassigned" in p for p in validate_layer_plan(broken, w != 0))
    empty = LayerPlan("w", 2, "random", torch.zeros(3, 4, dtype=torch.int16))
    assert any("without edges" in p for p in validate_layer_plan(empty, w != 0))
    assert any("does not match" in p for p in validate_layer_plan(plan, torch.ones(3, 5, dtype=torch.bool)))


# ---------------------------------------------------------------- hypothesis properties


@st.composite
def cases(draw):
    depth = draw(st.integers(1, 3))
    alpha = draw(st.integers(2, 4))
    d = draw(st.integers(alpha, 8))
    hidden = [draw(st.integers(alpha, 6)) for _ in range(depth)]  # every parent has >= alpha edges
    out = draw(st.integers(1, 4))
    split = draw(st.sampled_from(["random", "structured", "gram", "clause"]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    sparse = draw(st.booleans())
    groups = None
    if split == "clause":
        groups = torch.tensor(draw(st.lists(st.integers(-1, 3), min_size=d, max_size=d)))
        if not (groups >= 0).any():
            groups[0] = 0
    n_targets = draw(st.integers(1, depth))
    chosen = sorted(draw(st.permutations(list(range(depth))))[:n_targets])
    return dict(widths=[d, *hidden, out], alpha=alpha, split=split, dtype=dtype, seed=seed,
                zero_frac=0.3 if sparse else 0.0, groups=groups, targets=chosen)


def _targets(case):
    # a clause split needs input features: only the first layer; deeper targets use random
    return [Target(k, case["alpha"], case["split"] if (case["split"] != "clause" or k == 0) else "random")
            for k in case["targets"]]


@settings(max_examples=50)
@given(cases())
def test_properties(case):
    src = random_mlp(case["widths"], dtype=case["dtype"], seed=case["seed"], zero_frac=case["zero_frac"],
                     alpha=case["alpha"])
    targets = _targets(case)
    kw = dict(seed=case["seed"], inputs=PlanInputs(groups=case["groups"]))
    full = expand_mlp(src, targets, prune=False, **kw)
    res = expand_mlp(src, targets, **kw)

    # plans: coverage of each parent's edges, non-edges unassigned, no empty child, balance.
    # The support a layer is planned on: its source support, columns repeated when the layer before
    # it was expanded (its inputs were widened by copying).
    alphas = {t.index: t.alpha for t in targets}
    for n, (t, plan) in enumerate(zip(targets, full.plan.layers)):
        support = src.layers[t.index].weight != 0
        if t.index - 1 in alphas:
            support = support.repeat_interleave(alphas[t.index - 1], dim=1)
        plan_edges_ok(plan, support)
        assert torch.equal(plan.child, res.plan.layers[n].child), "same seed, same plan"

    # before pruning: siblings disjoint, union == parent's edges, no empty child
    for t in targets:
        layer = full.mlp.layers[t.index]
        m = layer.mask.view(-1, t.alpha, layer.in_features).to(torch.int64)  # (h, alpha, d)
        assert int(m.sum(1).max()) <= 1, "siblings share an edge"
        parent_support = m.sum(1) > 0
        plan = full.plan.layers[targets.index(t)]
        assert torch.equal(parent_support, plan.child >= 0), "children's union is not the parent's edges"
        assert bool((m.sum(2) > 0).all()), "empty child before pruning"

    # pruning: exact budget; after pruning each mask is a subset of the unpruned one
    assert sum(int(layer.mask.sum()) for layer in res.mlp.layers) == src.weight_budget() == res.budget
    for a, b in zip(res.mlp.layers, full.mlp.layers):
        assert not bool((a.mask & ~b.mask).any())
        assert a.weight.dtype == case["dtype"] and (a.bias is None or a.bias.dtype == case["dtype"])
        assert not bool(((a.weight != 0) & ~a.mask).any()), "off-mask weight not zero"
    assert check_invariants(res.mlp, res.budget, src) == []

    # the oracle: unpruned and pruned, bit for bit
    plans = {t.index: res.plan.layers[n] for n, t in enumerate(targets)}
    want = oracle_expand(src, plans)
    assert_matches_oracle(full.mlp, want, case["dtype"])
    assert_matches_oracle(res.mlp, oracle_prune(want, src.weight_budget()), case["dtype"])

    # determinism: a second run gives identical tensors
    again = expand_mlp(src, targets, **kw)
    for a, b in zip(res.mlp.layers, again.mlp.layers):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)

    # forward equals a masked dense matmul reference
    x = torch.randn(4, case["widths"][0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(forward(res.mlp, x, dtype=torch.float64), masked_reference_forward(res.mlp, x))


@settings(max_examples=30)
@given(cases())
def test_packed_dense_round_trip_is_bit_exact(case):
    src = random_mlp(case["widths"], dtype=case["dtype"], seed=case["seed"], zero_frac=case["zero_frac"],
                     alpha=case["alpha"])
    res = expand_mlp(src, _targets(case), seed=case["seed"], inputs=PlanInputs(groups=case["groups"]))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(res.mlp, tmp / "a.packed.safetensors", "packed")
        save_checkpoint(res.mlp, tmp / "a.dense.safetensors", "dense")
        p1 = load_checkpoint(tmp / "a.packed.safetensors")
        save_checkpoint(p1.mlp, tmp / "b.dense.safetensors", "dense")
        d1 = load_checkpoint(tmp / "b.dense.safetensors")
        save_checkpoint(d1.mlp, tmp / "c.packed.safetensors", "packed")
        d0 = load_checkpoint(tmp / "a.dense.safetensors")
        save_checkpoint(d0.mlp, tmp / "d.packed.safetensors", "packed")
        packed = (tmp / "a.packed.safetensors").read_bytes()
        dense = (tmp / "a.dense.safetensors").read_bytes()
        assert (tmp / "c.packed.safetensors").read_bytes() == packed, "packed -> dense -> packed changed bytes"
        assert (tmp / "d.packed.safetensors").read_bytes() == packed, "dense -> packed differs from packed"
        assert (tmp / "b.dense.safetensors").read_bytes() == dense, "packed -> dense differs from dense"
        assert p1.layout == "packed" and d1.layout == "dense"
        for loaded in (p1, d1, d0):  # `fpe verify`'s invariants hold on what was written
            assert check_invariants(loaded.mlp, res.budget, src) == []
        for a, b in zip(res.mlp.layers, p1.mlp.layers):
            assert a.weight.dtype == b.weight.dtype
            assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
            assert (a.parents is None) == (b.parents is None)
            if a.parents is not None:
                assert torch.equal(a.parents, b.parents)


@settings(max_examples=40, deadline=None)
@given(cases(), st.sampled_from(["copy", "split"]), st.sampled_from([None, 0.5, 1]))
def test_pruning_selected_on_source_tensors_equals_sorting_the_expanded_weights(case, outgoing, top):
    """The threshold is selected on source-sized tensors with copy counts (selective expansion gives
    parents different counts; outgoing=split divides the copies); the result must equal the sorting
    oracle applied to the unpruned expansion, bit for bit."""
    src = random_mlp(case["widths"], dtype=case["dtype"], seed=case["seed"], zero_frac=case["zero_frac"],
                     alpha=case["alpha"])
    targets = _targets(case)
    for t in targets:
        t.top = top
    kw = dict(seed=case["seed"], outgoing=outgoing, inputs=PlanInputs(groups=case["groups"]))
    full = expand_mlp(src, targets, prune=False, **kw)
    res = expand_mlp(src, targets, **kw)
    ref = [{"w": [[layer.weight[i, j] for j in range(layer.in_features)] for i in range(layer.out_features)],
            "m": layer.mask.tolist()} for layer in full.mlp.layers]
    oracle_prune(ref, src.weight_budget())
    for layer, want in zip(res.mlp.layers, ref):
        assert layer.mask.tolist() == want["m"]
        assert layer.weight.tolist() == [[float(v) for v in row] for row in want["w"]]
