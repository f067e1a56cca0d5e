"""`--outgoing tie`: children's outgoing copies stay one shared parameter.

Checked against plain references written here: the tied expansion holds exactly the tensors of the
unpruned copy expansion; the fast kernels (sibling sum, then the parent's column once) compute the
masked-dense forward of the stored copies and the gradient of the shared parameter is the sum of the
copies' gradients; the budget holds without pruning; files, fine-tuning and verify keep the tie.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from conftest import assert_one_error_line, run_cli, save_mlp
from fpe_cli.checkpoint import load_checkpoint
from fpe_cli.expand import PlanInputs, Target, expand_mlp
from fpe_cli.layers import KernelMLP
from fpe_cli.model import MLP, Layer, forward
from fpe_cli.train import MaskedMLP, TrainConfig, fit
from fpe_cli.data import from_arrays
from fpe_cli.verify import check_invariants

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_mlp(widths, *, dtype=torch.float32, seed=0) -> MLP:
    g = torch.Generator().manual_seed(seed)
    return MLP([Layer(f"{2 * k}.weight", torch.randn(h, d, generator=g).to(dtype), f"{2 * k}.bias",
                      torch.randn(h, generator=g).to(dtype)) for k, (d, h) in enumerate(zip(widths, widths[1:]))])


def with_group_size(mlp: MLP, group_size: int | None) -> MLP:
    if group_size:
        mlp.metadata["fpe.settings"] = json.dumps({"group_size": group_size})
    return mlp


def reference_forward(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """Masked dense on the stored (widened) copies: the oracle, no sibling sums."""
    h = x
    for i, layer in enumerate(mlp.layers):
        h = torch.nn.functional.linear(h, (layer.weight * layer.mask).float(), layer.bias.float())
        h = torch.relu(h) if i < len(mlp.layers) - 1 else h
    return h


# ---------------------------------------------------------------- the expansion


@pytest.mark.parametrize("dtype", DTYPES)
def test_tied_expansion_is_the_unpruned_copy_expansion_with_ties(dtype):
    src = random_mlp([10, 6, 5, 3], dtype=dtype, seed=1)
    for targets in ([Target(0, 3, "random")], [Target(1, 2, "random")]):
        copy = expand_mlp(src, targets, seed=4, outgoing="copy", prune=False)
        tied = expand_mlp(src, targets, seed=4, outgoing="tie")
        for a, b in zip(tied.mlp.layers, copy.mlp.layers):
            assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8))
            assert torch.equal(a.mask, b.mask)
        k = targets[0].index
        assert [layer.tied is not None for layer in tied.mlp.layers] == [i == k + 1 for i in range(3)]
        assert tied.mlp.layers[k + 1].tied.tolist() == torch.arange([6, 5][k]).repeat_interleave([3, 2][k]).tolist()
        assert tied.pruned == [0, 0, 0] and tied.after == tied.before and sum(tied.after) == tied.budget
        assert check_invariants(tied.mlp, tied.budget, src) == []
    # consecutive targets: layer 1 is split (rows) and tied (columns: layer 0's children)
    tied = expand_mlp(src, [Target(0, 3), Target(1, 2)], seed=4, outgoing="tie")
    assert tied.mlp.layers[0].tied is None
    assert tied.mlp.layers[1].tied.tolist() == torch.arange(6).repeat_interleave(3).tolist()
    assert tied.mlp.layers[2].tied.tolist() == torch.arange(5).repeat_interleave(2).tolist()
    assert sum(tied.after) == tied.budget and check_invariants(tied.mlp, tied.budget, src) == []


def test_deep_tied_layer_is_split_by_whole_tied_groups():
    """The next target's plan treats a group of tied copies as one edge: one child owns all copies."""
    src = random_mlp([8, 6, 6, 2], seed=3)
    res = expand_mlp(src, [Target(0, 2), Target(1, 3)], seed=0, outgoing="tie")
    layer = res.mlp.layers[1]  # rows: children of target 1; columns: tied copies of target 0's children
    groups = layer.mask.view(layer.out_features, 6, 2)  # (rows, parent columns, copies)
    assert torch.equal(groups[..., 0], groups[..., 1])


def test_applied_plan_that_splits_a_tied_group_is_refused():
    src = random_mlp([8, 6, 6, 2], seed=3)
    res = expand_mlp(src, [Target(0, 2), Target(1, 3)], seed=0, outgoing="tie")
    again = expand_mlp(src, [Target(0, 2), Target(1, 3)], outgoing="tie", plan=res.plan)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(again.mlp.layers, res.mlp.layers))
    broken = res.plan
    child = broken.layers[1].child
    child[0, 0], child[0, 1] = 0, 1  # the two copies of column 0 to different children
    child[0, 2:] = 2
    with pytest.raises(Exception, match="tied column"):
        expand_mlp(src, [Target(0, 2), Target(1, 3)], outgoing="tie", plan=broken)


def test_re_expanding_a_tied_model_is_refused():
    src = random_mlp([8, 6, 2])
    res = expand_mlp(src, [Target(0, 2)], outgoing="tie")
    with pytest.raises(Exception, match="already has tied columns"):
        expand_mlp(res.mlp, [Target(0, 2)])


# ---------------------------------------------------------------- the kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 3])
@pytest.mark.parametrize("top", [None, 0.5])
def test_kernels_match_the_masked_dense_oracle_forward_and_backward(group_size, top, dtype):
    src = random_mlp([12, 6, 6, 4], seed=5, dtype=dtype)
    res = expand_mlp(src, [Target(0, 2, top=top), Target(1, 2)], seed=2, outgoing="tie",
                     inputs=PlanInputs(group_size=group_size))
    mlp = with_group_size(res.mlp, group_size)
    module = MaskedMLP(mlp)
    if group_size and top is None:
        assert module.kernels[:2] == ["grouped", "grouped"]  # the fast path, not a silent fallback
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(module(x), reference_forward(mlp, x), rtol=1e-5, atol=1e-5)

    # gradient of each shared parameter == sum over its copies of the widened weight's gradient
    widened = [(layer.weight * layer.mask).float().requires_grad_(True) for layer in mlp.layers]
    h = x
    for i, (w, layer) in enumerate(zip(widened, mlp.layers)):
        h = torch.nn.functional.linear(h, w, layer.bias.float())
        h = torch.relu(h) if i < 2 else h
    h.square().sum().backward()
    module(x).square().sum().backward()
    for i, (w, layer) in enumerate(zip(widened, mlp.layers)):
        grad = w.grad * layer.mask
        if layer.tied is not None:
            n = int(layer.tied[-1]) + 1
            grad = torch.zeros(layer.out_features, n).index_add_(1, layer.tied, grad)
        got = module.weights[i].grad * getattr(module, f"mask{i}")  # on-mask entries (no locking hooks here)
        if module.index[i] is not None:  # grouped blocks: compare through the dense layout
            from fpe_cli.layers import from_blocks
            got = from_blocks(got, getattr(module, f"mask{i}"), module.index[i], grad.shape[1])
        torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-5)


def test_fine_tuning_keeps_the_copies_tied():
    src = random_mlp([10, 8, 3], seed=7)
    res = expand_mlp(src, [Target(0, 4)], seed=1, outgoing="tie", inputs=PlanInputs(group_size=4))
    g = torch.Generator().manual_seed(0)
    data = from_arrays("toy", {"x_train": torch.randn(64, 10, generator=g).numpy(),
                               "y_train": torch.randint(0, 3, (64,), generator=g).numpy(),
                               "x_test": torch.randn(16, 10, generator=g).numpy(),
                               "y_test": torch.randint(0, 3, (16,), generator=g).numpy()})
    tuned, _ = fit(with_group_size(res.mlp, 4), data, TrainConfig(epochs=3, lr=0.05, batch_size=16, seed=0))
    assert check_invariants(tuned, res.budget, src) == []
    assert not torch.equal(tuned.layers[1].weight, res.mlp.layers[1].weight)  # it did train
    x = torch.randn(5, 10, generator=g)
    torch.testing.assert_close(KernelMLP(tuned)(x), forward(tuned, x), rtol=1e-5, atol=1e-5)


@settings(max_examples=30)
@given(depth=st.integers(1, 3), alpha=st.integers(2, 4), width=st.integers(4, 7), dtype=st.sampled_from(DTYPES),
       top=st.sampled_from([None, 0.5]), group=st.sampled_from([None, 2]), seed=st.integers(0, 2**16))
def test_properties(depth, alpha, width, dtype, top, group, seed):
    src = random_mlp([width] * (depth + 1) + [3], dtype=dtype, seed=seed)
    targets = [Target(k, alpha, "random", top) for k in range(depth)]
    res = expand_mlp(src, targets, seed=seed, outgoing="tie", inputs=PlanInputs(group_size=group))
    assert sum(res.after) == res.budget == src.weight_budget()
    assert check_invariants(res.mlp, res.budget, src) == []
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(seed))
    mlp = with_group_size(res.mlp, group)
    torch.testing.assert_close(KernelMLP(mlp)(x), reference_forward(mlp, x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- files and commands


@pytest.mark.parametrize("layout", ["packed", "dense"])
def test_files_keep_the_tie_and_dense_loads_into_plain_torch(tmp_path, layout):
    src = save_mlp(tmp_path / "m.safetensors", [12, 8, 4], seed=2)
    out = tmp_path / "t.safetensors"
    res = run_cli(["expand", src, "--alpha", "4", "--outgoing", "tie", "--group-size", "4", "--layout", layout,
                   "-o", out, "--json"])
    assert res.exit_code == 0, res.stderr
    doc = res.json()
    assert doc["budget_holds"] and doc["weights_after"] == doc["budget"] == 12 * 8 + 8 * 4
    assert [layer["pruned"] for layer in doc["layers"]] == [0, 0]
    ckpt = load_checkpoint(out)
    assert ckpt.mlp.layers[0].tied is None and ckpt.mlp.layers[1].tied.tolist() == torch.arange(8).repeat_interleave(4).tolist()
    tensors = load_file(str(out))
    assert tensors["fpe.tied:2.weight"].tolist() == [4] * 8
    assert ckpt.metadata["fpe.format_version"] == {"dense": "2", "packed": "3"}[layout]  # packed: compressed masks
    if layout == "packed":  # each shared column stored once
        assert tensors["fpe.shape:2.weight"].tolist() == [4, 8] and tensors["fpe.values:2.weight"].numel() == 32
    params = run_cli(["params", out, "--json"]).json()
    assert [layer["tied"] for layer in params["layers"]] == [False, True]
    assert "tied columns (each copy group is one weight, counted once): 2.weight" in run_cli(["params", out]).stdout
    assert params["total"]["weights"] == doc["budget"] and params["budget_holds"]
    assert run_cli(["verify", out, "--source", src]).exit_code == 0
    if layout == "dense":
        tensors = load_file(str(out))
        net = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        net.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("fpe.")})
        x = torch.randn(6, 12)
        torch.testing.assert_close(net(x), KernelMLP(ckpt.mlp)(x), rtol=1e-5, atol=1e-5)


def test_verify_flags_copies_that_differ_and_training_refuses_them(tmp_path):
    src = save_mlp(tmp_path / "m.safetensors", [64, 8, 10], seed=2)
    out = tmp_path / "t.safetensors"
    assert run_cli(["expand", src, "--alpha", "2", "--outgoing", "tie", "--layout", "dense", "-o", out]).exit_code == 0
    tensors = load_file(str(out))
    from safetensors import safe_open
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    tensors["2.weight"][0, 0] += 1.0  # one copy edited: no longer one parameter
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=meta)
    res = run_cli(["verify", str(edited)])
    assert res.exit_code == 3 and "2.weight" in res.stderr and "tied" in res.stderr
    res = run_cli(["evaluate", str(edited), "--data", "digits:test=0.25"])
    assert res.exit_code == 2 and "tied column copies differ" in res.stderr
    res = run_cli(["convert", str(edited), "--layout", "packed", "-o", tmp_path / "p.safetensors"])
    assert res.exit_code == 3 and "not be lossless" in res.stderr and not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("layout", ["packed", "dense"])
@pytest.mark.parametrize("breakage", ["counts", "dtype", "key", "lineage"])
def test_broken_tie_tensors_are_one_clear_error(tmp_path, layout, breakage):
    src = save_mlp(tmp_path / "m.safetensors", [12, 8, 4], seed=2)
    out = tmp_path / "t.safetensors"
    assert run_cli(["expand", src, "--alpha", "2", "--outgoing", "tie", "--layout", layout, "-o", out]).exit_code == 0
    from safetensors import safe_open
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(out))
    counts = tensors.pop("fpe.tied:2.weight")
    if breakage == "counts":  # copies that do not add up to the weight's inputs
        tensors["fpe.tied:2.weight"] = torch.tensor([3] + [2] * 7, dtype=torch.int32)
    elif breakage == "dtype":
        tensors["fpe.tied:2.weight"] = counts.to(torch.float32)
    elif breakage == "key":  # ties a weight that is not in the file
        tensors["fpe.tied:9.weight"] = counts
    else:  # groups that are not the previous layer's children
        tensors["fpe.tied:2.weight"] = counts
        tensors["fpe.children:0.weight"] = torch.tensor([1, 3] + [2] * 6, dtype=torch.int32)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert_one_error_line(run_cli(["params", str(bad)]), "tied")


def test_expanding_a_tied_file_again_is_refused(tmp_path):
    src = save_mlp(tmp_path / "m.safetensors", [12, 8, 4], seed=2)
    out = tmp_path / "t.safetensors"
    assert run_cli(["expand", src, "--alpha", "2", "--outgoing", "tie", "-o", out]).exit_code == 0
    res = run_cli(["expand", out, "--alpha", "2", "-o", tmp_path / "again.safetensors"])
    assert_one_error_line(res, "already has tied columns")
    assert not (tmp_path / "again.safetensors").exists()


@pytest.mark.parametrize("split, group_size", [("structured", None), ("random", 1024)])
def test_splits_shared_by_every_parent_run_grouped(split, group_size):
    """`structured` records no group size and `--group-size 1024` exceeds 6 parents: one group of all."""
    src = random_mlp([12, 6, 4], seed=1)
    res = expand_mlp(src, [Target(0, 3, split)], outgoing="tie", inputs=PlanInputs(group_size=group_size))
    mlp = with_group_size(res.mlp, group_size)
    module = KernelMLP(mlp)
    assert module.kernels == ["grouped", "dense"]
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(module(x), reference_forward(mlp, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "dense"])
def test_params_counts_a_tied_layer_on_its_parameter_matrix(tmp_path, layout):
    src = save_mlp(tmp_path / "m.safetensors", [12, 8, 4], seed=2)
    out = tmp_path / "t.safetensors"
    assert run_cli(["expand", src, "--alpha", "4", "--outgoing", "tie", "-o", out, "--layout", layout]).exit_code == 0
    doc = json.loads(run_cli(["params", out, "--json"]).stdout)
    tied = doc["layers"][1]
    weight = load_checkpoint(out).mlp.layers[1].weight  # (4, 32): 8 parents' columns, 4 copies each
    parameter = weight[:, ::4]  # first copy of each parent's column
    assert tied["tied"] and tied["stored_elements"] == parameter.numel() == 32
    assert tied["weights"] == tied["nonzero_weights"] == int((parameter != 0).sum())
    assert tied["sparsity"] == pytest.approx(1 - tied["weights"] / 32)
    assert doc["total"]["nonzero_weights"] == doc["total"]["weights"] == doc["source"]["weights"]
