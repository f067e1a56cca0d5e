"""Mask storage: packing bool masks into little-endian bit rows and back (the `packed` layout).

Row r of a (rows, cols) mask becomes ceil(cols / 8) bytes; bit b of byte j is column 8*j + b
(numpy's bitorder='little'). Padding bits past `cols` are zero; a reader rejects them otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import FPEError


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool (rows, cols) -> uint8 (rows, ceil(cols/8))."""
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


def unpack_weight(values: torch.Tensor, bits: torch.Tensor, shape: tuple[int, int], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild (dense weight with exact zeros off-mask, bool mask) from packed storage."""
    mask = unpack_mask(bits, shape, name)
    count = int(torch.count_nonzero(mask))
    if values.ndim != 1 or values.numel() != count:
        raise FPEError(
            f"{name}: packed values hold {values.numel()} entries but the bitmask has {count} bits set",
            "the file is corrupt or was edited",
        )
    weight = torch.zeros(shape, dtype=values.dtype)
    weight[mask] = values
    return weight, mask
