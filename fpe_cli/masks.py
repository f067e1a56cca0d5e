"""The `packed` layout: bool masks to compact bytes and back, and packed tensors to dense weights.

Two encodings:
- `fpe.zmask:<key>` (written since format version 3): the mask cut into strips of STRIP rows
  (the last one padded with zero rows), each strip read column by column (STRIP bits per column,
  row order within it), the whole bit stream little-endian packed (bit b of byte j is stream bit
  8*j + b, zero padded to a byte) and then zlib-compressed. Sibling children sit in consecutive
  rows and copied columns in consecutive columns, so a strip turns an expanded layer's structure
  into short repeated byte patterns that zlib removes: a middle layer of a deep model at alpha 4
  costs about 4 bits per weight instead of 16.
- `fpe.bitmask:<key>` (format version 1, still read): uint8 rows of little-endian bits, row r of a
  (rows, cols) mask is ceil(cols / 8) bytes, bit b of byte j is column 8*j + b.
Readers reject non-zero padding, streams that are truncated, too long or trailed by other bytes.
A packed weight is `fpe.values:<key>` (its masked entries, row-major), its mask and `fpe.shape:<key>`;
`unpack_packed` checks every claimed shape before inflating anything (a small stream can claim a huge
weight) and turns the triples back into dense weights and masks.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from .discovery import FPE_PREFIX, bias_candidates
from .errors import FPEError
from .model import count_true

STRIP = 4  # rows per strip (alpha siblings at alpha 4); fixed by the format
# deflate with run-length matches only: on these streams smaller than level 1's general matching
# (long runs of zero bytes, few repeated strings) and about 3x faster
ZLIB_LEVEL, ZLIB_STRATEGY = 1, zlib.Z_RLE
CHUNK_ROWS = 1 << 14  # rows encoded/decoded at a time (a multiple of 2*STRIP keeps chunks byte-aligned)
GATHER_CHUNK = 1 << 22  # entries gathered at a time when packing values (bounds numpy's index array)
MAX_ZLIB_RATIO = 1032  # inflating yields at most ~1032 bytes per stream byte (RFC 1951's limit, rounded up)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool (rows, cols) -> uint8 (rows, ceil(cols/8)) little-endian bit rows (format version 1)."""
    bits = np.packbits(mask.numpy(), axis=-1, bitorder="little")  # bool input: no copy
    return torch.from_numpy(bits)


def unpack_mask(bits: torch.Tensor, shape: tuple[int, int], name: str = "mask") -> torch.Tensor:
    """uint8 (rows, ceil(cols/8)) -> bool (rows, cols); checks shape and zero padding."""
    rows, cols = shape
    expected = (rows, (cols + 7) // 8)
    if bits.dtype != torch.uint8 or tuple(bits.shape) != expected:
        raise FPEError(
            f"{name}: packed bitmask has dtype {bits.dtype} and shape {tuple(bits.shape)}, "
            f"expected uint8 {expected} for a {rows}x{cols} weight"
        )
    full = np.unpackbits(bits.numpy(), axis=-1, bitorder="little")  # (rows, 8*ceil(cols/8))
    if full[:, cols:].any():
        raise FPEError(f"{name}: packed bitmask has bits set past column {cols}")
    return torch.from_numpy(full[:, :cols].astype(np.bool_))


def zmask_raw_bytes(shape: tuple[int, int]) -> int:
    """Bytes of the uncompressed strip stream of a (rows, cols) mask."""
    rows, cols = shape
    return (-(-rows // STRIP) * STRIP * cols + 7) // 8


def _spread_table() -> np.ndarray:
    """byte -> uint32 with bit k of the byte moved to bit STRIP*k (one row's 8 columns, spread out)."""
    values = np.arange(256, dtype=np.uint32)
    return sum(((values >> k) & 1) << (STRIP * k) for k in range(8)).astype(np.uint32)


SPREAD = _spread_table()


def _strips(block: np.ndarray) -> np.ndarray:
    """bool (rows, cols) -> the strip-order bit stream (rows padded to STRIP here), packed little-endian."""
    rows, cols = block.shape
    if rows % STRIP:
        block = np.concatenate([block, np.zeros((STRIP - rows % STRIP, cols), dtype=np.bool_)])
    strips = block.shape[0] // STRIP
    if cols % 8 == 0:  # whole bytes per row: interleave the rows' packed bytes, 8 columns into 32 bits
        rows_bits = np.packbits(block, axis=1, bitorder="little").reshape(strips, STRIP, cols // 8)
        words = SPREAD[rows_bits[:, 0]]
        for r in range(1, STRIP):
            words |= SPREAD[rows_bits[:, r]] << r
        return words.astype("<u4", copy=False).view(np.uint8).reshape(-1)
    order = block.reshape(strips, STRIP, cols).transpose(0, 2, 1)  # (strips, cols, STRIP)
    return np.packbits(order.reshape(-1), bitorder="little")


def encode_zmask(mask: torch.Tensor) -> torch.Tensor:
    """bool (rows, cols) -> uint8 1-D zlib stream of the strip order (see the module docstring)."""
    array = mask.numpy()
    packer = zlib.compressobj(ZLIB_LEVEL, zlib.DEFLATED, 15, 8, ZLIB_STRATEGY)
    parts = [packer.compress(_strips(array[r:r + CHUNK_ROWS])) for r in range(0, array.shape[0], CHUNK_ROWS)]
    parts.append(packer.flush())
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def _inflate(stream: torch.Tensor, expected: int, name: str) -> np.ndarray:
    """The zlib stream's content, which must be exactly `expected` bytes with nothing after it."""
    if stream.dtype != torch.uint8 or stream.ndim != 1:
        raise FPEError(f"{name}: compressed mask must be a 1-D uint8 tensor, found {stream.dtype} {tuple(stream.shape)}")
    if expected > MAX_ZLIB_RATIO * stream.numel() + 64:  # checked before inflating anything
        raise FPEError(f"{name}: compressed mask of {stream.numel()} bytes cannot hold the {expected} bytes "
                       "the weight's shape needs", "the file is corrupt or was edited")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(stream.numpy().tobytes(), max(expected, 1))  # 0 would mean "no limit"
    except zlib.error as exc:
        raise FPEError(f"{name}: compressed mask is not a valid zlib stream ({exc})", "the file is corrupt") from None
    if len(raw) != expected or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise FPEError(f"{name}: compressed mask does not match the weight's shape "
                       f"(expected {expected} bytes of mask, the stream is truncated, longer or trailed)",
                       "the file is corrupt or was edited")
    return np.frombuffer(raw, dtype=np.uint8)


def decode_zmask(stream: torch.Tensor, shape: tuple[int, int], name: str = "mask") -> torch.Tensor:
    """uint8 zlib stream -> bool (rows, cols); checks length and zero padding."""
    rows, cols = shape
    raw = _inflate(stream, zmask_raw_bytes(shape), name)
    strips = -(-rows // STRIP)
    out = np.empty((strips * STRIP, cols), dtype=np.bool_)
    for start in range(0, strips, CHUNK_ROWS // STRIP):  # chunks start on whole bytes (even strip counts)
        stop = min(strips, start + CHUNK_ROWS // STRIP)
        lo, hi = start * STRIP * cols // 8, -(-(stop * STRIP * cols) // 8)
        bits = np.unpackbits(raw[lo:hi], bitorder="little")[: (stop - start) * STRIP * cols]
        block = bits.reshape(stop - start, cols, STRIP).transpose(0, 2, 1)  # (strips, STRIP, cols)
        out[start * STRIP:stop * STRIP] = block.reshape((stop - start) * STRIP, cols)
    total_bits = strips * STRIP * cols
    if total_bits % 8 and np.unpackbits(raw[-1:], bitorder="little")[total_bits % 8:].any():
        raise FPEError(f"{name}: compressed mask has padding bits set")
    if out[rows:].any():
        raise FPEError(f"{name}: compressed mask has bits set past row {rows}")
    return torch.from_numpy(out[:rows])


def unpack_weight(values: torch.Tensor, mask: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild (dense weight with exact zeros off-mask, bool mask) from packed values and their mask."""
    count = count_true(mask)
    if values.ndim != 1 or values.numel() != count:
        raise FPEError(
            f"{name}: packed values hold {values.numel()} entries but the mask has {count} bits set",
            "the file is corrupt or was edited",
        )
    weight = torch.zeros(tuple(mask.shape), dtype=values.dtype)
    weight[mask] = values
    return weight, mask


def packed_values(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked entries in row-major order (a free view when every entry exists)."""
    total = count_true(mask)
    if total == mask.numel():
        return weight.reshape(-1)
    # numpy's compress of flat arrays is about 4x faster than a 2-D boolean index, but builds an int64 index
    # of the picked entries (8 bytes each, like torch's masked_select): done in chunks into one output, the
    # index stays bounded by a chunk. Integer views keep bfloat16, which numpy has no type for, bit-exact.
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    values = weight.contiguous().view(as_int).numpy().reshape(-1)
    flags = mask.contiguous().numpy().reshape(-1)
    picked = np.empty(total, dtype=values.dtype)
    at = 0
    for start in range(0, flags.size, GATHER_CHUNK):
        part = flags[start:start + GATHER_CHUNK]
        n = int(np.count_nonzero(part))
        np.compress(part, values[start:start + GATHER_CHUNK], out=picked[at:at + n])
        at += n
    return torch.from_numpy(picked).view(weight.dtype)


def _packed_mask(tensors: dict[str, torch.Tensor], key: str, shape: tuple[int, int]) -> torch.Tensor:
    """Pop and decode the mask of packed weight `key`: compressed (version 3) or bit rows (version 1)."""
    zmask, bits = tensors.pop(f"{FPE_PREFIX}zmask:{key}", None), tensors.pop(f"{FPE_PREFIX}bitmask:{key}", None)
    if zmask is not None and bits is not None:
        raise FPEError(f"packed weight {key!r} has two masks (fpe.zmask and fpe.bitmask); which one is meant is unclear",
                       "the file is corrupt or was edited; keep one of the two")
    if zmask is not None:
        return decode_zmask(zmask, shape, key)
    return unpack_mask(bits, shape, key)


def _packed_shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """The shape each packed weight claims, checked before any mask is inflated.

    A compressed mask can claim a far larger weight than the file's size (an all-zero strip stream
    inflates ~1000-fold), so claims are checked against what the file holds physically (the bias,
    the lineage) and against the memory that unpacking them would take.
    """
    shapes = {}
    for name in [n for n in tensors if n.startswith(FPE_PREFIX + "values:")]:
        key = name.split(":", 1)[1]
        shape = tensors.get(f"{FPE_PREFIX}shape:{key}")
        if shape is None or not any(f"{FPE_PREFIX}{kind}:{key}" in tensors for kind in ("zmask", "bitmask")):
            raise FPEError(f"packed weight {key!r} lacks its mask or shape tensor")
        if shape.dtype != torch.int64 or tuple(shape.shape) != (2,) or bool((shape < 1).any()):
            found = shape.tolist() if shape.ndim == 1 and shape.numel() <= 4 else f"{shape.dtype} {tuple(shape.shape)}"
            raise FPEError(f"packed weight {key!r}: shape tensor must be int64 [out, in], both >= 1, found {found}")
        if key in tensors:
            raise FPEError(f"weight {key!r} is stored both packed and dense; which one is meant is unclear",
                           "the file is corrupt or was edited; keep one of the two")
        rows, cols = int(shape[0]), int(shape[1])
        bias = next((tensors[b] for b in bias_candidates(key) if b in tensors), None)  # as discovery pairs them
        children = tensors.get(f"{FPE_PREFIX}children:{key}")
        if bias is not None and bias.numel() != rows:
            raise FPEError(f"packed weight {key!r} claims {rows} rows but its bias holds {bias.numel()}",
                           "the file is corrupt or was edited")
        if children is not None and int(children.to(torch.int64).sum()) != rows:
            raise FPEError(f"lineage of {key}: children add up to {int(children.to(torch.int64).sum())}, but the "
                           f"packed weight claims {rows} rows", "the file is corrupt or was edited")
        shapes[key] = (rows, cols)
    _check_unpacked_size(tensors, shapes)
    return shapes


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _check_unpacked_size(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse files whose unpacked weights (values + bool mask per entry) could not fit in memory."""
    need = {key: rows * cols * (tensors[f"{FPE_PREFIX}values:{key}"].element_size() + 1)
            for key, (rows, cols) in shapes.items()}
    available = _available_memory()
    if need and available is not None and sum(need.values()) > available:
        biggest = max(need, key=need.get)
        raise FPEError(f"unpacking the packed weights takes {sum(need.values()) / 2**30:.1f} GiB ({biggest} claims "
                       f"{shapes[biggest][0]}x{shapes[biggest][1]}), but only {available / 2**30:.1f} GiB of "
                       "memory is available", "free memory, or check the file: its fpe.shape tensors may be corrupt")


def unpack_packed(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Replace `fpe.values/zmask (or bitmask)/shape:<key>` triples by dense weights; returns (tensors, masks)."""
    out = dict(tensors)
    masks = {}
    for key, shape in _packed_shapes(tensors).items():
        del out[f"{FPE_PREFIX}shape:{key}"]
        values = out.pop(f"{FPE_PREFIX}values:{key}")
        mask = _packed_mask(out, key, shape)
        out[key], masks[key] = unpack_weight(values, mask, key)
    leftovers = [n for n in out if n.startswith(tuple(FPE_PREFIX + k for k in ("bitmask:", "zmask:", "shape:")))]
    if leftovers:
        raise FPEError(f"packed storage without values: {', '.join(leftovers)}")
    return out, masks
