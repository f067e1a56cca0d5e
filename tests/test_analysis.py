"""Interference metrics (fpe_cli.analysis): hand-computed cases, invariances, chunked = plain oracle."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fpe_cli import analysis as A
from fpe_cli.errors import FPEError
from fpe_cli.expand import PlanInputs, Target, expand_mlp
from fpe_cli.layers import KernelMLP
from fpe_cli.model import MLP, Layer, hidden_activations

# ---------------------------------------------------------------- plain oracles (full matrices, float64)


def oracle_capacity(w: torch.Tensor) -> torch.Tensor:
    g = w.double().T @ w.double()  # (in, in)
    diag = g.diagonal()
    cap = diag**2 / (g**2).sum(dim=1)
    return torch.where(diag > 0, cap, torch.full_like(cap, math.nan))


def oracle_cosines(w: torch.Tensor, parents: torch.Tensor | None) -> tuple[float, float]:
    w = w.double()
    keep = w.norm(dim=1) > 0
    u = w[keep] / w[keep].norm(dim=1, keepdim=True)
    c = (u @ u.T).abs()  # (n, n)
    n = u.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)
    sib = (parents[keep][:, None] == parents[keep][None, :]) if parents is not None else torch.zeros(n, n, dtype=torch.bool)
    return float(c[upper].mean()), float(c[upper & ~sib].mean())


def oracle_poly(w: torch.Tensor) -> torch.Tensor:
    p = w.double() ** 2
    p = p / p.sum(dim=1, keepdim=True)
    return torch.exp(-(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(dim=1))


def matrices(min_out=1, max_out=9, min_in=1, max_in=9):
    """Hypothesis: small float64 weight matrices with a sprinkling of exact zeros."""
    @st.composite
    def build(draw):
        out = draw(st.integers(min_out, max_out))
        d = draw(st.integers(min_in, max_in))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(out, d, generator=g, dtype=torch.float64)
        return w * (torch.rand(out, d, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.7])))
    return build()


def split_layer(w: torch.Tensor, alpha: int, seed: int = 0) -> Layer:
    """An FPE-style expansion of W's rows: each parent's columns dealt evenly to alpha children at random."""
    g = torch.Generator().manual_seed(seed)
    h, d = w.shape
    owner = torch.argsort(torch.rand(h, d, generator=g), dim=1) % alpha  # (h, d) child of each edge
    rows = torch.zeros(h * alpha, d, dtype=w.dtype)
    for k in range(alpha):
        rows[k::alpha] = torch.where(owner == k, w, torch.zeros_like(w))
    parents = torch.arange(h).repeat_interleave(alpha)
    return Layer("fc1.weight", rows, mask=rows != 0, parents=parents)


# ---------------------------------------------------------------- feature capacity


def test_orthogonal_features_have_capacity_one():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    w = q[:, :4] * torch.tensor([0.5, 2.0, 3.0, 7.0], dtype=torch.float64)  # 4 orthogonal columns, any lengths
    cap = A.feature_capacity(w)
    assert torch.allclose(cap, torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert A.capacity_summary(cap, 6)["capacity_sum"] == pytest.approx(4.0, abs=1e-5)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_n_identical_features_share_capacity_one_over_n(n):
    col = torch.tensor([1.0, -2.0, 0.5])
    w = col[:, None].repeat(1, n)  # (3, n): n copies of one feature
    assert torch.allclose(A.feature_capacity(w), torch.full((n,), 1.0 / n, dtype=torch.float64), atol=1e-7)


def test_hand_computed_two_features():
    # W_1 = (1, 0), W_2 = (1, 1): G = [[1, 1], [1, 2]]; C_1 = 1/(1+1) = 0.5, C_2 = 4/(1+4) = 0.8
    w = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert A.feature_capacity(w).tolist() == pytest.approx([0.5, 0.8])
    s = A.capacity_summary(A.feature_capacity(w), 2)
    assert s["capacity_mean"] == pytest.approx(0.65) and s["capacity_median"] == pytest.approx(0.65)
    assert s["capacity_fraction_below_half"] == 0.0  # 0.5 is not below 0.5


def test_zero_columns_are_nan_and_skipped():
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    cap = A.feature_capacity(w)
    assert cap[0] == 1.0 and math.isnan(cap[1]) and cap[2] == 1.0
    s = A.capacity_summary(cap, 2)
    assert (s["features_counted"], s["features_zero"], s["capacity_mean"]) == (2, 1, 1.0)
    assert math.isnan(A.capacity_summary(A.feature_capacity(torch.zeros(2, 2)), 2)["capacity_mean"])


@given(matrices(max_out=6, max_in=12))
def test_capacity_sum_never_exceeds_neurons(w):
    cap = A.feature_capacity(w)
    kept = cap[~torch.isnan(cap)]
    assert ((kept >= -1e-9) & (kept <= 1 + 1e-9)).all()
    assert float(kept.sum()) <= w.shape[0] + 1e-6


# ---------------------------------------------------------------- cosine, siblings


def test_siblings_cosine_is_exactly_zero_and_excluded():
    w = torch.randn(5, 12)
    layer = split_layer(w, alpha=3)
    stats = A.cosine_stats(layer.weight, layer.parents)
    assert stats["cosine_mean_abs_sibling"] == 0.0  # disjoint supports: exactly zero, not approximately
    assert stats["sibling_pairs"] == 5 * 3  # C(3, 2) per parent
    all_pairs, non_sib = oracle_cosines(layer.weight, layer.parents)
    assert stats["cosine_mean_abs"] == pytest.approx(all_pairs, rel=1e-6)
    assert stats["cosine_mean_abs_non_sibling"] == pytest.approx(non_sib, rel=1e-6)
    assert stats["cosine_mean_abs_non_sibling"] > stats["cosine_mean_abs"]  # the zeros were dragging it down


def test_cosine_hand_computed_and_zero_rows_excluded():
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, -3.0]])  # row 2 is all zero
    s = A.cosine_stats(w)
    r = 1 / math.sqrt(2)  # |cos| of pairs (0,1), (0,3), (1,3) = r, 0, r
    assert s["cosine_mean_abs"] == pytest.approx(2 * r / 3, rel=1e-6)
    assert (s["pairs"], s["zero_rows"]) == (3, 1)
    assert s["cosine_mean_abs_non_sibling"] == s["cosine_mean_abs"]  # no lineage: every pair is non-sibling


def test_single_neuron_has_no_pairs():
    s = A.cosine_stats(torch.tensor([[1.0, 2.0]]))
    assert s["pairs"] == 0 and math.isnan(s["cosine_mean_abs"])


# ---------------------------------------------------------------- polysemanticity


def test_polysemanticity_hand_computed():
    w = torch.tensor([[3.0, 0.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    p = A.polysemanticity(w)
    assert p[:3].tolist() == pytest.approx([1.0, 4.0, 2.0])  # one input, four equal, two equal
    assert math.isnan(p[3])  # a row with no weights drives nothing


# ---------------------------------------------------------------- invariances


@given(matrices(min_out=2), st.integers(0, 2**31 - 1))
def test_invariant_to_permuting_neurons(w, seed):
    parents = torch.arange(w.shape[0]) // 2  # pairs of "siblings" (lineage permuted along with the rows)
    perm = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))
    wp, pp = w[perm], parents[perm]
    assert torch.allclose(A.feature_capacity(wp), A.feature_capacity(w), equal_nan=True, atol=1e-9)
    assert torch.allclose(A.gram(wp), A.gram(w), atol=1e-5)
    assert torch.allclose(A.polysemanticity(wp), A.polysemanticity(w)[perm], equal_nan=True)
    a, b = A.cosine_stats(wp, pp), A.cosine_stats(w, parents)
    for key in ("cosine_mean_abs", "cosine_mean_abs_non_sibling", "cosine_mean_abs_sibling"):
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9)


@given(matrices(min_out=2), st.integers(0, 8), st.floats(0.01, 100.0), st.booleans())
def test_invariant_to_scaling_a_neuron(w, row, scale, negate):
    """|cos| and polysemanticity depend on each row's direction only: any non-zero scale leaves them be."""
    row = row % w.shape[0]
    c = -scale if negate else scale
    ws = w.clone()
    ws[row] *= c
    assert torch.allclose(A.polysemanticity(ws), A.polysemanticity(w), equal_nan=True, rtol=1e-9)
    a, b = A.cosine_stats(ws), A.cosine_stats(w)
    assert (math.isnan(a["cosine_mean_abs"]) and math.isnan(b["cosine_mean_abs"])) or \
        a["cosine_mean_abs"] == pytest.approx(b["cosine_mean_abs"], rel=1e-5, abs=1e-9)


@given(matrices(), st.integers(0, 8), st.floats(0.01, 100.0))
def test_capacity_invariant_to_sign_flip_of_a_neuron_and_global_scale(w, row, scale):
    """Capacity is invariant to orthogonal maps of neuron space (a sign flip is one) and to scaling all of W."""
    ws = w.clone()
    ws[row % w.shape[0]] *= -1
    ref = A.feature_capacity(w)
    assert torch.allclose(A.feature_capacity(ws), ref, equal_nan=True, atol=1e-9)
    assert torch.allclose(A.feature_capacity(w * scale), ref, equal_nan=True, atol=1e-9)


def test_capacity_is_not_invariant_to_scaling_one_neuron():
    """Documented non-invariance: stretching one neuron changes the features' geometry, so their overlaps."""
    w = torch.tensor([[1.0, 1.0], [1.0, -0.5]], dtype=torch.float64)  # W_1 = (1, 1), W_2 = (1, -0.5): W_1.W_2 = 0.5
    ws = w.clone()
    ws[1] *= 2.0  # W_1 = (1, 2), W_2 = (1, -1): W_1.W_2 = -1, and C_1 goes from 4/4.25 to 25/26
    assert not torch.allclose(A.feature_capacity(ws), A.feature_capacity(w))


@given(st.integers(1, 4), st.integers(1, 5), st.integers(2, 20), st.floats(0.1, 10.0), st.integers(0, 2**31 - 1))
def test_class_selectivity_invariant_to_scaling_activations(classes, width, n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n, width, generator=g, dtype=torch.float64))
    y = torch.randint(0, classes, (n,), generator=g)
    s1, s2 = A.ActivationStats.empty(classes, width), A.ActivationStats.empty(classes, width)
    s1.add(acts, A.label_matrix(y, classes))
    s2.add(acts * scale, A.label_matrix(y, classes))
    assert torch.allclose(A.class_selectivity(s1), A.class_selectivity(s2), equal_nan=True)
    assert A.data_metrics(s1)[0]["dead_fraction"] == A.data_metrics(s2)[0]["dead_fraction"]


# ---------------------------------------------------------------- chunked == plain oracle


@given(matrices(max_out=12, max_in=12), st.integers(1, 5), st.integers(1, 3))
def test_chunked_equals_plain_oracle(w, chunk, alpha):
    layer = split_layer(w, alpha)
    we, parents = layer.weight, layer.parents
    assert torch.allclose(A.feature_capacity(we, chunk=chunk), oracle_capacity(we), equal_nan=True, atol=1e-9)
    assert torch.allclose(A.polysemanticity(we, chunk=chunk), oracle_poly(we), equal_nan=True, atol=1e-9)
    assert torch.allclose(A.gram(we, chunk=chunk).double(), we.T @ we, atol=1e-4)
    stats = A.cosine_stats(we, parents, chunk=chunk)
    keep = we.norm(dim=1) > 0
    if int(keep.sum()) >= 2:
        all_pairs, non_sib = oracle_cosines(we, parents)
        assert stats["cosine_mean_abs"] == pytest.approx(all_pairs, rel=1e-5, abs=1e-9)
        if stats["pairs"] > stats["sibling_pairs"]:
            assert stats["cosine_mean_abs_non_sibling"] == pytest.approx(non_sib, rel=1e-5, abs=1e-9)


def test_chunked_equals_oracle_on_a_bigger_float32_layer():
    torch.manual_seed(0)
    layer = split_layer(torch.randn(300, 70), alpha=4)  # 1200 neurons: several 256-row blocks
    w = layer.weight
    ticks = []
    cap = A.feature_capacity(w, chunk=32, progress=ticks.append)
    assert torch.allclose(cap, oracle_capacity(w), atol=1e-5)
    assert len(ticks) == 3  # ceil(70 / 32) blocks
    stats = A.cosine_stats(w, layer.parents, chunk=256)
    all_pairs, non_sib = oracle_cosines(w, layer.parents)
    assert stats["cosine_mean_abs"] == pytest.approx(all_pairs, rel=1e-5)
    assert stats["cosine_mean_abs_non_sibling"] == pytest.approx(non_sib, rel=1e-5)
    assert stats["cosine_mean_abs_sibling"] == 0.0


# ---------------------------------------------------------------- data metrics


def test_data_metrics_hand_computed():
    # 3 neurons, 2 classes: neuron 0 fires only on class 0, neuron 1 equally on both, neuron 2 never
    acts = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    stats = A.ActivationStats.empty(2, 3)
    stats.add(acts[:3], A.label_matrix(y[:3], 2))  # streamed in two batches
    stats.add(acts[3:], A.label_matrix(y[3:], 2))
    summary, per = A.data_metrics(stats)
    assert per["class_selectivity"][:2].tolist() == pytest.approx([1.0, 2.0])
    assert math.isnan(per["class_selectivity"][2])
    assert per["density"].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert summary["dead_fraction"] == pytest.approx(1 / 3)
    assert summary["activation_density"] == pytest.approx(0.5)
    assert summary["class_selectivity_mean"] == pytest.approx(1.5)


def test_multilabel_targets_and_bad_labels():
    y = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert torch.equal(A.label_matrix(y, 2), y.double())
    with pytest.raises(FPEError, match="labels must lie in 0..1"):
        A.label_matrix(torch.tensor([0, 2]), 2)


def test_activation_stats_batches_match_one_pass():
    torch.manual_seed(1)
    mlp = MLP([Layer("a.weight", torch.randn(6, 4), "a.bias", torch.randn(6)), Layer("b.weight", torch.randn(3, 6))])
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    one, many = A.activation_stats(mlp, x, y, 3, batch=50), A.activation_stats(mlp, x, y, 3, batch=7)
    assert torch.allclose(one[0].class_sums, many[0].class_sums) and torch.equal(one[0].active_counts, many[0].active_counts)


# ---------------------------------------------------------------- activation statistics: kernels vs. the masked-dense oracle


def oracle_activation_stats(mlp: MLP, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[tuple]:
    """(class sums, class counts, active counts) per hidden layer: one masked-dense pass, float64 sums."""
    targets = torch.nn.functional.one_hot(y, num_classes).double()  # (N, C)
    return [(targets.T @ acts.double(), targets.sum(dim=0), (acts > 0).sum(dim=0))
            for acts in hidden_activations(mlp, x)]  # the reference: weight * mask on every call


def assert_stats_match_oracle(mlp, x, y, num_classes, kernels, batch=32):
    stats = A.activation_stats(mlp, x, y, num_classes, batch=batch)
    assert [layer.kernel for layer in stats] == kernels  # fails if the grouped kernel silently falls back
    for layer, (sums, counts, active) in zip(stats, oracle_activation_stats(mlp, x, y, num_classes), strict=True):
        torch.testing.assert_close(layer.class_sums, sums, rtol=1e-5, atol=1e-4)
        assert torch.equal(layer.class_counts, counts) and torch.equal(layer.active_counts, active)
        assert layer.samples == x.shape[0]


def three_layer_mlp(seed: int = 0, dtype=torch.float32) -> MLP:
    g = torch.Generator().manual_seed(seed)
    return MLP([Layer("0.weight", torch.randn(8, 12, generator=g).to(dtype), "0.bias", torch.randn(8, generator=g).to(dtype)),
                Layer("2.weight", torch.randn(8, 8, generator=g).to(dtype), "2.bias", torch.randn(8, generator=g).to(dtype)),
                Layer("4.weight", torch.randn(3, 8, generator=g).to(dtype), None, None)])


def probe(n: int = 100, d: int = 12, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_stats_dense_kernel_matches_masked_dense_oracle(dtype):
    """Per-edge random split (the paper's): dense kernel, masks applied once when the module is built."""
    expanded = expand_mlp(three_layer_mlp(dtype=dtype), [Target(0, 3), Target(1, 2)], seed=0).mlp
    first = expanded.layers[0]
    first.weight = first.weight.masked_fill(~first.mask, 7.0)  # stray off-mask values: both must ignore them
    x, y = probe()
    assert_stats_match_oracle(expanded, x, y, 3, ["dense", "dense"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_stats_grouped_kernel_matches_masked_dense_oracle(dtype):
    """A --group-size expansion (fpe.settings records it, as fpe expand does): grouped kernel in every hidden layer."""
    import json

    expanded = expand_mlp(three_layer_mlp(dtype=dtype), [Target(0, 2), Target(1, 2)], seed=0,
                          inputs=PlanInputs(group_size=4)).mlp
    x, y = probe()
    plain = expanded.copy()
    assert_stats_match_oracle(plain, x, y, 3, ["dense", "dense"])  # no recorded group size: dense kernel
    expanded.metadata["fpe.settings"] = json.dumps({"group_size": 4})
    assert_stats_match_oracle(expanded, x, y, 3, ["grouped", "grouped"])


def test_activation_stats_bounds_the_grouped_gather(monkeypatch):
    """Small groups gather x many times over: blocks shrink to keep that copy bounded, same statistics."""
    import json

    expanded = expand_mlp(three_layer_mlp(), [Target(0, 2), Target(1, 2)], seed=0, inputs=PlanInputs(group_size=4)).mlp
    expanded.metadata["fpe.settings"] = json.dumps({"group_size": 4})
    seen = []
    original = KernelMLP.hidden_activations
    monkeypatch.setattr(KernelMLP, "hidden_activations", lambda self, x: seen.append(x.shape[0]) or original(self, x))
    monkeypatch.setattr(A, "GATHER_BYTES", 4 * KernelMLP(expanded).gather_width * 5)  # room for 5 rows
    x, y = probe()
    assert_stats_match_oracle(expanded, x, y, 3, ["grouped", "grouped"], batch=32)
    assert max(seen) == 5 and sum(seen) == 100


def test_activation_stats_grouped_kernel_from_an_fpe_expand_file(tmp_path):
    """The real path: `fpe expand --group-size` writes the file, load_checkpoint reads it, analyze gets blocks."""
    from conftest import run_cli, save_mlp

    from fpe_cli.checkpoint import load_checkpoint

    src = save_mlp(tmp_path / "model.safetensors", [12, 8, 3])
    res = run_cli(["expand", src, "--alpha", "2", "--group-size", "4", "--seed", "1", "-o", tmp_path / "x.safetensors"])
    assert res.exit_code == 0, res.stderr
    mlp = load_checkpoint(tmp_path / "x.safetensors").mlp
    x, y = probe(60)
    assert_stats_match_oracle(mlp, x, y, 3, ["grouped"])


# ---------------------------------------------------------------- dense vs. expanded


def dnf_like_mlp(seed: int = 0, clauses: int = 16, k: int = 3, h: int = 8) -> tuple[MLP, torch.Tensor]:
    """A DNF-like dense model in superposition: clauses of k literals over clauses*k inputs; each of the h
    neurons carries about half of the clauses (a signed weight per literal, one strength per clause)
    plus weak weights everywhere (what training leaves behind)."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.arange(clauses * k) // k  # input -> clause
    strength = (torch.rand(h, clauses, generator=g) < 0.5) * (0.5 + torch.rand(h, clauses, generator=g))  # (h, clauses)
    signs = torch.sign(torch.randn(1, clauses * k, generator=g))  # literal or negated literal
    w1 = strength[:, groups] * signs + 0.05 * torch.randn(h, clauses * k, generator=g)  # (h, clauses*k)
    mlp = MLP([Layer("fc1.weight", w1, "fc1.bias", torch.zeros(h)), Layer("fc2.weight", torch.randn(1, h, generator=g))])
    return mlp, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clause_split_raises_capacity_and_lowers_non_sibling_cosine(seed):
    """Direction check of the paper's claim on a DNF-like model (the sample-file version is in test_analyze_cli)."""
    dense, groups = dnf_like_mlp(seed)
    expanded = expand_mlp(dense, [Target(0, 2, "clause")], inputs=PlanInputs(groups=groups)).mlp
    d, x = A.analyze_mlp(dense), A.analyze_mlp(expanded)
    assert x[0].metrics["capacity_mean"] > d[0].metrics["capacity_mean"]
    assert x[0].metrics["cosine_mean_abs_non_sibling"] < d[0].metrics["cosine_mean_abs"]
    cmp = A.compare(d, x, top=3)[0]
    assert cmp["fold_change"]["capacity_mean"] > 1 and cmp["fold_change"]["cosine_mean_abs_non_sibling"] < 1
    assert x[0].alpha == 2 and x[0].metrics["cosine_mean_abs_sibling"] == 0.0
    top = cmp["top_parents"]
    assert len(top) == 3 and all(len(r["children"]) == 2 for r in top)
    assert all(r["polysemanticity_fold_change"] < 1 for r in top)  # each child carries fewer inputs than its parent


def test_compare_fold_changes_by_hand():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])  # poly 4 and 1
    dense = MLP([Layer("fc1.weight", w), Layer("fc2.weight", torch.ones(1, 2))])
    children = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])  # poly 2, 2, 1
    expanded = MLP([Layer("fc1.weight", children, parents=torch.tensor([0, 0, 1])), Layer("fc2.weight", torch.ones(1, 3))])
    d, x = A.analyze_mlp(dense), A.analyze_mlp(expanded)
    cmp = A.compare(d, x, top=5)[0]
    assert cmp["fold_change"]["polysemanticity_mean"] == pytest.approx((5 / 3) / 2.5)
    assert [r["parent"] for r in cmp["top_parents"]] == [0, 1]
    assert cmp["top_parents"][0]["children"] == [0, 1]
    assert cmp["top_parents"][0]["polysemanticity_fold_change"] == pytest.approx(0.5)
    assert math.isnan(cmp["fold_change"]["dead_fraction"])  # no data given: undefined, never a made-up number
    assert x[0].alpha is None  # uneven children (selective expansion)


def test_compare_rejects_unrelated_models():
    a = A.analyze_mlp(MLP([Layer("fc1.weight", torch.randn(3, 4)), Layer("fc2.weight", torch.randn(1, 3))]))
    b = A.analyze_mlp(MLP([Layer("fc1.weight", torch.randn(5, 4)), Layer("fc2.weight", torch.randn(1, 5))]))
    with pytest.raises(FPEError, match="no lineage"):
        A.compare(a, b)
    c = A.analyze_mlp(MLP([Layer("fc1.weight", torch.randn(6, 4), parents=torch.arange(6)), Layer("fc2.weight", torch.randn(1, 6))]))
    with pytest.raises(FPEError, match="lineage has 6 parent neurons but the dense layer fc1.weight has 3"):
        A.compare(a, c)
    # fewer parents than dense rows: an expansion of a narrower model, not of this one
    e = A.analyze_mlp(MLP([Layer("fc1.weight", torch.randn(4, 4), parents=torch.tensor([0, 0, 1, 1])),
                           Layer("fc2.weight", torch.randn(1, 4))]))
    with pytest.raises(FPEError, match="lineage has 2 parent neurons"):
        A.compare(a, e)
    with pytest.raises(FPEError, match="hidden layers"):
        A.compare(a, a + a)


def test_work_units_match_progress_ticks():
    mlp = MLP([Layer("a.weight", torch.randn(40, 30)), Layer("b.weight", torch.randn(20, 40)), Layer("c.weight", torch.randn(2, 20))])
    ticks = []
    A.analyze_mlp(mlp, chunk=16, progress=ticks.append)
    assert sum(ticks) == A.work_units(mlp, chunk=16)
