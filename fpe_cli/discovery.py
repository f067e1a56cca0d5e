"""Find the MLP chain in a flat dict of tensors, from names and shapes (pure, no files).

Handles the naming schemes people use: `0.weight`/`2.weight` (nn.Sequential), `fc1`/`fc2`,
`layers.N`, `net.N`, nested prefixes (`model.mlp.0.weight`), `W1`/`b1`; with or without biases.
Order: natural sort of names (so `layers.10` follows `layers.9`); when that does not chain, the
unique shape-consistent order. Anything ambiguous is an error that lists what was found.
"""

from __future__ import annotations

import itertools
import re

import torch

from .errors import FPEError
from .model import Layer, check_chain

FPE_PREFIX = "fpe."  # fpe's own tensors (masks, lineage, packed storage) live under this prefix


def natural_key(name: str) -> list:
    # odd positions are the ASCII digit runs; by position, not str.isdigit(), which is also true of
    # characters int() rejects ('²'): such a tensor name once crashed discovery
    return [int(tok) if i % 2 else tok for i, tok in enumerate(re.split(r"([0-9]+)", name))]


def bias_candidates(weight_key: str) -> list[str]:
    """Names a bias of this weight is commonly saved under."""
    out = []
    for old, new in (("weight", "bias"), ("kernel", "bias")):
        if weight_key.endswith(old):
            out.append(weight_key[: -len(old)] + new)
    m = re.fullmatch(r"(.*?)([Ww])(_?\d*)", weight_key)
    if m:
        out.append(f"{m.group(1)}b{m.group(3)}")
    return out


def _describe(tensors: dict[str, torch.Tensor]) -> str:
    items = [f"{k} {tuple(v.shape)}" for k, v in sorted(tensors.items(), key=lambda kv: natural_key(kv[0]))]
    return ", ".join(items[:12]) + (f", ... ({len(items)} tensors)" if len(items) > 12 else "")


def weight_candidates(tensors: dict[str, torch.Tensor]) -> list[str]:
    """2-D floating tensors that look like weights (those named *weight when any are)."""
    odd = [k for k, v in tensors.items() if k.lower().endswith("weight") and v.ndim > 2]
    if odd:
        raise FPEError(
            f"{odd[0]}: a {tensors[odd[0]].ndim}-D weight {tuple(tensors[odd[0]].shape)}; fpe reads MLPs (2-D linear weights)",
            "convolutional and other layers are not supported; name the MLP's layers with --layers",
        )
    # 2-D tensors named *weight are candidates whatever their dtype: an integer one is then refused by
    # name (load_checkpoint) instead of being skipped, which would silently drop a layer of the chain
    named = [k for k, v in tensors.items() if v.ndim == 2 and k.lower().endswith("weight")]
    _refuse_flat_weights(tensors, named)
    two_d = [k for k, v in tensors.items() if v.ndim == 2 and v.is_floating_point()]
    return sorted(named or two_d, key=natural_key)


def _family(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def _refuse_flat_weights(tensors: dict[str, torch.Tensor], named: list[str]) -> None:
    """A 0-/1-D tensor named like the chain's weights (`1.weight` beside `0.weight`/`2.weight`), or
    whose bias has another length, sits where a linear weight is expected: a corrupt file or a layer
    fpe cannot expand through (a norm). Skipping it would silently change the network."""
    families = {_family(k) for k in named}
    for key, t in sorted(tensors.items(), key=lambda kv: natural_key(kv[0])):
        if t.ndim >= 2 or not key.lower().endswith("weight"):
            continue
        bias = next((tensors[b] for b in bias_candidates(key) if b in tensors), None)
        if named and (_family(key) in families or (bias is not None and tuple(bias.shape) != tuple(t.shape))):
            raise FPEError(
                f"{key}: a {t.ndim}-D tensor {tuple(t.shape)} where a 2-D linear weight is expected "
                f"(beside {', '.join(sorted(named, key=natural_key)[:4])})",
                "fpe reads MLPs of 2-D linear weights; if the file is intact, name the linear layers with --layers",
            )


def _chains(keys: list[str], tensors: dict[str, torch.Tensor]) -> bool:
    return all(tensors[a].shape[0] == tensors[b].shape[1] for a, b in zip(keys, keys[1:]))


def numbered(keys: list[str]) -> bool:
    """Names that differ only in their numbers (`0.weight`/`2.weight`, `fc1`/`fc2`, `layers.N`):
    their natural order is the author's order. Words (`input_layer`, `hidden_layer`) carry none."""
    return len({re.sub(r"\d+", "#", k) for k in keys}) == 1 and all(re.search(r"\d", k) for k in keys)


def order_chain(keys: list[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Numbered names in natural order if they chain; else the unique order that chains; else an error."""
    if _chains(keys, tensors) and (len(keys) == 1 or numbered(keys)):
        return keys
    transposed = not _chains(keys, tensors) and all(tensors[a].shape[1] == tensors[b].shape[0] for a, b in zip(keys, keys[1:]))
    if transposed:
        raise FPEError(
            f"weights look stored as (in, out): {_describe({k: tensors[k] for k in keys})}",
            "fpe expects torch's nn.Linear layout (out, in); save W.T, or name the layers with --layers",
        )
    found = []
    if len(keys) <= 8:
        found = [list(p) for p in itertools.permutations(keys) if _chains(list(p), tensors)]
    if len(found) == 1:
        return found[0]
    if len(keys) <= 8 and not found:
        raise FPEError(
            f"the 2-D weights do not chain in any order (each layer's inputs must equal the previous layer's "
            f"outputs): {_describe({k: tensors[k] for k in keys})}",
            "check the checkpoint, or name the chain's weights in order with --layers",
        )
    several = f" ({len(found)} orders fit the shapes)" if len(found) > 1 else ""
    raise FPEError(
        f"cannot tell the layer order from names and shapes{several}: {_describe({k: tensors[k] for k in keys})}",
        "name the weights in order, e.g. --layers fc1.weight,fc2.weight",
    )


def resolve_layer_names(names: list[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Map user-given names (full keys or prefixes like `fc1`) to weight keys."""
    out, missing = [], []
    for name in names:
        key = name if name in tensors else f"{name}.weight" if f"{name}.weight" in tensors else None
        if key is None:
            missing.append(name)
        else:
            out.append(key)
    if missing:
        raise FPEError(
            f"--layers names not in the file: {', '.join(missing)}",
            f"found: {_describe({k: v for k, v in tensors.items() if v.ndim == 2})}",
        )
    return out


def discover_layers(tensors: dict[str, torch.Tensor], layer_names: list[str] | None = None) -> tuple[list[Layer], list[str]]:
    """Build the layer chain; returns (layers, names of tensors not used by the chain)."""
    user = {k: v for k, v in tensors.items() if not k.startswith(FPE_PREFIX)}
    if layer_names:
        keys = resolve_layer_names(layer_names, user)
    else:
        keys = weight_candidates(user)
        if not keys:
            raise FPEError(
                f"no 2-D weight found, so no MLP chain: {_describe(user) if user else 'the file holds no tensors'}",
                "fpe reads MLP checkpoints: a chain of 2-D linear weights with optional biases",
            )
        keys = order_chain(keys, user)
    layers = [_make_layer(k, user) for k in keys]
    problems = check_chain(layers)
    if problems:
        raise FPEError("the layers do not form an MLP chain: " + "; ".join(problems), "name the layers with --layers")
    used = {k for layer in layers for k in (layer.weight_key, layer.bias_key) if k}
    return layers, sorted(set(user) - used, key=natural_key)


def _make_layer(key: str, tensors: dict[str, torch.Tensor]) -> Layer:
    weight = tensors[key]
    if weight.ndim != 2:
        raise FPEError(f"{key}: expected a 2-D weight, found shape {tuple(weight.shape)}")
    for cand in bias_candidates(key):
        if cand in tensors:
            return Layer(weight_key=key, weight=weight, bias_key=cand, bias=tensors[cand])
    return Layer(weight_key=key, weight=weight)
