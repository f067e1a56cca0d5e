"""Files real users hand to fpe that the other suites do not build (QA round 9): Hugging Face sharded
checkpoints and their index, the other dtypes safetensors writes, headers from other writers, unusual
paths, and MLPs inside bigger (transformer-like) state dicts. Oracles come from the tensors (torch), never
from fpe's output."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file, save_file

from conftest import assert_one_error_line, make_sequential, run_cli, state_tensors


# ---------------------------------------------------------------- builders


def _mlp_state(widths=(12, 8, 3), seed=0) -> dict[str, torch.Tensor]:
    """nn.Sequential(Linear, ReLU, Linear, ...) state dict: keys 0.weight, 0.bias, 2.weight, ..."""
    return state_tensors(make_sequential(list(widths), seed=seed))


def _weights(sd):
    return sum(v.numel() for k, v in sd.items() if k.endswith("weight"))


def _biases(sd):
    return sum(v.numel() for k, v in sd.items() if k.endswith("bias"))


def _write_shards(tmp_path: Path, stem: str, shards: list[dict[str, torch.Tensor]]) -> list[Path]:
    """Shards as `save_pretrained` writes them: STEM-0000i-of-0000n.safetensors + STEM.safetensors.index.json."""
    n = len(shards)
    paths, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(tmp_path / name), metadata={"format": "pt"})
        paths.append(tmp_path / name)
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (tmp_path / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths


def _raw_safetensors(path: Path, tensors: dict[str, torch.Tensor], *, header_order, data_order,
                     metadata="absent", pad: bytes | None = b" ") -> Path:
    """A safetensors file written by hand, as other writers lay it out: any header order, any data order,
    `__metadata__` absent / null / {}, padding with `pad` to 8 bytes (None: no padding)."""
    names = {torch.float32: "F32", torch.int64: "I64"}
    offsets, off = {}, 0
    for k in data_order:
        n = tensors[k].numel() * tensors[k].element_size()
        offsets[k] = [off, off + n]
        off += n
    header = {} if metadata == "absent" else {"__metadata__": metadata}
    for k in header_order:
        header[k] = {"dtype": names[tensors[k].dtype], "shape": list(tensors[k].shape), "data_offsets": offsets[k]}
    raw = json.dumps(header).encode()
    if pad is not None:
        raw += pad * (-len(raw) % 8)
    body = b"".join(tensors[k].contiguous().numpy().tobytes() for k in data_order)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


def _tiny_transformer(seed=0) -> dict[str, torch.Tensor]:
    """Embedding + positions, 2 blocks (ln1, attn q/k/v/o, ln2, mlp.fc1 8->32, mlp.fc2 32->8), ln_f, classifier."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(8)
            self.attn = nn.Module()
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(self.attn, n, nn.Linear(8, 8))
            self.ln2 = nn.LayerNorm(8)
            self.mlp = nn.Module()
            self.mlp.fc1 = nn.Linear(8, 32)
            self.mlp.fc2 = nn.Linear(32, 8)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(20, 8)
            self.pos = nn.Parameter(torch.randn(16, 8))
            self.blocks = nn.ModuleList([Block() for _ in range(2)])
            self.ln_f = nn.LayerNorm(8)
            self.classifier = nn.Linear(8, 5)

    torch.manual_seed(seed)
    return {k: v.detach().clone().contiguous() for k, v in Tiny().state_dict().items()}


def _bert_like(seed=2) -> dict[str, torch.Tensor]:
    """BERT naming: encoder.layer.N.{attention.self.query/key/value, attention.output.dense, intermediate.dense
    (8 -> 32), output.dense (32 -> 8), LayerNorms}, word embeddings, classifier."""
    g = torch.Generator().manual_seed(seed)
    t = {"embeddings.word_embeddings.weight": torch.randn(20, 8, generator=g),
         "embeddings.LayerNorm.weight": torch.ones(8), "embeddings.LayerNorm.bias": torch.zeros(8)}
    for i in range(2):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            t[p + n + ".weight"] = torch.randn(8, 8, generator=g)
            t[p + n + ".bias"] = torch.randn(8, generator=g)
        for n in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + n + ".weight"], t[p + n + ".bias"] = torch.ones(8), torch.zeros(8)
        t[p + "intermediate.dense.weight"] = torch.randn(32, 8, generator=g)
        t[p + "intermediate.dense.bias"] = torch.randn(32, generator=g)
        t[p + "output.dense.weight"] = torch.randn(8, 32, generator=g)
        t[p + "output.dense.bias"] = torch.randn(8, generator=g)
    t["classifier.weight"], t["classifier.bias"] = torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    return t


def _llama_like(seed=1) -> dict[str, torch.Tensor]:
    """Llama naming with a gated (SwiGLU) MLP: down_proj(silu(gate_proj(x)) * up_proj(x)); no biases."""
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(20, 8, generator=g)}
    for i in range(2):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = torch.randn(8, 8, generator=g)
        t[p + "input_layernorm.weight"] = torch.ones(8)
        t[p + "post_attention_layernorm.weight"] = torch.ones(8)
        t[p + "mlp.gate_proj.weight"] = torch.randn(32, 8, generator=g)
        t[p + "mlp.up_proj.weight"] = torch.randn(32, 8, generator=g)
        t[p + "mlp.down_proj.weight"] = torch.randn(8, 32, generator=g)
    t["model.norm.weight"] = torch.ones(8)
    t["lm_head.weight"] = torch.randn(20, 8, generator=g)
    return t


def _dense_output_oracle(src: dict[str, torch.Tensor], out: dict[str, torch.Tensor], w1: str, w2: str, alpha: int):
    """Independent check of a dense-layout expansion of the one-hidden-layer chain w1 -> w2: widened shapes,
    each child's row holds its parent's values on its mask, siblings are disjoint inside the parent's
    support, each copied column holds the parent column's values, and the weight count is the source's."""
    W1, W2 = src[w1], src[w2]
    X1, X2, M1, M2 = out[w1], out[w2], out[f"fpe.mask:{w1}"], out[f"fpe.mask:{w2}"]
    h = W1.shape[0]
    assert tuple(X1.shape) == (alpha * h, W1.shape[1]) and tuple(X2.shape) == (W2.shape[0], alpha * h)
    for r in range(alpha * h):
        p = r // alpha
        assert torch.equal(X1[r][M1[r]], W1[p][M1[r]])
        assert torch.equal(X2[:, r][M2[:, r]], W2[:, p][M2[:, r]])
    for p in range(h):
        kids = M1[p * alpha:(p + 1) * alpha].to(torch.int64)
        assert int(kids.sum(0).max()) <= 1  # disjoint
    assert not (X1[~M1] != 0).any() and not (X2[~M2] != 0).any()
    assert int(M1.sum()) + int(M2.sum()) == int((W1 != 0).sum()) + int((W2 != 0).sum())


# ================================================================ 1. Hugging Face sharded checkpoints


@pytest.mark.parametrize("command", [["inspect"], ["params"], ["expand", "--alpha", "2", "-q"]])
def test_the_shard_index_json_is_named_as_such_with_a_merge_recipe_that_works(tmp_path, command):
    """`model.safetensors.index.json`, what users see first in a save_pretrained directory, is named as the
    index of a sharded checkpoint (it was 'not a safetensors file or truncated (header claims 8387229874382703227
    bytes ...)'), and the merge one-liner in the hint, run as printed, gives the whole 12-8-3 model."""
    sd = _mlp_state()
    _write_shards(tmp_path, "model", [{k: sd[k] for k in ("0.weight", "0.bias")}, {k: sd[k] for k in ("2.weight", "2.bias")}])
    line = assert_one_error_line(run_cli([*command, "model.safetensors.index.json"]), "index of a sharded checkpoint",
                                 "model-00001-of-00002.safetensors")
    assert "truncated" not in line and "header claims" not in line, line
    recipe = re.search(r'python -c "(.*)"', line).group(1)
    subprocess.run([sys.executable, "-c", recipe], cwd=tmp_path, check=True)
    doc = run_cli(["params", "--json", "model.safetensors"]).json()
    assert doc["total"]["weights"] == _weights(sd) and doc["total"]["biases"] == _biases(sd)


def test_a_shard_holding_part_of_a_deep_mlp_is_not_expanded_as_the_whole_model(tmp_path):
    """deep-00001-of-00002 holds 0.weight (8x12) and 2.weight (8x8); 4.weight (3x8) is in the second shard.
    Read alone it looks like a 12-8-8 MLP (2.weight taken for the output layer; fpe once expanded it so):
    refused in one line naming the shard, nothing written."""
    sd = _mlp_state((12, 8, 8, 3))
    first, _ = _write_shards(tmp_path, "deep", [{k: sd[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias")},
                                                 {k: sd[k] for k in ("4.weight", "4.bias")}])
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run_cli(["expand", first.name, "--alpha", "2", "-q", "--json"])
    assert_one_error_line(res, "one of 2 shards", "deep.safetensors.index.json", "merge")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_shard_without_its_output_bias_is_not_a_complete_mlp(tmp_path):
    """save_pretrained splits shards by size, so a layer's weight and bias can land in different shards:
    here 2.bias is in shard 2. Shard 1 alone once passed for a complete MLP with the output bias silently
    missing (params: biases 8, the model has 11); it is refused, naming the tensor that is elsewhere."""
    sd = _mlp_state()
    first, _ = _write_shards(tmp_path, "model", [{k: sd[k] for k in ("0.weight", "0.bias", "2.weight")},
                                                  {"2.bias": sd["2.bias"]}])
    res = run_cli(["params", "--json", first.name])
    assert_one_error_line(res, "shard", "2.bias")
    assert_one_error_line(run_cli(["expand", first.name, "--alpha", "2", "-q"]), "shard")
    assert not (tmp_path / "model-00001-of-00002.fpe2.safetensors").exists()


def test_a_missing_model_beside_its_shard_index_says_the_checkpoint_is_sharded(tmp_path):
    """`fpe expand model.safetensors` in a directory holding model.safetensors.index.json and the shards:
    'no such file', with a hint that points at the index."""
    sd = _mlp_state()
    _write_shards(tmp_path, "model", [{k: sd[k] for k in ("0.weight", "0.bias")}, {k: sd[k] for k in ("2.weight", "2.bias")}])
    assert_one_error_line(run_cli(["expand", "model.safetensors", "--alpha", "2"]), "no such file", "sharded",
                          "model.safetensors.index.json")


def test_a_json_or_text_file_is_not_called_truncated(tmp_path):
    """A config.json (or any text file) given as the model was 'not a safetensors file or truncated (header
    claims 6875982213128462971 bytes, file has 21)'. Nothing is truncated: the file is text, and says so."""
    (tmp_path / "config.json").write_text('{"model_type": "mlp"}')
    (tmp_path / "notes.txt").write_text("trained on digits, 40 epochs\n" * 3)
    for name, kind in (("config.json", "JSON"), ("notes.txt", "text")):
        line = assert_one_error_line(run_cli(["params", name]), "not a safetensors file", f"a {kind} file")
        assert "truncated" not in line and "header claims" not in line, line


def test_files_merely_named_like_shards_without_an_index_are_ordinary_checkpoints(tmp_path):
    """Without an index beside it a name says nothing: `model-00001-of-00001`, and cross-validation folds or
    training steps named `fold-1-of-5` beside `fold-2-of-5`, are each a whole model."""
    sd = _mlp_state()
    for name in ("model-00001-of-00001.safetensors", "fold-1-of-5.safetensors", "fold-2-of-5.safetensors"):
        save_file(sd, str(tmp_path / name))
    for name in ("model-00001-of-00001.safetensors", "fold-1-of-5.safetensors"):
        doc = run_cli(["params", "--json", name]).json()
        assert doc["total"]["weights"] == _weights(sd) and doc["total"]["biases"] == _biases(sd)


def test_a_shard_holding_the_whole_chain_that_layers_names_is_read(tmp_path):
    """One block's MLP of a sharded big model, when every weight and bias of the named chain sits in this
    shard: `--layers` reads it without merging the whole model (the other shard holds other blocks); a
    chain whose bias the index puts in the other shard is refused, naming that bias."""
    sd = _tiny_transformer()
    block0 = {k: v for k, v in sd.items() if k.startswith("blocks.0.")}
    first, _ = _write_shards(tmp_path, "model", [block0, {k: v for k, v in sd.items() if k not in block0}])
    layers = ["--layers", "blocks.0.mlp.fc1,blocks.0.mlp.fc2"]
    res = run_cli(["expand", first.name, "--alpha", "2", "-q", "--layout", "dense", "-o", "x.safetensors", *layers])
    assert res.exit_code == 0, res.stderr
    _dense_output_oracle(sd, load_file(str(tmp_path / "x.safetensors")), "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", 2)
    assert run_cli(["verify", "x.safetensors", "--source", first.name]).exit_code == 0
    assert_one_error_line(run_cli(["params", first.name]), "one of 2 shards")  # without --layers: not the model
    split = {k: v for k, v in block0.items() if k != "blocks.0.mlp.fc2.bias"}
    (tmp_path / "b").mkdir()
    first, _ = _write_shards(tmp_path / "b", "model", [split, {"blocks.0.mlp.fc2.bias": sd["blocks.0.mlp.fc2.bias"]}])
    assert_one_error_line(run_cli(["params", first, *layers]), "tensor(s) the chain needs", "blocks.0.mlp.fc2.bias")


def test_a_fifo_or_a_huge_file_named_like_an_index_is_never_read(tmp_path):
    """`refuse_shard` looks at every `*.index.json` beside the model: a FIFO there would block the read
    forever, and a huge file would be parsed on every load. Both are skipped (a real process, with a
    timeout, so that a regression fails instead of hanging the suite)."""
    save_file(_mlp_state(), str(tmp_path / "model.safetensors"))
    os.mkfifo(tmp_path / "pipe.index.json")
    with open(tmp_path / "big.safetensors.index.json", "wb") as fh:
        fh.truncate((64 << 20) + 1)  # sparse: no disk used
    out = subprocess.run([sys.executable, "-m", "fpe_cli", "params", "model.safetensors"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_the_merge_recipe_is_prose_where_a_path_cannot_be_quoted(tmp_path):
    """A path with a quote or `$` cannot be pasted into the double-quoted one-liner: the hint says the same
    thing in words instead of printing a command that would fail."""
    sd = _mlp_state()
    where = tmp_path / "it's $HOME"
    where.mkdir()
    _write_shards(where, "model", [{k: sd[k] for k in ("0.weight", "0.bias")}, {k: sd[k] for k in ("2.weight", "2.bias")}])
    line = assert_one_error_line(run_cli(["params", where / "model.safetensors.index.json"]), "index of a sharded checkpoint",
                                 "load_file every shard that model.safetensors.index.json lists")
    assert "python -c" not in line


# ================================================================ 2. dtypes fpe does not list

EXTRA_DTYPES = {"U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@pytest.mark.parametrize("name", list(EXTRA_DTYPES))
def test_a_tensor_of_another_safetensors_dtype_beside_the_mlp_is_an_extra(tmp_path, name):
    """A uint16 token-id buffer or a float8 quantization scale beside a float32 MLP (every command once said
    'corrupt safetensors header: ... unsupported dtype'): listed outside the chain; the MLP expands and verifies."""
    sd = _mlp_state()
    sd["extra_buf"] = torch.arange(5).to(EXTRA_DTYPES[name])
    save_file(sd, str(tmp_path / "m.safetensors"))
    res = run_cli(["inspect", "--json", "m.safetensors"])
    assert res.exit_code == 0, res.stderr
    doc = res.json()
    assert "extra_buf" in doc["unused_tensors"] and doc["widths"] == [12, 8, 3]
    assert run_cli(["expand", "m.safetensors", "--alpha", "2", "-q"]).exit_code == 0
    assert run_cli(["verify", "m.fpe2.safetensors", "--source", "m.safetensors"]).exit_code == 0


@pytest.mark.parametrize("name", list(EXTRA_DTYPES))
def test_weights_of_another_safetensors_dtype_are_refused_by_name_not_called_corrupt(tmp_path, name):
    """The MLP's weights themselves in U16/U32/U64/F8: a valid safetensors file that fpe cannot expand; the
    line names the layer and its dtype (once 'corrupt safetensors header: 0.weight: unsupported dtype')."""
    sd = _mlp_state()
    sd = {k: (v.abs() * 100).round().to(torch.int64).to(EXTRA_DTYPES[name]) if k.endswith("weight") and name[0] == "U"
          else v.to(EXTRA_DTYPES[name]) if k.endswith("weight") else v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    res = run_cli(["expand", "m.safetensors", "--alpha", "2", "-q"])
    line = assert_one_error_line(res, "0.weight", str(EXTRA_DTYPES[name]).removeprefix("torch."))
    assert "corrupt" not in line.lower(), line


def test_a_float8_e8m0_scale_written_by_hand_is_an_extra_or_named(tmp_path):
    """F8_E8M0 (microscaling exponents) is newer than the safetensors writer here: a hand-written header.
    Beside the MLP it is an extra where this torch has the dtype, else the line names the dtype."""
    sd = _mlp_state()
    keys = list(sd)
    path = _raw_safetensors(tmp_path / "m.safetensors", sd, header_order=keys, data_order=keys)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    end = max(e["data_offsets"][1] for e in header.values())
    header["e8m0_scale"] = {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [end, end + 4]}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:] + bytes([127, 128, 126, 127]))
    res = run_cli(["inspect", "--json", "m.safetensors"])
    if hasattr(torch, "float8_e8m0fnu"):
        assert res.exit_code == 0, res.stderr
        assert res.json()["unused_tensors"] == ["e8m0_scale"] and res.json()["widths"] == [12, 8, 3]
    else:
        assert_one_error_line(res, "e8m0_scale", "dtype F8_E8M0", "cannot read")


def test_complex_weights_are_refused_by_name(tmp_path):
    save_file({k: v.to(torch.complex64) if k == "2.weight" else v for k, v in _mlp_state().items()},
              str(tmp_path / "c.safetensors"))
    line = assert_one_error_line(run_cli(["expand", "c.safetensors", "--alpha", "2"]), "2.weight", "complex")
    assert "corrupt" not in line and "dequantize" not in line


def test_plain_again_is_refused_where_a_mask_keeps_a_weight_of_value_zero(tmp_path):
    """plain -> dense -> plain is lossless only while every masked weight is non-zero: a dense file whose mask
    keeps a weight that is exactly 0 (as training can leave it) cannot become plain, which would count that
    weight as missing; nothing is written."""
    save_file(_mlp_state(), str(tmp_path / "p.safetensors"))
    assert run_cli(["convert", "p.safetensors", "--layout", "dense", "-o", "d.safetensors", "-q"]).exit_code == 0
    t = load_file(str(tmp_path / "d.safetensors"))
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as fh:
        meta = fh.metadata()
    t["0.weight"][0, 0] = 0.0
    assert bool(t["fpe.mask:0.weight"][0, 0])
    save_file(t, str(tmp_path / "z.safetensors"), metadata=meta)
    assert_one_error_line(run_cli(["convert", "z.safetensors", "--layout", "plain", "-o", "back.safetensors"]),
                          "0.weight", "exactly zero")
    assert not (tmp_path / "back.safetensors").exists()


# ================================================================ 3. headers from other writers


def test_numpy_writer_metadata_variants_padding_and_data_order_read_the_same_tensors(tmp_path):
    """safetensors.numpy.save_file, hand-written headers with `__metadata__` absent / null / {}, no
    padding, newline or 4096-byte space padding, the data section in reverse order, and a header whose key
    order differs from the data order: every file gives the same counts and the same evaluation as torch."""
    sd = _mlp_state()
    keys = list(sd)
    np_save_file({k: v.numpy() for k, v in sd.items()}, str(tmp_path / "numpy.safetensors"))
    files = {
        "numpy": tmp_path / "numpy.safetensors",
        "absent": _raw_safetensors(tmp_path / "absent.safetensors", sd, header_order=keys, data_order=keys),
        "null": _raw_safetensors(tmp_path / "null.safetensors", sd, header_order=keys, data_order=keys, metadata=None),
        "empty": _raw_safetensors(tmp_path / "empty.safetensors", sd, header_order=keys, data_order=keys, metadata={}),
        "unpadded": _raw_safetensors(tmp_path / "unpadded.safetensors", sd, header_order=keys, data_order=keys, pad=None),
        "newlines": _raw_safetensors(tmp_path / "newlines.safetensors", sd, header_order=keys, data_order=keys, pad=b"\n"),
        "reversed": _raw_safetensors(tmp_path / "reversed.safetensors", sd, header_order=keys, data_order=keys[::-1]),
        "shuffled": _raw_safetensors(tmp_path / "shuffled.safetensors", sd, header_order=["2.bias", "0.weight", "2.weight", "0.bias"],
                                     data_order=["2.weight", "0.bias", "2.bias", "0.weight"]),
    }
    raw = (tmp_path / "absent.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = raw[8:8 + n].rstrip(b" ")
    (tmp_path / "pad4096.safetensors").write_bytes(struct.pack("<Q", 4096) + head + b" " * (4096 - len(head)) + raw[8 + n:])
    names = [f"{k}.safetensors" for k in files] + ["pad4096.safetensors"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    np.savez(tmp_path / "d.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    logits = torch.relu(torch.from_numpy(x[40:]) @ sd["0.weight"].T + sd["0.bias"]) @ sd["2.weight"].T + sd["2.bias"]
    acc = (logits.argmax(1) == torch.from_numpy(y[40:])).double().mean().item()
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y[40:])).item()
    for name in names:
        doc = run_cli(["params", "--json", name]).json()
        assert doc["total"]["weights"] == 120 and doc["total"]["biases"] == 11, name
        ev = run_cli(["evaluate", name, "--data", "d.npz", "--json"]).json()["models"][0]["test"]
        assert ev["accuracy"] == pytest.approx(acc) and ev["loss"] == pytest.approx(loss, rel=1e-5), name
    out = run_cli(["expand", "reversed.safetensors", "--alpha", "2", "-q", "--layout", "dense", "-o", "r2.safetensors"])
    assert out.exit_code == 0, out.stderr
    _dense_output_oracle(sd, load_file(str(tmp_path / "r2.safetensors")), "0.weight", "2.weight", 2)


def test_a_nul_padded_header_is_refused_as_not_json_like_safetensors_does(tmp_path):
    """safetensors itself rejects a header padded with NUL bytes instead of spaces; fpe too, in one line."""
    sd = _mlp_state()
    raw = _raw_safetensors(tmp_path / "a.safetensors", sd, header_order=list(sd), data_order=list(sd), pad=None).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    head = raw[8:8 + n] + b"\0" * (8 + -n % 8)
    (tmp_path / "nul.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])
    assert_one_error_line(run_cli(["params", "nul.safetensors"]), "not JSON")


def test_zero_element_tensors_beside_the_mlp_are_extras(tmp_path):
    """Empty buffers ([0], [3, 0], int64 [0]) beside an nn.Sequential MLP: the chain is found, they are listed
    outside it, and the expansion checks out against an independent oracle."""
    sd = _mlp_state()
    extra = {"step_sizes": torch.zeros(0), "pos_cache": torch.zeros(3, 0), "empty_ids": torch.zeros(0, dtype=torch.int64)}
    save_file({**sd, **extra}, str(tmp_path / "z.safetensors"))
    doc = run_cli(["inspect", "--json", "z.safetensors"]).json()
    assert [c["weight"] for c in doc["chain"]] == ["0.weight", "2.weight"] and sorted(doc["unused_tensors"]) == sorted(extra)
    res = run_cli(["expand", "z.safetensors", "--alpha", "2", "-q", "--layout", "dense", "-o", "z2.safetensors"])
    assert res.exit_code == 0, res.stderr
    _dense_output_oracle(sd, load_file(str(tmp_path / "z2.safetensors")), "0.weight", "2.weight", 2)
    assert run_cli(["verify", "z2.safetensors", "--source", "z.safetensors"]).exit_code == 0


@pytest.mark.parametrize("empty_shape", [(8, 0), (0, 12)])
def test_a_zero_element_2d_tensor_is_not_taken_for_a_layer(tmp_path, empty_shape):
    """W1/b1/W2/b2 naming (no `weight` suffix, so every 2-D float tensor is a candidate) with an empty
    2-D buffer `mem` beside it (once 'the 2-D weights do not chain in any order: W1 (8, 12), W2 (3, 8),
    mem (8, 0)'): a tensor with no elements holds no linear layer; the chain is W1, W2, mem outside."""
    sd = _mlp_state()
    save_file({"W1": sd["0.weight"], "b1": sd["0.bias"], "W2": sd["2.weight"], "b2": sd["2.bias"],
               "mem": torch.zeros(*empty_shape)}, str(tmp_path / "w.safetensors"))
    res = run_cli(["inspect", "--json", "w.safetensors"])
    assert res.exit_code == 0, res.stderr
    doc = res.json()
    assert [c["weight"] for c in doc["chain"]] == ["W1", "W2"] and doc["unused_tensors"] == ["mem"]


def test_non_ascii_and_dot_only_names_survive_expand_verify_and_finetune(tmp_path):
    """Chinese and emoji tensor names, extras named '.' and '...', and a chain named '..weight'/'...weight':
    found, expanded under the same names (the output's header escapes them; safetensors reads them back),
    verified against the source."""
    sd = _mlp_state()
    cases = {
        "zh": ({"层1.weight": sd["0.weight"], "层1.bias": sd["0.bias"], "层2.weight": sd["2.weight"], "层2.bias": sd["2.bias"]},
               ("层1.weight", "层2.weight")),
        "emoji": ({"🧠.0.weight": sd["0.weight"], "🧠.0.bias": sd["0.bias"], "🧠.2.weight": sd["2.weight"],
                   "🧠.2.bias": sd["2.bias"], "📈": torch.ones(2)}, ("🧠.0.weight", "🧠.2.weight")),
        "dots": ({**sd, ".": torch.ones(1), "...": torch.ones(2)}, ("0.weight", "2.weight")),
        "dotchain": ({"..weight": sd["0.weight"], "..bias": sd["0.bias"], "...weight": sd["2.weight"], "...bias": sd["2.bias"]},
                     ("..weight", "...weight")),
    }
    for name, (tensors, (w1, w2)) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        doc = run_cli(["inspect", "--json", f"{name}.safetensors"]).json()
        assert [c["weight"] for c in doc["chain"]] == [w1, w2], name
        res = run_cli(["expand", f"{name}.safetensors", "--alpha", "2", "-q", "--layout", "dense", "-o", f"{name}.x.safetensors"])
        assert res.exit_code == 0, (name, res.stderr)
        out = load_file(str(tmp_path / f"{name}.x.safetensors"))
        _dense_output_oracle(tensors, out, w1, w2, 2)
        assert run_cli(["verify", f"{name}.x.safetensors", "--source", f"{name}.safetensors"]).exit_code == 0, name
    res = run_cli(["expand", "zh.safetensors", "--alpha", "2", "-q", "--targets", "层1", "-o", "zh.t.safetensors"])
    assert res.exit_code == 0 and run_cli(["params", "--json", "zh.t.safetensors"]).json()["layers"][0]["shape"] == [16, 12]


def test_an_empty_tensor_name_that_safetensors_writes_is_refused_without_calling_the_file_corrupt(tmp_path):
    """safetensors.torch.save_file writes (and load_file reads) a tensor named ''. fpe cannot tell which
    layer it belongs to, so it refuses it, but says so (and how to fix it) instead of 'corrupt header'."""
    sd = _mlp_state()
    save_file({**sd, "": torch.ones(2)}, str(tmp_path / "e.safetensors"))
    assert "" in load_file(str(tmp_path / "e.safetensors"))  # a valid file by safetensors' own reader
    line = assert_one_error_line(run_cli(["params", "e.safetensors"]), "empty name", "give it a name")
    assert "corrupt" not in line.lower(), line


def test_a_one_megabyte_metadata_value_is_kept_in_outputs_and_whole_in_json(tmp_path):
    """A 1 MiB metadata value (a serialized config or tokenizer): read, kept verbatim by expand, and
    returned whole by `inspect --json`."""
    value = "x" * (1 << 20)
    save_file(_mlp_state(), str(tmp_path / "m.safetensors"), metadata={"format": "pt", "config": value})
    assert run_cli(["inspect", "--json", "m.safetensors"]).json()["metadata"]["config"] == value
    assert run_cli(["expand", "m.safetensors", "--alpha", "2", "-q"]).exit_code == 0
    with safe_open(str(tmp_path / "m.fpe2.safetensors"), "pt") as fh:
        assert fh.metadata()["config"] == value


def test_inspect_does_not_print_a_one_megabyte_metadata_value_to_the_terminal(tmp_path):
    """The human `inspect` once printed a 1 MiB value as one line of 1,048,586 characters; it shows the start
    and the length (the JSON keeps it whole, tested above)."""
    save_file(_mlp_state(), str(tmp_path / "m.safetensors"), metadata={"format": "pt", "config": "x" * (1 << 20)})
    res = run_cli(["inspect", "m.safetensors"])
    assert res.exit_code == 0
    assert len(res.stdout) + len(res.stderr) < 64 * 1024, len(res.stdout)
    assert "config: xxx" in res.stdout and "1,048,576 characters; --json shows all" in res.stdout


# ================================================================ 4. paths


def test_paths_leading_dash_symlinked_directory_read_only_and_dev_shm(tmp_path):
    """`fpe expand --alpha 2 -- -model.safetensors` writes `-model.fpe2.safetensors`; `lk/../p.safetensors`
    where lk is a symlink to a subdirectory reads (and writes beside) the physical parent; a read-only input
    expands and stays unchanged; a model on /dev/shm (tmpfs) expands and verifies."""
    sd = _mlp_state()
    save_file(sd, str(tmp_path / "-model.safetensors"))
    assert run_cli(["expand", "--alpha", "2", "-q", "--", "-model.safetensors"]).exit_code == 0
    assert run_cli(["verify", "--source", "./-model.safetensors", "--", "-model.fpe2.safetensors"]).exit_code == 0

    (tmp_path / "deep" / "sub").mkdir(parents=True)
    save_file(sd, str(tmp_path / "deep" / "p.safetensors"))
    os.symlink(tmp_path / "deep" / "sub", tmp_path / "lk")
    res = run_cli(["expand", "lk/../p.safetensors", "--alpha", "2", "-q", "--json"])
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "deep" / "p.fpe2.safetensors").is_file() and not (tmp_path / "p.fpe2.safetensors").exists()
    assert run_cli(["verify", "deep/p.fpe2.safetensors", "--source", "lk/../p.safetensors"]).exit_code == 0

    ro = tmp_path / "ro.safetensors"
    save_file(sd, str(ro))
    ro.chmod(0o444)
    before = ro.read_bytes()
    assert run_cli(["expand", "ro.safetensors", "--alpha", "2", "-q"]).exit_code == 0
    assert ro.read_bytes() == before and (ro.stat().st_mode & 0o777) == 0o444
    assert_one_error_line(run_cli(["expand", "ro.safetensors", "--alpha", "2", "-o", "ro.safetensors", "--force"]), "input")

    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else tmp_path
    where = Path(tempfile.mkdtemp(dir=shm, prefix="fpe-qa-"))
    try:
        save_file(sd, str(where / "m.safetensors"))
        assert run_cli(["expand", str(where / "m.safetensors"), "--alpha", "2", "-q"]).exit_code == 0
        assert run_cli(["verify", str(where / "m.fpe2.safetensors"), "--source", str(where / "m.safetensors")]).exit_code == 0
        assert [p.name for p in where.iterdir() if p.name.endswith(".tmp")] == []
    finally:
        shutil.rmtree(where)


# ================================================================ 5. an MLP inside a bigger model


@pytest.mark.parametrize("builder, pattern", [
    (_tiny_transformer, r"--layers blocks\.[01]\.mlp\.fc1(\.weight)?,blocks\.[01]\.mlp\.fc2"),
    (_bert_like, r"--layers encoder\.layer\.[01]\.intermediate\.dense(\.weight)?,encoder\.layer\.[01]\.output\.dense"),
])
def test_a_transformer_gets_a_layers_suggestion_for_a_block_mlp(tmp_path, builder, pattern):
    """A transformer's file is fine, but holds several MLPs among attention and norms: the error once said
    'check the checkpoint' with the list cut at 12 tensors; it suggests a block's MLP as `--layers A,B`,
    and that suggestion expands."""
    save_file(builder(), str(tmp_path / "t.safetensors"))
    line = assert_one_error_line(run_cli(["expand", "t.safetensors", "--alpha", "2"]), "2 MLP block(s)")
    suggested = re.search(pattern, line)
    assert suggested, line
    assert "check the checkpoint" not in line
    assert run_cli(["expand", "t.safetensors", "--alpha", "2", "-q", *suggested.group(0).split()]).exit_code == 0


def test_the_error_for_a_file_whose_chain_is_not_found_names_every_2d_tensor(tmp_path):
    """`fpe inspect` on a transformer fails (no one chain), and its one line once cut the list at 12
    tensors, so no command showed the names to pass to --layers: every 2-D tensor is named."""
    sd = _tiny_transformer()
    save_file(sd, str(tmp_path / "t.safetensors"))
    res = run_cli(["inspect", "--json", "t.safetensors"])
    line = assert_one_error_line(res)
    missing = [k for k, v in sd.items() if v.ndim == 2 and k not in line]
    assert not missing, (missing, line)


def test_a_module_prefix_in_layers_lists_the_layers_under_it(tmp_path):
    """`--layers encoder.layer.1.intermediate,encoder.layer.1.output` (module names, one level short of the
    linear layers): the line names the 2-D weights under those names (it once listed the first 12 of the
    file, none of encoder.layer.1's)."""
    save_file(_bert_like(), str(tmp_path / "b.safetensors"))
    line = assert_one_error_line(run_cli(["expand", "b.safetensors", "--alpha", "2", "--layers",
                                          "encoder.layer.1.intermediate,encoder.layer.1.output"]))
    assert "encoder.layer.1.intermediate.dense" in line and "encoder.layer.1.output.dense" in line, line


def test_one_block_mlp_of_a_transformer_expands_with_layers(tmp_path):
    """--layers blocks.1.mlp.fc1,blocks.1.mlp.fc2: only that MLP is expanded (8 -> 64 -> 8 at alpha 2), the
    other 36 tensors are reported as dropped, the output holds the two layers alone, checks out against an
    independent oracle and verifies against the transformer file."""
    sd = _tiny_transformer()
    save_file(sd, str(tmp_path / "t.safetensors"))
    res = run_cli(["expand", "t.safetensors", "--alpha", "2", "--layers", "blocks.1.mlp.fc1,blocks.1.mlp.fc2",
                   "--layout", "dense", "-o", "x.safetensors", "--json"])
    assert res.exit_code == 0, res.stderr
    doc = res.json()
    assert doc["hidden_widths_before"] == [32] and doc["hidden_widths_after"] == [64]
    assert doc["budget"] == 512 and doc["weights_after"] == 512 and doc["budget_holds"] is True
    mlp = {f"blocks.1.mlp.fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert sorted(doc["dropped_tensors"]) == sorted(set(sd) - mlp)
    out = load_file(str(tmp_path / "x.safetensors"))
    assert {k for k in out if not k.startswith("fpe.")} == mlp
    _dense_output_oracle(sd, out, "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight", 2)
    assert torch.equal(out["blocks.1.mlp.fc1.bias"], sd["blocks.1.mlp.fc1.bias"].repeat_interleave(2))
    assert torch.equal(out["blocks.1.mlp.fc2.bias"], sd["blocks.1.mlp.fc2.bias"])
    assert run_cli(["verify", "x.safetensors", "--source", "t.safetensors"]).exit_code == 0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d8.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:], num_classes=8)
    ev = run_cli(["evaluate", "t.safetensors", "x.safetensors", "--data", "d8.npz", "--layers",
                  "blocks.1.mlp.fc1,blocks.1.mlp.fc2", "--json"])
    assert ev.exit_code == 0, ev.stderr
    w1, b1 = sd["blocks.1.mlp.fc1.weight"], sd["blocks.1.mlp.fc1.bias"]
    logits = torch.relu(torch.from_numpy(x[30:]) @ w1.T + b1) @ sd["blocks.1.mlp.fc2.weight"].T + sd["blocks.1.mlp.fc2.bias"]
    acc = (logits.argmax(1) == torch.from_numpy(y[30:])).double().mean().item()
    assert ev.json()["models"][0]["test"]["accuracy"] == pytest.approx(acc)


def test_analyze_takes_the_chain_of_an_expansion_made_with_layers_as_verify_does(tmp_path):
    """The expansion of one block's MLP records its chain (fpe.layers); `fpe verify X --source T` uses it,
    and `fpe analyze T X` does too (it once failed with 'do not chain' unless --layers was repeated)."""
    save_file(_tiny_transformer(), str(tmp_path / "t.safetensors"))
    assert run_cli(["expand", "t.safetensors", "--alpha", "2", "-q", "--layers", "blocks.0.mlp.fc1,blocks.0.mlp.fc2",
                    "-o", "x.safetensors"]).exit_code == 0
    assert run_cli(["verify", "x.safetensors", "--source", "t.safetensors"]).exit_code == 0
    res = run_cli(["analyze", "t.safetensors", "x.safetensors", "--json"])
    assert res.exit_code == 0, res.stderr
    assert res.json()["comparison"] is not None
    named = run_cli(["analyze", "t.safetensors", "x.safetensors", "--json", "--layers", "blocks.0.mlp.fc1,blocks.0.mlp.fc2"])
    assert res.json()["comparison"] == named.json()["comparison"]


def test_a_gated_mlp_is_not_expanded_as_a_plain_one(tmp_path):
    """Llama's MLP is down_proj(silu(gate_proj(x)) * up_proj(x)). `--layers gate_proj,down_proj` once expanded
    relu(gate_proj x) -> down_proj as if it were the MLP; it is refused naming the other branch, and the
    file's own error does not suggest a gated block as `--layers`."""
    save_file(_llama_like(), str(tmp_path / "l.safetensors"))
    res = run_cli(["expand", "l.safetensors", "--alpha", "2", "--layers",
                   "model.layers.0.mlp.gate_proj,model.layers.0.mlp.down_proj", "-o", "x.safetensors"])
    assert_one_error_line(res, "model.layers.0.mlp.up_proj", "gated MLP")
    assert not (tmp_path / "x.safetensors").exists()
    line = assert_one_error_line(run_cli(["expand", "l.safetensors", "--alpha", "2"]))
    assert "gate_proj,model.layers.0.mlp.down_proj" not in line and "up_proj,model" not in line, line


def test_a_square_plain_mlp_in_an_mlp_module_is_not_taken_for_a_gated_one(tmp_path):
    """`mlp.w1`/`mlp.w2`/`mlp.w3`, all 16x16: a gated block's branches widen, so these are plain layers, and
    `--layers` may pick two of them."""
    g = torch.Generator().manual_seed(1)
    save_file({f"mlp.w{i}": torch.randn(16, 16, generator=g) for i in (1, 2, 3)}, str(tmp_path / "sq.safetensors"))
    res = run_cli(["expand", "sq.safetensors", "--alpha", "2", "-q", "--layers", "mlp.w1,mlp.w2", "--json"])
    assert res.exit_code == 0, res.stderr
    assert res.json()["hidden_widths_after"] == [32]


def test_a_file_of_mlp_blocks_alone_suggests_each_block_once_and_widening(tmp_path):
    """Two `up`/`down` MLP blocks and nothing else: several orders chain, and the widths cannot tell which
    way each block runs (no attention weights vote for the model width), so the widening order is taken
    (8 -> 32 -> 8, not down,up: 32 -> 8 -> 32, which name order would give), each block once."""
    src = {k.replace("fc1", "up").replace("fc2", "down"): v for k, v in _tiny_transformer().items() if ".mlp." in k}
    save_file(src, str(tmp_path / "b.safetensors"))
    line = assert_one_error_line(run_cli(["expand", "b.safetensors", "--alpha", "2"]), "2 MLP block(s)")
    assert "--layers blocks.0.mlp.up,blocks.0.mlp.down or --layers blocks.1.mlp.up,blocks.1.mlp.down" in line, line


def test_a_plain_mlp_named_w1_w2_w3_is_not_taken_for_a_gated_one(tmp_path):
    """w1/w3 are Llama's gate and up branches only inside a feed-forward block: a plain three-layer MLP named
    w1, w2, w3 whose first and last layers have one shape (16 -> 32 -> 16 -> 32) expands."""
    g = torch.Generator().manual_seed(0)
    save_file({"w1": torch.randn(32, 16, generator=g), "w2": torch.randn(16, 32, generator=g),
               "w3": torch.randn(32, 16, generator=g)}, str(tmp_path / "w.safetensors"))
    doc = run_cli(["inspect", "--json", "w.safetensors"]).json()
    assert [c["weight"] for c in doc["chain"]] == ["w1", "w2", "w3"]
    assert run_cli(["expand", "w.safetensors", "--alpha", "2", "-q"]).exit_code == 0
