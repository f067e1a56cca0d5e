"""Reading checkpoints saved from plain torch.nn modules, and the files fpe writes (read without fpe)."""

from __future__ import annotations

import json

import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import (assert_one_error_line, make_sequential, read_header_raw, read_numpy, run_cli, save_mlp, save_module,
                      save_tensors, state_tensors)
from fpe_cli.checkpoint import load_checkpoint
from fpe_cli.errors import FPEError
from fpe_cli.model import forward

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---------------------------------------------------------------- modules in the naming schemes people use


class FC(torch.nn.Module):
    def __init__(self, d=7, h=5, c=3, bias=True):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, h, bias=bias)
        self.fc2 = torch.nn.Linear(h, c, bias=bias)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class LayerList(torch.nn.Module):
    """layers.0 .. layers.11: equal widths, so only a natural sort of the names gives the right order."""

    def __init__(self, n=12, d=6, width=6, c=6):
        super().__init__()
        widths = [d] + [width] * (n - 1) + [c]
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make_sequential([7, 6, 5, 3], seed=3)

    def forward(self, x):
        return self.net(x)


class Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.mlp = make_sequential([7, 5, 3], seed=4)

    def forward(self, x):
        return self.model.mlp(x)


class WStyle(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.W1 = torch.nn.Parameter(torch.randn(5, 7, generator=g))
        self.b1 = torch.nn.Parameter(torch.randn(5, generator=g))
        self.W2 = torch.nn.Parameter(torch.randn(3, 5, generator=g))
        self.b2 = torch.nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x):
        return torch.relu(x @ self.W1.T + self.b1) @ self.W2.T + self.b2


class WithExtras(torch.nn.Module):
    """A chain plus tensors that are not part of it: a scalar buffer, a 1-D scale, a 2-D non-weight buffer."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(7, 5)
        self.fc2 = torch.nn.Linear(5, 3)
        self.norm = torch.nn.LayerNorm(7)  # norm.weight is 1-D: not a chain candidate
        self.register_buffer("step", torch.tensor(3))
        self.register_buffer("proj_cache", torch.randn(4, 4))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


SCHEMES = {
    "sequential": (lambda: make_sequential([7, 5, 3], seed=1), ["0.weight", "2.weight"], ["0.bias", "2.bias"]),
    "sequential-nobias": (lambda: make_sequential([7, 5, 4, 3], bias=False, seed=2), ["0.weight", "2.weight", "4.weight"], [None] * 3),
    "fc": (lambda: FC(), ["fc1.weight", "fc2.weight"], ["fc1.bias", "fc2.bias"]),
    "fc-nobias": (lambda: FC(bias=False), ["fc1.weight", "fc2.weight"], [None, None]),
    "layers-N": (lambda: LayerList(), [f"layers.{i}.weight" for i in range(12)], [f"layers.{i}.bias" for i in range(12)]),
    "net-N": (lambda: Net(), ["net.0.weight", "net.2.weight", "net.4.weight"], ["net.0.bias", "net.2.bias", "net.4.bias"]),
    "nested": (lambda: Nested(), ["model.mlp.0.weight", "model.mlp.2.weight"], ["model.mlp.0.bias", "model.mlp.2.bias"]),
    "W1-b1": (lambda: WStyle(), ["W1", "W2"], ["b1", "b2"]),
    "extras": (lambda: WithExtras(), ["fc1.weight", "fc2.weight"], ["fc1.bias", "fc2.bias"]),
}


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_discovery_in_each_naming_scheme(tmp_path, scheme, dtype):
    build, weights, biases = SCHEMES[scheme]
    torch.manual_seed(0)
    module = build().to(dtype)
    path = save_module(module, tmp_path / f"{scheme}.safetensors")
    ckpt = load_checkpoint(path)
    assert [layer.weight_key for layer in ckpt.mlp.layers] == weights
    assert [layer.bias_key for layer in ckpt.mlp.layers] == biases
    assert all(layer.weight.dtype == dtype for layer in ckpt.mlp.layers)
    assert ckpt.layout == "plain" and not ckpt.mlp.is_expanded
    if scheme == "extras":
        assert set(ckpt.unused) == {"norm.weight", "norm.bias", "step", "proj_cache"}
    else:
        assert ckpt.unused == []
    # the chain found computes what the module computes
    x = torch.randn(8, ckpt.mlp.widths[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = module.float()(x)
    torch.testing.assert_close(forward(ckpt.mlp, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["sequential", "fc", "layers-N", "nested", "W1-b1", "extras"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_expand_keeps_dtype_and_names(tmp_path, scheme, dtype):
    build, weights, biases = SCHEMES[scheme]
    torch.manual_seed(0)
    path = save_module(build().to(dtype), tmp_path / "m.safetensors")
    res = run_cli(["expand", path, "--alpha", "2", "--layout", "dense", "-o", tmp_path / "out.safetensors"])
    assert res.exit_code == 0, res.stderr
    out = load_file(str(tmp_path / "out.safetensors"))
    for w, b in zip(weights, biases):
        assert out[w].dtype == dtype
        assert out[f"fpe.mask:{w}"].dtype == torch.bool
        if b:
            assert out[b].dtype == dtype
    ckpt = load_checkpoint(tmp_path / "out.safetensors")
    assert [layer.weight_key for layer in ckpt.mlp.layers] == weights
    assert all(layer.weight.dtype == dtype for layer in ckpt.mlp.layers)
    assert run_cli(["verify", tmp_path / "out.safetensors", "--source", path]).exit_code == 0


def test_layers_flag_for_explicit_order(tmp_path):
    # square weights with names that do not sort: only --layers can say the order
    g = torch.Generator().manual_seed(0)
    path = save_tensors(tmp_path / "sq.safetensors", {"b_proj": torch.randn(4, 4, generator=g),
                                                       "a_proj": torch.randn(4, 4, generator=g)})
    ckpt = load_checkpoint(path, layers=["b_proj", "a_proj"])
    assert [layer.weight_key for layer in ckpt.mlp.layers] == ["b_proj", "a_proj"]
    res = run_cli(["expand", path, "--alpha", "2", "--layers", "b_proj,a_proj", "-o", tmp_path / "o.safetensors"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(load_checkpoint(tmp_path / "o.safetensors").metadata["fpe.layers"]) == ["b_proj", "a_proj"]


def test_ambiguous_order_is_an_error_listing_what_was_found(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"x.weight": torch.randn(4, 4, generator=g), "y.weight": torch.randn(4, 4, generator=g),
               "z.weight": torch.randn(3, 5, generator=g)}
    path = save_tensors(tmp_path / "amb.safetensors", tensors)
    with pytest.raises(FPEError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "x.weight (4, 4)" in msg and "z.weight (3, 5)" in msg and "--layers" in msg


def test_transposed_weights_are_named(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = save_tensors(tmp_path / "t.safetensors", {"l1.weight": torch.randn(7, 5, generator=g),
                                                      "l2.weight": torch.randn(5, 3, generator=g)})
    with pytest.raises(FPEError, match=r"\(in, out\)"):
        load_checkpoint(path)


def test_flax_kernels_named_with_layers_are_called_transposed_not_sent_back_to_layers(tmp_path):
    """safetensors.flax / numpy files hold Dense kernels as (in, out); --layers cannot fix that."""
    g = torch.Generator().manual_seed(0)
    tensors = {"params.Dense_0.kernel": torch.randn(6, 8, generator=g), "params.Dense_0.bias": torch.zeros(8),
               "params.Dense_1.kernel": torch.randn(8, 3, generator=g), "params.Dense_1.bias": torch.zeros(3)}
    path = save_tensors(tmp_path / "flax.safetensors", tensors)
    for extra in ([], ["--layers", "params.Dense_0.kernel,params.Dense_1.kernel"]):
        line = assert_one_error_line(run_cli(["params", path, *extra]), "(in, out)", "W.T")
        assert "--layers" not in line


def test_layers_in_the_wrong_order_get_an_order_hint(tmp_path):
    path = save_mlp(tmp_path / "m.safetensors", [7, 5, 3])
    line = assert_one_error_line(run_cli(["params", path, "--layers", "2.weight,0.weight"]), "do not form an MLP chain",
                                 "order in --layers")
    assert "(in, out)" not in line


# ---------------------------------------------------------------- what fpe writes, read without fpe


def _expand(tmp_path, src, layout, name, *extra):
    out = tmp_path / name
    res = run_cli(["expand", src, "--alpha", "3", "--layout", layout, "-o", out, *extra])
    assert res.exit_code == 0, res.stderr
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_layout_loads_into_plain_torch_module(tmp_path, dtype):
    src = save_module(make_sequential([9, 6, 5, 4], seed=1, dtype=dtype), tmp_path / "m.safetensors")
    out = _expand(tmp_path, src, "dense", "m.dense.safetensors")
    state = {k: v for k, v in load_file(str(out)).items() if not k.startswith("fpe.")}
    plain = make_sequential([9, 18, 15, 4], dtype=dtype)  # widened sizes
    plain.load_state_dict(state, strict=True)
    ckpt = load_checkpoint(out)
    x = torch.randn(16, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = plain.float()(x)
    torch.testing.assert_close(got, forward(ckpt.mlp, x), rtol=1e-5, atol=1e-5)
    # exact zeros off the mask, in the stored tensor itself
    for key in ("0.weight", "2.weight", "4.weight"):
        mask = load_file(str(out))[f"fpe.mask:{key}"]
        assert not bool((state[key][~mask] != 0).any())


def test_fc_module_loads_widened_dense_output(tmp_path):
    src = save_module(FC(), tmp_path / "fc.safetensors")
    out = _expand(tmp_path, src, "dense", "fc.dense.safetensors")
    plain = FC(h=15)
    plain.load_state_dict({k: v for k, v in load_file(str(out)).items() if not k.startswith("fpe.")}, strict=True)
    x = torch.randn(4, 7)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), forward(load_checkpoint(out).mlp, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_decoded_with_numpy_equals_dense(tmp_path, dtype):
    src = save_module(make_sequential([13, 6, 5, 4], seed=2, dtype=dtype), tmp_path / "m.safetensors")
    packed = _expand(tmp_path, src, "packed", "p.safetensors")
    dense = _expand(tmp_path, src, "dense", "d.safetensors")
    pt, pmeta = read_numpy(packed)
    dt, dmeta = read_numpy(dense)
    assert pmeta["fpe.layout"] == "packed" and dmeta["fpe.layout"] == "dense"
    differ = ("fpe.layout", "fpe.format_version")  # packed masks are compressed: format version 3
    assert {k: v for k, v in pmeta.items() if k not in differ} == {k: v for k, v in dmeta.items() if k not in differ}
    assert (pmeta["fpe.format_version"], dmeta["fpe.format_version"]) == ("3", "1")
    for key in ("0.weight", "2.weight", "4.weight"):
        _, values = pt[f"fpe.values:{key}"]
        _, stream = pt[f"fpe.zmask:{key}"]
        _, shape = pt[f"fpe.shape:{key}"]
        rows, cols = (int(s) for s in shape)
        assert stream.dtype == np.uint8 and stream.ndim == 1
        # decoded the way the README shows, with zlib and numpy only: 4-row strips read column by column
        strips = -(-rows // 4)
        bits = np.unpackbits(np.frombuffer(zlib.decompress(stream.tobytes()), np.uint8), bitorder="little")
        assert len(bits) == -(-strips * 4 * cols // 8) * 8 and not bits[strips * 4 * cols:].any()
        full = bits[:strips * 4 * cols].reshape(strips, cols, 4).transpose(0, 2, 1).reshape(-1, cols)
        assert not full[rows:].any(), "padding rows must be zero"
        mask = full[:rows].astype(bool)
        weight = np.zeros((rows, cols), dtype=values.dtype)
        weight[mask] = values  # row-major order
        dtype_name, dense_w = dt[key]
        assert dtype_name == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
        assert np.array_equal(mask, dt[f"fpe.mask:{key}"][1])
        assert weight.tobytes() == dense_w.tobytes(), f"{key}: packed decode differs from dense bit for bit"
    for key in ("0.bias", "2.bias", "4.bias", "fpe.children:0.weight", "fpe.children:2.weight"):
        assert pt[key][1].tobytes() == dt[key][1].tobytes()
    assert pt["fpe.children:0.weight"][1].tolist() == [3] * 6  # 6 parents, 3 consecutive children each


def test_packed_size_target_float32_alpha4(tmp_path):
    # As plain bit rows the mask cost 4 bits per weight (12.5% of float32 values) at alpha 4; compressed
    # strips cost less. Copied biases and lineage add about 12/(d_in + d_out) on top.
    src = save_module(make_sequential([1024, 64, 64], seed=0), tmp_path / "m.safetensors")
    out = tmp_path / "m.fpe4.safetensors"
    assert run_cli(["expand", src, "--alpha", "4"]).exit_code == 0
    assert out.stat().st_size <= 1.15 * src.stat().st_size


@pytest.mark.parametrize("layout", ["packed", "dense"])
def test_same_call_gives_identical_bytes_across_thread_counts(tmp_path, layout):
    src = save_module(make_sequential([20, 12, 8, 5], seed=4), tmp_path / "m.safetensors")
    outs = []
    for n, threads in enumerate([1, 2, 1]):
        torch.set_num_threads(threads)
        for split in ("random", "gram"):
            outs.append((split, _expand(tmp_path, src, layout, f"o{n}-{split}.safetensors", "--split", split,
                                        "--seed", "7").read_bytes()))
    for split in ("random", "gram"):
        got = [b for s, b in outs if s == split]
        assert got[0] == got[1] == got[2]
    other_seed = _expand(tmp_path, src, layout, "seed8.safetensors", "--seed", "8").read_bytes()
    assert other_seed != outs[0][1]


def test_canonical_header(tmp_path):
    src = save_module(make_sequential([9, 6, 4], seed=1), tmp_path / "m.safetensors")
    for layout in ("packed", "dense"):
        out = _expand(tmp_path, src, layout, f"{layout}.safetensors")
        raw, header = read_header_raw(out)
        assert len(raw) % 8 == 0
        keys = list(header)
        assert keys[0] == "__metadata__"
        assert keys[1:] == sorted(keys[1:]), "tensor entries not sorted"
        meta = header["__metadata__"]
        assert list(meta) == sorted(meta), "metadata keys not sorted"
        assert all(isinstance(v, str) for v in meta.values())
        assert meta["format"] == "pt"
        for k in ("fpe.version", "fpe.format_version", "fpe.settings", "fpe.budget", "fpe.source_sha256", "fpe.recipe"):
            assert k in meta, k
        offsets = [header[k]["data_offsets"] for k in keys[1:]]
        assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:])), "data not in key order"
        text = raw.rstrip(b" ")
        assert text == json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
        import hashlib
        assert meta["fpe.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        settings = json.loads(meta["fpe.settings"])
        assert settings["seed"] == 0 and settings["outgoing"] == "copy" and settings["bias"] == "copy"
        assert json.loads(meta["fpe.budget"])["weights"] == 9 * 6 + 6 * 4


def test_source_metadata_activation_is_used(tmp_path):
    src = save_tensors(tmp_path / "m.safetensors", state_tensors(make_sequential([5, 4, 2])), {"activation": "tanh"})
    ckpt = load_checkpoint(src)
    assert ckpt.mlp.activation == "tanh" and ckpt.activation_source == "metadata"
    out = _expand(tmp_path, src, "packed", "o.safetensors")
    assert load_checkpoint(out).mlp.activation == "tanh"


def test_output_gets_ordinary_permissions(tmp_path):
    import os
    src = save_module(make_sequential([5, 4, 2]), tmp_path / "m.safetensors")
    umask = os.umask(0o022)
    try:
        out = _expand(tmp_path, src, "packed", "o.safetensors")
        assert out.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        os.chmod(out, 0o640)
        res = run_cli(["expand", src, "--alpha", "3", "-o", out, "--force"])
        assert res.exit_code == 0 and out.stat().st_mode & 0o777 == 0o640  # an overwritten file keeps its mode
    finally:
        os.umask(umask)


def test_activation_names_as_people_write_them():
    from fpe_cli.checkpoint import normalize_activation

    cases = {"ReLU": "relu", "nn.GELU": "gelu", "torch.nn.SiLU()": "silu", "LeakyReLU": "leaky_relu", "tanh": "tanh",
             '"relu"': "relu", "Identity": "identity"}
    assert {k: normalize_activation(k) for k in cases} == cases


def test_expand_reports_tensors_it_does_not_carry(tmp_path):
    import json as _json

    from safetensors.torch import save_file as _save
    from conftest import run_cli

    class WithNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn1, self.fc2 = torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)

    _save(WithNorm().state_dict(), str(tmp_path / "m.safetensors"), metadata={"activation": "nn.ReLU"})
    res = run_cli(["expand", tmp_path / "m.safetensors", "--alpha", "2", "--json"])
    assert res.exit_code == 2 and "normalization layer" in res.stderr  # inside the chain: refused unless named
    res = run_cli(["expand", tmp_path / "m.safetensors", "--alpha", "2", "--json", "--layers", "fc1.weight,fc2.weight"])
    assert res.exit_code == 0, res.stderr
    doc = _json.loads(res.stdout)
    assert "bn1.running_mean" in doc["dropped_tensors"] and doc["activation_source"] == "metadata"
    assert "0.weight" not in doc["dropped_tensors"] and "fc1.weight" not in doc["dropped_tensors"]


def test_read_hashes_exactly_the_bytes_it_reads_and_keeps_tensors_aligned(tmp_path):
    """One sequential pass: the digest equals the file's sha256; an odd-sized float16 tensor before a
    float32 one (names sort that way in fpe's canonical writer) still gives an aligned, correct tensor."""
    import hashlib

    from fpe_cli.stfile import read_safetensors, write_safetensors

    tensors = {"a.bias": torch.arange(3, dtype=torch.float16), "b.weight": torch.randn(5, 7),
               "c": torch.tensor([True, False]), "d": torch.zeros(0)}
    path = tmp_path / "odd.safetensors"
    write_safetensors(path, tensors, {"k": "v"})
    digest = hashlib.sha256()
    got, meta = read_safetensors(path, digest)
    assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest() and meta == {"k": "v"}
    for name, t in tensors.items():
        assert torch.equal(got[name], t) and got[name].dtype == t.dtype
        assert got[name].numel() == 0 or got[name].data_ptr() % got[name].element_size() == 0
    got["a.bias"] += 1  # tensors share one buffer but never overlap
    assert torch.equal(got["b.weight"], tensors["b.weight"])


def test_bytes_after_the_tensors_are_hashed_but_not_loaded(tmp_path):
    import hashlib

    from fpe_cli.stfile import read_safetensors, write_safetensors

    path = tmp_path / "tail.safetensors"
    write_safetensors(path, {"w": torch.randn(3, 4)}, {})
    with open(path, "ab") as fh:
        fh.write(b"\x01" * 5000)  # trailing bytes (another tool appended something)
    digest = hashlib.sha256()
    got, _ = read_safetensors(path, digest)
    assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert got["w"].untyped_storage().nbytes() < 1000  # the tail is not held in memory
