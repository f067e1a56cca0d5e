"""FPELinear against the masked-dense oracle: forward, backward, float32 and bfloat16, both kernels."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fpe_cli.expand import Target, expand_mlp, split_rows
from fpe_cli.layers import FPELinear, group_layout, masked_dense_linear
from fpe_cli.model import MLP, Layer
from fpe_cli.plan import LayerPlan, plan_random_grouped, plan_structured

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def grouped_layer(h, d, alpha, group, seed=0, prune_frac=0.2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(h, d, generator=g)
    child = plan_random_grouped(torch.ones(h, d, dtype=torch.bool), alpha, group, g)
    layer = split_rows(Layer("w", w, "b", torch.randn(h, generator=g)), LayerPlan("w", alpha, "random", child))
    drop = (torch.rand(layer.mask.shape, generator=g) < prune_frac) & layer.mask  # budget pruning removes some edges
    layer.mask &= ~drop
    layer.weight = layer.weight.masked_fill(drop, 0).to(dtype)
    layer.bias = layer.bias.to(dtype)
    return layer


def oracle_grads(layer, x):
    w = layer.weight.clone().requires_grad_(True)
    b = layer.bias.clone().requires_grad_(True)
    xx = x.clone().requires_grad_(True)
    y = masked_dense_linear(xx, w, layer.mask, b)
    (y * torch.linspace(-1, 1, y.shape[1], dtype=y.dtype)).sum().backward()
    return y.detach(), w.grad * layer.mask, b.grad, xx.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["dense", "grouped"])
@given(h=st.integers(2, 12), d=st.integers(4, 24), alpha=st.sampled_from([2, 3, 4]), seed=st.integers(0, 99),
       batch=st.integers(1, 9), groups=st.integers(1, 3))
@settings(max_examples=12, deadline=None)
def test_forward_backward_match_oracle(dtype, kernel, h, d, alpha, seed, batch, groups):
    if d < alpha:
        return
    h = h - h % groups or groups
    layer = grouped_layer(h, d, alpha, h // groups, seed, dtype=dtype)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
    y_ref, gw_ref, gb_ref, gx_ref = oracle_grads(layer, x)
    mod = FPELinear(layer.weight, layer.bias, layer.mask, alpha=alpha, group_size=h // groups, kernel=kernel)
    assert mod.kernel == kernel
    xx = x.clone().requires_grad_(True)
    y = mod(xx)
    (y * torch.linspace(-1, 1, y.shape[1], dtype=y.dtype)).sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(xx.grad, gx_ref, **TOL[dtype])
    torch.testing.assert_close(mod.bias.grad, gb_ref, **TOL[dtype])
    dense_grad = mod.weight.grad if kernel == "dense" else _scatter_grad(mod)
    torch.testing.assert_close(dense_grad, gw_ref, **TOL[dtype])
    assert torch.equal(mod.dense_weight(), layer.weight)  # exact round trip of the stored weights


def _scatter_grad(mod):
    """The grouped kernel's block gradient laid out as an (out, in) matrix, like dense_weight()."""
    saved = mod.weight.data.clone()
    mod.weight.data.copy_(mod.weight.grad)
    try:
        return mod.dense_weight()
    finally:
        mod.weight.data.copy_(saved)


def test_masked_gradient_is_zero_and_enforce_mask_restores_zeros():
    layer = grouped_layer(8, 16, 4, 4)
    for kernel in ("dense", "grouped"):
        mod = FPELinear(layer.weight, layer.bias, layer.mask, alpha=4, group_size=4, kernel=kernel)
        mod(torch.randn(5, 16)).sum().backward()
        assert not mod.weight.grad[~mod.mask].any()
        opt = torch.optim.SGD(mod.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            mod(torch.randn(5, 16)).sum().backward()
            opt.step()
            mod.enforce_mask()
        assert not mod.dense_weight()[~layer.mask].any()


def test_group_layout_detects_shared_splits_only():
    shared = grouped_layer(8, 16, 2, 4, prune_frac=0.0)
    assert group_layout(shared.mask, 2, 4) is not None
    assert group_layout(shared.mask, 2, 8) is None  # two groups do not share one partition
    structured = split_rows(Layer("w", torch.randn(6, 12)), LayerPlan("w", 3, "structured", plan_structured(torch.ones(6, 12, dtype=torch.bool), 3)))
    assert group_layout(structured.mask, 3, 6) is not None
    per_edge = expand_mlp(MLP([Layer("a", torch.randn(16, 32)), Layer("b", torch.randn(3, 16))]), [Target(0, 4)], seed=0).mlp
    assert group_layout(per_edge.layers[0].mask, 4, 16) is None  # the paper's per-edge random split
    with pytest.raises(ValueError):
        FPELinear(per_edge.layers[0].weight, None, per_edge.layers[0].mask, alpha=4, group_size=16, kernel="grouped")


def test_finetune_uses_the_grouped_kernel_and_matches_the_dense_kernel():
    """A --group-size expansion trains as compact blocks and lands where the dense kernel does."""
    import json

    from fpe_cli.data import from_arrays
    from fpe_cli.expand import PlanInputs
    from fpe_cli.train import TrainConfig, build_module, fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    data = from_arrays("toy", {"x_train": x[:64].numpy(), "y_train": y[:64].numpy(),
                               "x_test": x[64:].numpy(), "y_test": y[64:].numpy()}, 2)
    dense = MLP([Layer("0.weight", torch.randn(8, 12, generator=g), "0.bias", torch.zeros(8)),
                 Layer("2.weight", torch.randn(2, 8, generator=g), "2.bias", torch.zeros(2))])
    expanded = expand_mlp(dense, [Target(0, 2)], seed=0, inputs=PlanInputs(group_size=4)).mlp
    expanded.metadata["fpe.settings"] = json.dumps({"group_size": 4})
    assert build_module(expanded).index[0] is not None  # the grouped kernel is in use
    cfg = TrainConfig(epochs=3, lr=1e-2, batch_size=16, optimizer="adam", seed=0)
    grouped, _ = fit(expanded, data, cfg)
    plain = expanded.copy()
    plain.metadata = {}
    assert build_module(plain).index[0] is None
    reference, _ = fit(plain, data, cfg)
    for a, b in zip(grouped.layers, reference.layers):
        torch.testing.assert_close(a.weight, b.weight, atol=1e-5, rtol=1e-4)
        assert not a.weight[~a.mask].any()


@pytest.mark.parametrize("group_size", [None, 4])
def test_kernel_mlp_matches_the_masked_dense_forward(group_size):
    """KernelMLP (the forward of finetune, evaluate and analyze) against model.forward / hidden_activations."""
    import json

    from fpe_cli.expand import PlanInputs
    from fpe_cli.layers import KernelMLP
    from fpe_cli.model import forward, hidden_activations

    g = torch.Generator().manual_seed(2)
    dense = MLP([Layer("0.weight", torch.randn(8, 12, generator=g), "0.bias", torch.randn(8, generator=g)),
                 Layer("2.weight", torch.randn(8, 8, generator=g)),
                 Layer("4.weight", torch.randn(3, 8, generator=g), "4.bias", torch.randn(3, generator=g))])
    expanded = expand_mlp(dense, [Target(0, 2), Target(1, 2)], seed=0, inputs=PlanInputs(group_size=group_size)).mlp
    if group_size:
        expanded.metadata["fpe.settings"] = json.dumps({"group_size": group_size})
    module = KernelMLP(expanded)
    assert module.kernels == (["grouped", "grouped", "dense"] if group_size else ["dense"] * 3)
    assert not list(module.buffers())  # without keep_masks nothing but the kernel weights is held
    x = torch.randn(7, 12, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(module(x), forward(expanded, x), **TOL[torch.float32])
        for fast, ref in zip(module.hidden_activations(x.double()), hidden_activations(expanded, x), strict=True):
            assert fast.dtype == torch.float32
            torch.testing.assert_close(fast, ref, **TOL[torch.float32])


def test_small_groups_keep_the_dense_kernel(monkeypatch):
    """Below layers.MIN_GROUP parents per group the grouped kernel is slower (many tiny matmuls):
    KernelMLP keeps the dense kernel; at or above it, the grouped one. Same function either way."""
    import json

    import fpe_cli.layers as L
    from fpe_cli.expand import PlanInputs, Target, expand_mlp
    from fpe_cli.model import MLP, Layer, forward

    monkeypatch.setattr(L, "MIN_GROUP", 64)
    g = torch.Generator().manual_seed(0)
    src = MLP([Layer("0.weight", torch.randn(128, 16, generator=g), "0.bias", torch.zeros(128)),
               Layer("2.weight", torch.randn(3, 128, generator=g), "2.bias", torch.zeros(3))])
    x = torch.randn(4, 16, generator=g)
    for group, kernel in ((32, "dense"), (64, "grouped"), (128, "grouped")):
        mlp = expand_mlp(src, [Target(0, 2)], inputs=PlanInputs(group_size=group)).mlp
        mlp.metadata["fpe.settings"] = json.dumps({"group_size": group})
        module = L.KernelMLP(mlp)
        assert module.kernels[0] == kernel, group
        torch.testing.assert_close(module(x), forward(mlp, x), rtol=1e-5, atol=1e-5)
