"""The packed layout's mask encodings against plain reference computations (oracles)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_sequential, save_module
from fpe_cli import masks
from fpe_cli.checkpoint import load_checkpoint, save_checkpoint
from fpe_cli.errors import FPEError
from fpe_cli.masks import decode_zmask, encode_zmask, pack_mask, unpack_mask


def reference_stream(mask: np.ndarray) -> bytes:
    """The format written out longhand: rows padded to strips of 4, each strip column by column.

    Column counts that are multiples of 8 take the encoder's table path, others its transpose path."""
    rows, cols = mask.shape
    bits = []
    for strip in range(0, -(-rows // 4) * 4, 4):
        for col in range(cols):
            bits.extend(bool(mask[r, col]) if r < rows else False for r in range(strip, strip + 4))
    bits.extend([False] * (-len(bits) % 8))
    return bytes(sum(bit << i for i, bit in enumerate(bits[j:j + 8])) for j in range(0, len(bits), 8))


masks_strategy = st.tuples(st.integers(0, 19), st.one_of(st.integers(0, 19), st.sampled_from([8, 16, 24, 64])), st.floats(0, 1), st.integers(0, 2**31)).map(
    lambda a: np.random.default_rng(a[3]).random((a[0], a[1])) < a[2])


@settings(max_examples=60, deadline=None)
@given(mask=masks_strategy, chunk=st.sampled_from([8, 16, 1 << 14]))
def test_zmask_matches_the_longhand_format_and_round_trips(mask, chunk):
    old = masks.CHUNK_ROWS
    masks.CHUNK_ROWS = chunk  # small chunks cross the chunk boundaries in both directions
    try:
        stream = encode_zmask(torch.from_numpy(mask))
        assert zlib.decompress(stream.numpy().tobytes()) == reference_stream(mask)
        assert torch.equal(decode_zmask(stream, mask.shape), torch.from_numpy(mask))
    finally:
        masks.CHUNK_ROWS = old


@settings(max_examples=60, deadline=None)
@given(mask=masks_strategy, chunk=st.sampled_from([1, 7, 64, 1 << 22]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
def test_packed_values_are_the_masked_entries_in_row_major_order(mask, chunk, dtype):
    """The chunked gather against a loop over the mask (chunks of 1 and 7 entries cross every boundary);
    bit-exact in every dtype (bfloat16 goes through an integer view), -0.0 kept as -0.0."""
    weight = torch.randn(mask.shape, generator=torch.Generator().manual_seed(mask.size)).to(dtype)
    if weight.numel():
        weight.view(-1)[0] = -0.0
    old = masks.GATHER_CHUNK
    masks.GATHER_CHUNK = chunk
    try:
        got = masks.packed_values(weight, torch.from_numpy(mask))
    finally:
        masks.GATHER_CHUNK = old
    want = [weight[r, c] for r in range(mask.shape[0]) for c in range(mask.shape[1]) if mask[r, c] or mask.all()]
    assert got.dtype == dtype and got.numel() == len(want)
    assert all(torch.equal(g.reshape(1).view(torch.uint8), w.reshape(1).view(torch.uint8)) for g, w in zip(got, want))


@settings(max_examples=30, deadline=None)
@given(mask=masks_strategy)
def test_version_1_bit_rows_round_trip(mask):
    assert torch.equal(unpack_mask(pack_mask(torch.from_numpy(mask)), mask.shape), torch.from_numpy(mask))


def test_zmask_refuses_streams_that_do_not_fit_the_shape():
    mask = torch.from_numpy(np.random.default_rng(0).random((9, 7)) < 0.3)
    stream = encode_zmask(mask)
    for shape in [(9, 8), (13, 7), (2**40, 2**40)]:
        with pytest.raises(FPEError, match="compressed mask"):
            decode_zmask(stream, shape, "w")
    with pytest.raises(FPEError, match="past row 9"):  # 9 rows pad to 12; claiming 10 exposes a zero row, 8 hides one
        decode_zmask(encode_zmask(torch.ones(12, 7, dtype=torch.bool)), (9, 7), "w")


@pytest.mark.parametrize("shape", [(0, 64), (64, 0), (3, 5)])
def test_a_decompression_bomb_is_refused_without_inflating_it(shape):
    import tracemalloc

    bomb = torch.frombuffer(bytearray(zlib.compress(bytes(64 << 20), 9)), dtype=torch.uint8)  # 64 MiB of zeros
    tracemalloc.start()
    try:
        with pytest.raises(FPEError, match="compressed mask"):
            decode_zmask(bomb, shape, "w")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"inflated {peak} bytes for a {shape} mask"


def _expanded_file(tmp_path, widths, alpha, layout="packed"):
    from fpe_cli.pipeline import ExpandOptions, expand_file

    src = save_module(make_sequential(widths, seed=3), tmp_path / "m.safetensors")
    out = tmp_path / f"m.{layout}.safetensors"
    expand_file(ExpandOptions(src, alpha, output=out, layout=layout, force=True, probe_samples=0))
    return src, out


def test_version_1_packed_files_still_load_to_the_same_model(tmp_path):
    from fpe_cli.stfile import read_safetensors, write_safetensors

    _, out = _expanded_file(tmp_path, [10, 12, 12, 3], 2)
    tensors, meta = read_safetensors(out)
    for name in [n for n in tensors if n.startswith("fpe.zmask:")]:
        key = name.split(":", 1)[1]
        shape = tuple(int(s) for s in tensors[f"fpe.shape:{key}"])
        tensors[f"fpe.bitmask:{key}"] = pack_mask(decode_zmask(tensors.pop(name), shape))
    old = tmp_path / "v1.safetensors"
    write_safetensors(old, tensors, {**meta, "fpe.format_version": "1"})
    new, v1 = load_checkpoint(out).mlp, load_checkpoint(old).mlp
    for a, b in zip(new.layers, v1.layers):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("widths", [[256, 256, 256, 256, 256], [128, 512, 128]])
def test_packed_deep_model_within_target_size(tmp_path, widths):
    # a middle layer is widened on both sides (alpha^2 entries per weight): as bit rows its mask alone
    # cost 16 bits per float32 weight (1.35x for 5 layers); strips + zlib keep the file under 1.15x
    src, out = _expanded_file(tmp_path, widths, 4)
    assert out.stat().st_size <= 1.15 * src.stat().st_size
    mlp = load_checkpoint(out).mlp
    dense = tmp_path / "d.safetensors"
    save_checkpoint(mlp, dense, "dense")
    again = load_checkpoint(dense).mlp
    assert all(torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask) for a, b in zip(mlp.layers, again.layers))


@pytest.mark.parametrize("weight, bias", [("0.weight", "0.bias"), ("W1", "b1"), ("weights.0", "biases.0")])
def test_a_claimed_shape_is_checked_against_the_bias_however_it_is_named(weight, bias):
    from fpe_cli.masks import unpack_packed

    tensors = {f"fpe.values:{weight}": torch.zeros(0), f"fpe.shape:{weight}": torch.tensor([4096, 6]),
               f"fpe.zmask:{weight}": encode_zmask(torch.zeros(4096, 6, dtype=torch.bool)), bias: torch.zeros(12)}
    with pytest.raises(FPEError, match="claims 4096 rows but its bias holds 12"):
        unpack_packed(tensors)
