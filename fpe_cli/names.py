"""How checkpoints name their tensors: natural order, bias names, numbered families (pure string helpers)."""

from __future__ import annotations

import re

FPE_PREFIX = "fpe."  # fpe's own tensors (masks, lineage, packed storage) live under this prefix


def natural_key(name: str) -> list:
    # odd positions are the ASCII digit runs; by position, not str.isdigit(), which is also true of
    # characters int() rejects ('²'): such a tensor name once crashed discovery
    return [int(tok) if i % 2 else tok for i, tok in enumerate(re.split(r"([0-9]+)", name))]


def bias_candidates(weight_key: str) -> list[str]:
    """Names a bias of this weight is commonly saved under."""
    out = []
    for old, new in (("weights", "biases"), ("weight", "bias"), ("kernel", "bias")):  # `weights.0` -> `biases.0`
        at = weight_key.rfind(old)
        if at >= 0 and weight_key[:at] + new + weight_key[at + len(old):] not in out:
            out.append(weight_key[:at] + new + weight_key[at + len(old):])
    m = re.fullmatch(r"(.*?)([Ww])(_?\d*)", weight_key)
    if m:
        out.append(f"{m.group(1)}b{m.group(3)}")
    return out


def family(name: str) -> str:
    return re.sub(r"\d+", "#", name)
