"""A matrix of checkpoints saved the way users' own PyTorch code saves them, each run through the whole
workflow of the real CLI (inspect, expand, verify --source, params, convert round trip, and on digits-shaped
models finetune, evaluate and analyze); checkpoints fpe must refuse get exit 2 and one `Error:` line.

Oracles are computed here from the tensors (torch/safetensors), never from fpe's output: the chain's order,
the source's non-zero weight count, the widened shapes and the dtypes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from torch.nn.utils import prune

from conftest import assert_one_error_line, run_cli

# torch.compile imports torch.jit internals that warn about themselves; nothing of fpe's
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

# ---------------------------------------------------------------- modules as users write them


class FC3(nn.Module):
    """The classic custom MLP: fc1/fc2/fc3."""

    def __init__(self, d=64, h1=8, h2=6, out=10):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, h1), nn.Linear(h1, h2), nn.Linear(h2, out)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Layers(nn.Module):
    """`self.layers = nn.ModuleList(...)`, deep enough that `layers.10` must follow `layers.9`."""

    def __init__(self, widths):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))


class Holder(nn.Module):
    """Wraps a module under an attribute name: `net`, `mlp`, `model` (Lightning), `module` (DDP)."""

    def __init__(self, **children):
        super().__init__()
        for name, mod in children.items():
            setattr(self, name, mod)


class LitLike(nn.Module):
    """A LightningModule-style wrapper: `self.model` plus a global-step int64 scalar buffer; the MLP has a
    BatchNorm1d at its *input* width (normalizes raw features), which the README keeps outside the chain."""

    def __init__(self):
        super().__init__()
        self.model = Holder(bn_in=nn.BatchNorm1d(64), fc1=nn.Linear(64, 8), fc2=nn.Linear(8, 10))
        self.register_buffer("step", torch.tensor(1234, dtype=torch.int64))


class Aliased(nn.Module):
    """`self.classifier = self.fc2`: the same Linear registered under two names (a shared tensor)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 8)
        self.fc2 = nn.Linear(8, 10)
        self.classifier = self.fc2


class Kernels(nn.Module):
    """Weights kept as (in, out) Parameters, as in hand-written `x @ W + b` code."""

    def __init__(self):
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(64, 8) * 0.1)
        self.W2 = nn.Parameter(torch.randn(8, 10) * 0.1)


def seq(widths, *, bias=True, dropout=False, dtype=torch.float32):
    mods = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        mods.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            mods += [nn.ReLU(), nn.Dropout(0.1)] if dropout else [nn.ReLU()]
    return nn.Sequential(*mods).to(dtype)


def sd(module):
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- builders: write m.safetensors the user's way


def b_seq_dropout(p):  # Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear: keys 0, 3, 6
    save_file(seq([64, 6, 5, 10], dropout=True).state_dict(), str(p))


def b_seq_no_bias(p):
    save_file(seq([64, 8, 10], bias=False).state_dict(), str(p))


def b_fc123(p):
    save_file(FC3().state_dict(), str(p))


def b_modulelist_12(p):  # 12 layers: natural order (layers.10 after layers.9), all hidden widths equal
    save_file(Layers([6] + [4] * 11 + [3]).state_dict(), str(p))


def b_net_n(p):
    save_file(Holder(net=seq([64, 8, 10])).state_dict(), str(p))


def b_nested_model_mlp(p):
    save_file(Holder(model=Holder(mlp=seq([64, 8, 6, 10]))).state_dict(), str(p))


def b_ddp_module_prefix(p):  # DistributedDataParallel(model).state_dict(): `module.` prefix
    save_file(Holder(module=seq([64, 8, 10])).state_dict(), str(p))


def b_compile_orig_mod(p):  # torch.compile(model).state_dict(): `_orig_mod.` prefix
    compiled = torch.compile(FC3())
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    save_file(sd(compiled), str(p))


def b_lightning_step_input_bn(p):
    m = LitLike()
    m.train()
    with torch.no_grad():  # one training-mode pass so the running statistics are real
        m.model.bn_in(torch.rand(32, 64) * 3)
    save_file(sd(m), str(p))


def b_seq_input_batchnorm(p):  # BatchNorm1d over the 64 raw features, first in the Sequential
    save_file(sd(nn.Sequential(nn.BatchNorm1d(64), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))), str(p))


def b_seq_output_layernorm(p):  # LayerNorm on the logits (output width), last in the Sequential
    save_file(sd(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10), nn.LayerNorm(10))), str(p))


def b_save_model(p):  # safetensors.torch.save_model instead of save_file
    save_model(FC3(), str(p))


def b_dtype(dtype):
    def build(p):
        save_file(seq([64, 8, 10], dtype=dtype).state_dict(), str(p))
    return build


def b_two_layer(p):
    save_file(seq([12, 5, 3]).state_dict(), str(p))


def b_four_layer(p):
    save_file(seq([64, 8, 8, 6, 10]).state_dict(), str(p))


def b_width_1(p):
    save_file(seq([64, 1, 10]).state_dict(), str(p))


def b_width_1_then_2(p):  # the second hidden layer has fan-in 1 in the source (alpha after widening)
    save_file(seq([64, 1, 2, 10]).state_dict(), str(p))


def b_alpha_gt_fan_in(p):
    save_file(seq([3, 4, 2]).state_dict(), str(p))


def b_user_pruned(p):  # torch.nn.utils.prune + prune.remove: exact zeros, which are not weights
    m = seq([64, 8, 10])
    for lin in (m[0], m[2]):
        prune.l1_unstructured(lin, "weight", amount=0.4)
        prune.remove(lin, "weight")
    assert int((m[0].weight != 0).sum(1).min()) >= 4  # every parent keeps >= alpha edges
    save_file(sd(m), str(p))


def b_pruned_not_removed(p):
    m = seq([64, 8, 10])
    prune.l1_unstructured(m[0], "weight", amount=0.4)
    save_file(sd(m), str(p))


def b_weight_norm(p):
    m = FC3()
    torch.nn.utils.parametrizations.weight_norm(m.fc1)
    save_file(sd(m), str(p))


def b_extras(p):  # an embedding and a second head beside the MLP
    save_file({"emb.weight": torch.randn(100, 64), "fc1.weight": torch.randn(8, 64), "fc1.bias": torch.randn(8),
               "fc2.weight": torch.randn(10, 8), "fc2.bias": torch.randn(10),
               "head.weight": torch.randn(5, 8), "head.bias": torch.randn(5)}, str(p))


def b_alias_save_model(p):  # save_model drops one of the shared names (keeps `classifier`) and records it
    save_model(Aliased(), str(p))


def b_alias_cloned(p):  # the shared tensor saved under both names (save_file after .clone())
    save_file(sd(Aliased()), str(p))


def b_reused_layer_save_model(p):  # one Linear used twice in a Sequential; save_model stores it once
    shared = nn.Linear(8, 8)
    save_model(nn.Sequential(nn.Linear(64, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 10)), str(p))


def b_transposed_contiguous(p):  # (in, out) kernels saved as nn.Linear's (out, in): W.t().contiguous()
    m = Kernels()
    save_file({"fc1.weight": m.W1.detach().t().contiguous(), "fc1.bias": torch.zeros(8),
               "fc2.weight": m.W2.detach().t().contiguous(), "fc2.bias": torch.zeros(10)}, str(p))


def b_noncontiguous_params(p):  # nn.Linear whose weight Parameter is a transposed (non-contiguous) view
    m = FC3()
    for lin in (m.fc1, m.fc2, m.fc3):
        lin.weight = nn.Parameter(lin.weight.detach().t().contiguous().t())
        assert not lin.weight.is_contiguous()
    save_model(m, str(p))  # force_contiguous=True (the default) copies them


def b_kernels_not_transposed(p):  # (in, out) saved as is under nn.Linear names
    m = Kernels()
    save_file({"fc1.weight": m.W1.detach().contiguous(), "fc2.weight": m.W2.detach().contiguous()}, str(p))


def b_metadata_user(p):
    save_file(seq([64, 8, 10]).state_dict(), str(p), metadata={
        "format": "pt", "author": "me", "epoch": "12", "note": "trained on digits, lr=1e-3",
        "config": json.dumps({"hidden": [8], "dropout": 0.1})})


def b_metadata_activation(p):
    save_file(seq([64, 8, 10]).state_dict(), str(p), metadata={"format": "pt", "activation": "nn.Tanh()"})


def b_metadata_unknown_activation(p):
    save_file(seq([64, 8, 10]).state_dict(), str(p), metadata={"activation": "Softplus"})


def b_w1_b1(p):
    torch.manual_seed(3)
    save_file({"W1": torch.randn(8, 64), "b1": torch.randn(8), "W2": torch.randn(10, 8), "b2": torch.randn(10)}, str(p))


def b_mixed_bias(p):
    save_file(Holder(fc1=nn.Linear(64, 8, bias=False), fc2=nn.Linear(8, 10)).state_dict(), str(p))


def b_word_names(p):
    save_file(Holder(fc_in=nn.Linear(64, 8), fc_hidden=nn.Linear(8, 6), fc_out=nn.Linear(6, 10)).state_dict(), str(p))


def b_hidden_batchnorm(p):
    save_file(sd(nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))), str(p))


def b_hidden_layernorm(p):
    save_file(Holder(fc1=nn.Linear(64, 8), ln1=nn.LayerNorm(8), fc2=nn.Linear(8, 10)).state_dict(), str(p))


def b_prelu(p):
    save_file(nn.Sequential(nn.Linear(64, 8), nn.PReLU(), nn.Linear(8, 10)).state_dict(), str(p))


def b_ema_copy(p):
    save_file(sd(Holder(model=seq([64, 8, 10]), ema=seq([64, 8, 10]))), str(p))


def b_single_linear(p):
    save_file(nn.Linear(64, 10).state_dict(), str(p))


def b_feature_buffers(p):  # input normalization buffers and class weights registered on the module
    m = FC3()
    m.register_buffer("x_mean", torch.rand(64))
    m.register_buffer("x_std", torch.rand(64) + 0.5)
    m.register_buffer("class_weights", torch.ones(10))
    save_file(sd(m), str(p))


def b_sequential_of_blocks(p):  # nn.Sequential(block, block, block, head), block = Sequential(Linear, ReLU, Dropout)
    def block(a, b):
        return nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.1))
    save_file(nn.Sequential(block(64, 8), block(8, 8), block(8, 8), nn.Linear(8, 10)).state_dict(), str(p))


def b_hidden_list_plus_out(p):  # self.hidden = ModuleList([...]); self.out = Linear
    save_file(Holder(hidden=nn.ModuleList([nn.Linear(64, 8), nn.Linear(8, 8)]), out=nn.Linear(8, 10)).state_dict(), str(p))


def b_gpt_style_names(p):  # mlp.c_fc / mlp.c_proj as in GPT-2 code, beside a 0-D logit scale
    m = Holder(mlp=Holder(c_fc=nn.Linear(64, 16), c_proj=nn.Linear(16, 10)))
    m.register_parameter("logit_scale", nn.Parameter(torch.tensor(2.0)))
    save_file(sd(m), str(p))


def b_loss_module_and_scalars(p):  # a weighted loss registered on the model, a 0-D temperature, an int step
    m = Holder(net=seq([64, 8, 10]), loss=nn.CrossEntropyLoss(weight=torch.rand(10)),
               bce=nn.BCEWithLogitsLoss(pos_weight=torch.rand(10)))
    m.register_buffer("temperature", torch.tensor(0.7))
    m.register_buffer("global_step", torch.tensor(99, dtype=torch.int64))
    save_file(sd(m), str(p))


def b_mixed_dtypes(p):  # first layer float32, head cast to float16; bfloat16 weight with a float32 bias
    state = sd(FC3())
    state["fc3.weight"], state["fc3.bias"] = state["fc3.weight"].half(), state["fc3.bias"].half()
    state["fc2.weight"] = state["fc2.weight"].bfloat16()
    save_file(state, str(p))


def b_bias_row_vector(p):  # hand-written `x @ W.T + b` with b = Parameter(torch.zeros(1, out))
    save_file({"W1": torch.randn(8, 64), "b1": torch.zeros(1, 8), "W2": torch.randn(10, 8), "b2": torch.zeros(1, 10)},
              str(p))


def b_safetensors_named_pt(p):  # safetensors content under a .pt name (read whatever its name)
    save_file(FC3().state_dict(), str(p))


def b_torch_save(p):
    torch.save(FC3().state_dict(), str(p))


def b_newer_dtype_extras(p):  # quantization scales and id buffers in the dtypes newer safetensors writes
    save_file(sd(FC3()) | {"act_scale": torch.ones(4).to(torch.float8_e4m3fn), "token_ids": torch.arange(5).to(torch.uint16),
                           "offsets": torch.zeros(2, dtype=torch.uint32), "hash": torch.zeros(1, dtype=torch.uint64),
                           "grad_scale": torch.ones(1).to(torch.float8_e5m2)}, str(p))


def b_float8_weights(p):  # an fp8-quantized checkpoint: the weights themselves are float8
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in sd(FC3()).items()}, str(p))


def b_int8_weights(p):
    save_file({k: (v * 127).round().to(torch.int8) for k, v in sd(FC3()).items()}, str(p))


def b_float8_bias(p):  # float32 weights, one bias stored in float8
    save_file(sd(FC3()) | {"fc1.bias": FC3().fc1.bias.detach().to(torch.float8_e4m3fn)}, str(p))


def b_uint16_bias(p):
    save_file(sd(FC3()) | {"fc2.bias": torch.arange(6).to(torch.uint16)}, str(p))


# ---------------------------------------------------------------- the matrix


@dataclass
class Case:
    id: str
    build: Callable[[Path], None]
    chain: list[str] = field(default_factory=list)  # expected chain, in order (empty: refused)
    alpha: int = 2
    layers: str | None = None                          # --layers for every command
    refuse: tuple[str, ...] = ()                       # needles of the one Error: line (exit 2)
    refuse_cmd: str = "inspect"                        # the command that must refuse (expand is always checked too)
    filename: str = "m.safetensors"
    activation: str = "relu"
    unused: tuple[str, ...] = ()                       # tensors beside the chain, never written to outputs


SEQ2 = ["0.weight", "2.weight"]
FC = ["fc1.weight", "fc2.weight", "fc3.weight"]

OK_CASES = [
    Case("seq_dropout_0_3_6", b_seq_dropout, ["0.weight", "3.weight", "6.weight"], alpha=4),
    Case("seq_no_bias", b_seq_no_bias, SEQ2, alpha=4),
    Case("custom_fc1_fc2_fc3", b_fc123, FC),
    Case("modulelist_layers_0_to_11", b_modulelist_12, [f"layers.{i}.weight" for i in range(12)]),
    Case("net_N", b_net_n, ["net.0.weight", "net.2.weight"]),
    Case("nested_model_mlp_N", b_nested_model_mlp, ["model.mlp.0.weight", "model.mlp.2.weight", "model.mlp.4.weight"]),
    Case("ddp_module_prefix", b_ddp_module_prefix, ["module.0.weight", "module.2.weight"], alpha=4),
    Case("torch_compile_orig_mod", b_compile_orig_mod, [f"_orig_mod.{k}" for k in FC]),
    Case("lightning_model_prefix_step_input_batchnorm", b_lightning_step_input_bn,
         ["model.fc1.weight", "model.fc2.weight"],
         unused=("model.bn_in.bias", "model.bn_in.num_batches_tracked", "model.bn_in.running_mean",
                 "model.bn_in.running_var", "model.bn_in.weight", "step")),
    # README (File formats): a normalization layer at the input or output width is outside the chain
    Case("sequential_input_batchnorm", b_seq_input_batchnorm, ["1.weight", "3.weight"],
         unused=("0.bias", "0.num_batches_tracked", "0.running_mean", "0.running_var", "0.weight")),
    Case("sequential_output_layernorm", b_seq_output_layernorm, SEQ2, unused=("3.bias", "3.weight")),
    Case("safetensors_save_model", b_save_model, FC),
    Case("float16", b_dtype(torch.float16), SEQ2, alpha=4),
    Case("bfloat16", b_dtype(torch.bfloat16), SEQ2, alpha=4),
    Case("float64", b_dtype(torch.float64), SEQ2, alpha=4),
    Case("two_layer_12_5_3", b_two_layer, SEQ2, alpha=3),
    Case("four_layer", b_four_layer, ["0.weight", "2.weight", "4.weight", "6.weight"]),
    Case("hidden_width_1_alpha_4", b_width_1, SEQ2, alpha=4),
    Case("hidden_widths_1_2_alpha_4", b_width_1_then_2, ["0.weight", "2.weight", "4.weight"], alpha=4),
    Case("user_pruned_exact_zeros", b_user_pruned, SEQ2, alpha=4),
    Case("extras_with_layers_flag", b_extras, ["fc1.weight", "fc2.weight"], layers="fc1,fc2",
         unused=("emb.weight", "head.bias", "head.weight")),
    Case("alias_saved_by_save_model", b_alias_save_model, ["fc1.weight", "classifier.weight"]),
    Case("transposed_kernels_saved_contiguous", b_transposed_contiguous, ["fc1.weight", "fc2.weight"]),
    Case("noncontiguous_params_save_model", b_noncontiguous_params, FC),
    Case("metadata_format_pt_and_user_keys", b_metadata_user, SEQ2),
    Case("metadata_activation_tanh", b_metadata_activation, SEQ2, activation="tanh"),
    Case("W1_b1_names", b_w1_b1, ["W1", "W2"]),
    Case("mixed_bias", b_mixed_bias, ["fc1.weight", "fc2.weight"]),
    Case("word_names_distinct_shapes", b_word_names, ["fc_in.weight", "fc_hidden.weight", "fc_out.weight"]),
    Case("feature_buffers_beside_mlp", b_feature_buffers, FC, unused=("class_weights", "x_mean", "x_std")),
    Case("safetensors_content_named_pt", b_safetensors_named_pt, FC, filename="model.pt"),
    Case("sequential_of_blocks", b_sequential_of_blocks, ["0.0.weight", "1.0.weight", "2.0.weight", "3.weight"]),
    Case("modulelist_hidden_plus_out", b_hidden_list_plus_out, ["hidden.0.weight", "hidden.1.weight", "out.weight"]),
    Case("gpt_style_c_fc_c_proj", b_gpt_style_names, ["mlp.c_fc.weight", "mlp.c_proj.weight"], alpha=8,
         unused=("logit_scale",)),
    Case("loss_module_weights_and_scalars", b_loss_module_and_scalars, ["net.0.weight", "net.2.weight"],
         unused=("bce.pos_weight", "global_step", "loss.weight", "temperature")),
    Case("mixed_dtypes_per_layer", b_mixed_dtypes, FC),
    Case("float8_and_unsigned_extras", b_newer_dtype_extras, FC,
         unused=("act_scale", "grad_scale", "hash", "offsets", "token_ids")),
]

REFUSED_CASES = [
    Case("alpha_larger_than_fan_in", b_alpha_gt_fan_in, refuse=("alpha 4", "edges"), alpha=4, refuse_cmd="expand"),
    Case("pruned_without_prune_remove", b_pruned_not_removed, refuse=("weight_orig", "prune.remove")),
    Case("weight_norm_parametrization", b_weight_norm, refuse=("parametrization",)),
    Case("extras_need_layers", b_extras, refuse=("--layers",)),
    Case("alias_cloned_under_both_names", b_alias_cloned, refuse=("--layers",)),
    # save_model stored the reused Linear once (metadata: 4.weight -> 2.weight); the file's chain 0,2,6 is
    # another network than the user's 0,2,4,6, so it must not be silently taken
    Case("reused_layer_saved_once_by_save_model", b_reused_layer_save_model, refuse=("4.weight",)),
    Case("kernels_in_out_layout", b_kernels_not_transposed, refuse=("(in, out)",)),
    Case("unknown_activation_in_metadata", b_metadata_unknown_activation, refuse=("activation", "softplus")),
    Case("hidden_batchnorm_in_sequential", b_hidden_batchnorm, refuse=("normalization", "1.weight")),
    Case("hidden_layernorm_custom", b_hidden_layernorm, refuse=("normalization", "ln1.weight")),
    Case("prelu_between_linears", b_prelu, refuse=("1.weight",)),
    Case("ema_copy_beside_model", b_ema_copy, refuse=("copies", "--layers")),
    Case("single_linear_no_hidden_layer", b_single_linear, refuse=("hidden",), refuse_cmd="expand"),
    Case("bias_saved_as_row_vector", b_bias_row_vector, refuse=("b1", "1-D")),
    Case("torch_save_pickle", b_torch_save, refuse=("pickle",), filename="model.pt"),
    Case("float8_weights", b_float8_weights, refuse=("fc1.weight", "float8_e4m3fn", "dequantize")),
    Case("int8_weights", b_int8_weights, refuse=("fc1.weight", "floating point", "int8")),
    Case("float8_bias", b_float8_bias, refuse=("fc1.bias", "float8_e4m3fn", "dequantize")),
    Case("uint16_bias", b_uint16_bias, refuse=("fc2.bias", "floating point", "uint16")),
]

assert len({c.id for c in OK_CASES + REFUSED_CASES}) == len(OK_CASES + REFUSED_CASES) >= 25


# ---------------------------------------------------------------- helpers


def ok(res, what):
    assert res.exception is None and res.exit_code == 0, (what, res.exit_code, res.stderr[-2000:], res.exception)
    assert "Traceback" not in res.stderr
    return res


def build(case: Case, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / case.filename
    case.build(path)
    return path


def layer_flags(case: Case) -> list[str]:
    return ["--layers", case.layers] if case.layers else []


def widths_of(tensors, chain):
    return [tensors[chain[0]].shape[1]] + [tensors[k].shape[0] for k in chain]


# ---------------------------------------------------------------- the workflow on every accepted style


@pytest.mark.parametrize("case", OK_CASES, ids=lambda c: c.id)
def test_workflow(case, tmp_path):
    src = build(case, tmp_path)
    source = load_file(str(src))
    chain, alpha, lf = case.chain, case.alpha, layer_flags(case)
    budget = sum(int(torch.count_nonzero(source[k])) for k in chain)  # the oracle
    widths = widths_of(source, chain)
    wide = [widths[0]] + [w * alpha for w in widths[1:-1]] + [widths[-1]]

    info = ok(run_cli(["inspect", src, "--json", *lf]), "inspect").json()
    assert [layer["weight"] for layer in info["chain"]] == chain
    assert info["widths"] == widths
    assert info["activation"] == case.activation
    assert sorted(info["unused_tensors"]) == sorted(case.unused)

    out = tmp_path / "e.safetensors"
    rep = ok(run_cli(["expand", src, "--alpha", alpha, "--probe-samples", 0, "-o", out, "--json", *lf]), "expand").json()
    assert rep["budget"] == budget and rep["weights_after"] == budget and rep["budget_holds"] is True
    assert rep["hidden_widths_after"] == wide[1:-1]
    assert sorted(rep["dropped_tensors"]) == sorted(case.unused)
    expanded = load_file(str(out))
    assert not set(case.unused) & set(expanded), "tensors outside the chain must not be written"

    ok(run_cli(["verify", out, "--source", src]), "verify --source")  # the file's own chain reads the source

    par = ok(run_cli(["params", out, "--json"]), "params").json()
    assert par["total"]["nonzero_weights"] == budget and par["total"]["weights"] == budget
    assert par["source"]["weights"] == budget and par["budget_holds"] is True
    assert [layer["shape"] for layer in par["layers"]] == [[b, a] for a, b in zip(wide, wide[1:])]
    assert [layer["dtype"] for layer in par["layers"]] == [str(source[k].dtype).removeprefix("torch.") for k in chain]
    src_par = ok(run_cli(["params", src, "--json", *lf]), "params source").json()
    assert src_par["total"]["nonzero_weights"] == budget

    dense, packed = tmp_path / "d.safetensors", tmp_path / "p.safetensors"
    ok(run_cli(["convert", out, "--layout", "dense", "-o", dense]), "convert dense")
    ok(run_cli(["convert", dense, "--layout", "packed", "-o", packed]), "convert packed")
    d = load_file(str(dense))
    for k, (a, b) in zip(chain, zip(wide, wide[1:])):
        assert d[k].shape == (b, a) and d[k].dtype == source[k].dtype
        bias = next((n for n in (k.removesuffix("weight") + "bias", "b" + k[1:]) if n in source and n != k), None)
        if bias is not None:
            assert d[bias].shape == (b,) and d[bias].dtype == source[bias].dtype, bias
        mask = d[f"fpe.mask:{k}"]
        assert not torch.any(d[k][~mask]), f"{k}: non-zero weight off its mask"
    assert sum(int(d[f"fpe.mask:{k}"].sum()) for k in chain) == budget
    again = load_file(str(packed))
    assert sorted(again) == sorted(expanded)
    for k in expanded:
        assert again[k].dtype == expanded[k].dtype and torch.equal(again[k], expanded[k]), k

    if widths[0] == 64 and widths[-1] == 10:  # digits: 64 features, 10 classes
        ft = tmp_path / "ft.safetensors"
        ok(run_cli(["finetune", out, "--data", "digits", "--epochs", 1, "--checkpoint-every", 0, "-o", ft, "-q"]),
           "finetune")
        ok(run_cli(["verify", ft, "--source", src]), "verify finetuned --source")
        ev = ok(run_cli(["evaluate", src, ft, "--data", "digits", "--json", *lf]), "evaluate").json()
        assert [m["weights"] for m in ev["models"]] == [budget, budget]
        ok(run_cli(["analyze", src, out, "--data", "digits", "--samples", 64, "--json", *lf]), "analyze")


# ---------------------------------------------------------------- refusals: exit 2, one line, no file


@pytest.mark.parametrize("case", REFUSED_CASES, ids=lambda c: c.id)
def test_refused(case, tmp_path):
    src = build(case, tmp_path)
    out = tmp_path / "e.safetensors"
    if case.refuse_cmd == "inspect":
        assert_one_error_line(run_cli(["inspect", src]), *case.refuse)
        assert_one_error_line(run_cli(["params", src, "--json"]), *case.refuse)
    assert_one_error_line(run_cli(["expand", src, "--alpha", case.alpha, "--probe-samples", 0, "-o", out]), *case.refuse)
    assert not out.exists()
