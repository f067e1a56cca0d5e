"""Find the MLP chain in a flat dict of tensors, from names and shapes (pure, no files).

Handles the naming schemes people use: `0.weight`/`2.weight` (nn.Sequential), `fc1`/`fc2`,
`layers.N`, `net.N`, nested prefixes (`model.mlp.0.weight`), `W1`/`b1`; with or without biases.
Order: natural sort of names (so `layers.10` follows `layers.9`); when that does not chain, the
unique shape-consistent order. Anything ambiguous is an error that lists what was found.
"""

from __future__ import annotations

import re

import torch

from .errors import ChainNotFoundError, FPEError
from .model import Layer, check_chain
from .names import FPE_PREFIX, bias_candidates, family, natural_key  # noqa: F401  (FPE_PREFIX re-exported)
from .refusals import gate_partner, refuse_flat_weights, refuse_gated, refuse_hidden_weights, refuse_norms_inside

def _describe(tensors: dict[str, torch.Tensor], limit: int = 12) -> str:
    items = [f"{k} {tuple(v.shape)}" for k, v in sorted(tensors.items(), key=lambda kv: natural_key(kv[0]))]
    return ", ".join(items[:limit]) + (f", ... ({len(items)} tensors)" if len(items) > limit else "")


LIST_ALL = 100  # 2-D tensors named in a chain-not-found error: every one up to this many (the names for --layers)


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
    refuse_hidden_weights(tensors, named)
    refuse_flat_weights(tensors, named)
    two_d = [k for k, v in tensors.items() if v.ndim == 2 and v.is_floating_point()]
    biases = {b for k in two_d for b in bias_candidates(k) if b != k}  # `b1` (1, 8) beside `W1` is no layer
    return sorted(_without_empty_buffers(named or [k for k in two_d if k not in biases], tensors), key=natural_key)


def _without_empty_buffers(keys: list[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """An empty 2-D tensor (a buffer of shape (8, 0) beside the MLP) holds no linear layer: it is left out of
    the candidates, unless it is named like a layer that is there (`0.weight` (6, 0) beside `2.weight`:
    a zero-sized layer of the chain, which check_chain refuses) or every candidate is empty."""
    full = [k for k in keys if tensors[k].numel()]
    families = {family(k) for k in full}
    return [k for k in keys if tensors[k].numel() or family(k) in families or not full]


def _chains(keys: list[str], tensors: dict[str, torch.Tensor]) -> bool:
    return all(tensors[a].shape[0] == tensors[b].shape[1] for a, b in zip(keys, keys[1:]))


def numbered(keys: list[str]) -> bool:
    """Names that differ only in their numbers (`0.weight`/`2.weight`, `fc1`/`fc2`, `layers.N`):
    their natural order is the author's order. Words (`input_layer`, `hidden_layer`) carry none."""
    return len({re.sub(r"\d+", "#", k) for k in keys}) == 1 and all(re.search(r"\d", k) for k in keys)


SEARCH_STEPS = 50_000  # bound on the order searches below (many equal square layers branch a lot)


class _Budget(Exception):
    pass


def _paths(keys: list[str], tensors: dict[str, torch.Tensor], *, complete: bool, by_family: bool,
           limit: int = 2) -> list[list[str]] | None:
    """Chaining orders found by depth-first search: with `complete`, orders of all keys (at most `limit`);
    otherwise every longest chain of distinct keys. `by_family`: keys whose names differ only in their
    numbers keep their natural order (`hidden.0` before `hidden.1`), the author's order. None: the
    search ran out of steps."""
    families: dict[str, list[str]] = {}
    for k in keys:  # keys come in natural order
        families.setdefault(family(k), []).append(k)
    steps, found, best = [0], [], [0]

    def options(path: list[str], left: set[str]) -> list[str]:
        if by_family:
            heads = [next((k for k in fam if k in left), None) for fam in families.values()]
            cands = [k for k in heads if k is not None]
        else:
            cands = [k for k in keys if k in left]
        return [k for k in cands if not path or tensors[path[-1]].shape[0] == tensors[k].shape[1]]

    def walk(path: list[str], left: set[str]) -> None:
        steps[0] += 1
        if steps[0] > SEARCH_STEPS:
            raise _Budget
        nxt = options(path, left)
        if complete and not left:
            found.append(list(path))
        if not complete and not nxt and len(path) >= best[0]:
            found[:] = ([] if len(path) > best[0] else found) + [list(path)]
            best[0] = len(path)
        for k in nxt:
            if complete and len(found) >= limit:
                return
            walk(path + [k], left - {k})

    try:
        walk([], set(keys))
    except (_Budget, RecursionError):  # a chain deeper than the interpreter's stack: thousands of layers
        return None  # too many branches to tell
    return found


def _may_chain(keys: list[str], tensors: dict[str, torch.Tensor]) -> bool:
    """Quick necessary condition: a chain is a trail through the widths (each layer an edge in -> out),
    so every width but the first and last is entered as often as it is left."""
    balance: dict[int, int] = {}
    for k in keys:
        d_out, d_in = (int(s) for s in tensors[k].shape)
        balance[d_in] = balance.get(d_in, 0) + 1
        balance[d_out] = balance.get(d_out, 0) - 1
    off = sorted(v for v in balance.values() if v)
    return off in ([], [-1, 1])


def block_mlps(keys: list[str], tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """One-hidden-layer MLPs inside a bigger model (a transformer's blocks): pairs of 2-D weights (h, d) and
    (d, h), h != d, that share the deepest module path among such pairs (`blocks.0.mlp` for `blocks.0.mlp.fc1`
    and `blocks.0.mlp.fc2`). Ordered d -> h -> d with d the width the file's other 2-D weights use most (a
    transformer's model width), or else the narrower one (MLP blocks widen); gated MLPs are left out.
    Partners are looked up by (module path, shape), so thousands of weights (experts) cost linear time."""
    votes: dict[int, int] = {}
    by_module: dict[tuple[tuple[str, ...], tuple[int, int]], list[str]] = {}
    for k in keys:
        shape = tuple(int(n) for n in tensors[k].shape)
        path = tuple(k.split(".")[:-1])
        for depth in range(1, len(path) + 1):
            by_module.setdefault((path[:depth], shape), []).append(k)
        for n in shape:
            votes[n] = votes.get(n, 0) + 1
    pairs: set[tuple[str, str]] = set()
    for a in keys:
        h, d = (int(n) for n in tensors[a].shape)
        path = tuple(a.split(".")[:-1])
        partners: list[str] = []
        for depth in range(len(path), 0, -1):  # the deepest shared module with a partner of shape (d, h)
            partners = [b for b in by_module.get((path[:depth], (d, h)), []) if b != a]
            if partners:
                break
        if h == d or len(partners) != 1 or gate_partner(a, tensors) or gate_partner(partners[0], tensors):
            continue
        b = partners[0]  # a maps d -> h, b maps h -> d: a first when d is the outer width
        outer_d = votes[d] > votes[h] if votes[d] != votes[h] else d < h  # the file's common width, else widening
        pairs.add((a, b) if outer_d else (b, a))
    return sorted((list(p) for p in pairs), key=lambda p: natural_key(p[0]))


def _short_name(key: str) -> str:
    return key.removesuffix(".weight")


def suggest_blocks(keys: list[str], tensors: dict[str, torch.Tensor]) -> str | None:
    """A hint naming one block's MLP as `--layers` when the file holds several MLPs inside a bigger model."""
    blocks = block_mlps(keys, tensors)
    if not blocks:
        return None
    shown = " or ".join(f"--layers {','.join(map(_short_name, b))}" for b in blocks[:2])
    more = f" (and {len(blocks) - 2} more)" if len(blocks) > 2 else ""
    return (f"the file holds more than one MLP (a bigger model, e.g. a transformer, with {len(blocks)} MLP "
            f"block(s)); expand one block's MLP: {shown}{more}")


def suggest_chain(keys: list[str], tensors: dict[str, torch.Tensor]) -> str:
    """`--layers a,b,c` for the unique longest chain among `keys`, or for each copy of the MLP when the
    file holds several (an EMA or SWA copy beside the model: `0.weight` and `ema.0.weight`); else ''."""
    longest = _paths(keys, tensors, complete=False, by_family=False)
    if longest is not None and len(longest) == 1 and len(longest[0]) >= 2:
        return ", e.g. --layers " + ",".join(longest[0])
    copies = _copies(keys, tensors)
    if len(copies) > 1:
        options = " or ".join(f"--layers {','.join(c)}" for c in copies)
        return f"; the file holds {len(copies)} copies of an MLP: {options}"
    return ""


def _copies(keys: list[str], tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """Keys grouped by their name up to the layer number (`ema.0.weight` -> `ema.`), where each group is a
    numbered family that chains in natural order and there is more than one such group."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        m = re.match(r"(.*?)\d+", k)
        groups.setdefault(m.group(1) if m else k, []).append(k)
    found = [g for g in groups.values() if len(g) >= 2 and numbered(g) and _chains(g, tensors)]
    return found if len(found) > 1 and sum(map(len, found)) == len(keys) else []


def order_chain(keys: list[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Numbered names in natural order if they chain; else the unique order that chains (ties broken by
    keeping each numbered family in natural order); else an error."""
    if _chains(keys, tensors) and (len(keys) == 1 or numbered(keys)):
        return keys
    transposed = not _chains(keys, tensors) and all(tensors[a].shape[1] == tensors[b].shape[0] for a, b in zip(keys, keys[1:]))
    # torch names its (out, in) weights `*.weight`; words (`proj`, `fc`, `classifier`) sort in no
    # particular order, so a reversed-looking sort says nothing there: search the shapes instead
    if transposed and (numbered(keys) or not all(k.lower().endswith("weight") for k in keys)):
        raise _transposed(keys, tensors)
    found = _paths(keys, tensors, complete=True, by_family=False) if _may_chain(keys, tensors) else []
    if found is None or len(found) > 1:
        by_family = _paths(keys, tensors, complete=True, by_family=True)
        if by_family is not None and len(by_family) == 1:
            return by_family[0]
    if found is not None and len(found) == 1:
        return found[0]
    by_role = _order_by_role(keys, tensors) if found else None
    if by_role is not None:
        return by_role
    if found == [] and transposed:
        raise _transposed(keys, tensors)
    blocks = suggest_blocks(keys, tensors)
    chosen = set(keys)
    listed = _describe({k: v for k, v in tensors.items() if k in chosen or v.ndim == 2}, LIST_ALL)
    if found == []:
        raise ChainNotFoundError(
            f"the 2-D weights do not chain in any order (each layer's inputs must equal the previous layer's "
            f"outputs): {listed}",
            blocks or "check the checkpoint, or name the chain's weights in order with --layers" + suggest_chain(keys, tensors),
        )
    several = " / ".join(",".join(o) for o in found) if found else ""
    several = f" (several orders fit the shapes: {several[:400]}{'...' if len(several) > 400 else ''})" if found else ""
    raise ChainNotFoundError(
        f"cannot tell the layer order from names and shapes{several}: {listed}",
        blocks or "name the weights in order, e.g. --layers fc1.weight,fc2.weight",
    )


ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
ROLE_RANKS = {"input": 0, "in": 0, "inp": 0, "stem": 0, "hidden": 1, "middle": 1, "mid": 1,
              "output": 99, "out": 99, "head": 99, "classifier": 99, "final": 99, "last": 99, "logits": 99,
              **{word: i for i, word in enumerate(ORDINALS)}}


def _role_rank(key: str) -> int | None:
    """Where a layer's name puts it: `input_layer`, `fc_in`, `first` early; `hidden` in the middle; `output`,
    `head`, `classifier`, `last` at the end. None when no word of the name (nor its module path) says."""
    words = [w for w in re.split(r"[^a-z]+", key.lower().removesuffix("weight")) if w]
    ranks = {ROLE_RANKS[w] for w in words if w in ROLE_RANKS}
    return ranks.pop() if len(ranks) == 1 else None


def _order_by_role(keys: list[str], tensors: dict[str, torch.Tensor]) -> list[str] | None:
    """When several orders fit the shapes: the one the names spell out (input -> hidden -> output, first ->
    second -> third), if every name has a role word, no two share one, and that order chains."""
    ranks = [_role_rank(k) for k in keys]
    if None in ranks or len(set(ranks)) != len(ranks):
        return None
    order = [k for _, k in sorted(zip(ranks, keys))]
    return order if _chains(order, tensors) else None


def _looks_transposed(keys: list[str], tensors: dict[str, torch.Tensor]) -> bool:
    """2-D weights that chain only when read as (in, out), with any biases sized like the columns."""
    if any(tensors[k].ndim != 2 for k in keys) or _chains(keys, tensors):
        return False
    if not all(tensors[a].shape[1] == tensors[b].shape[0] for a, b in zip(keys, keys[1:])):
        return False
    biases = [next((tensors[b] for b in bias_candidates(k) if b in tensors), None) for k in keys]
    return all(b is None or tuple(b.shape) == (tensors[k].shape[1],) for k, b in zip(keys, biases))


def _transposed(keys: list[str], tensors: dict[str, torch.Tensor]) -> FPEError:
    return FPEError(
        f"weights look stored as (in, out): {_describe({k: tensors[k] for k in keys})}",
        "fpe expects torch's nn.Linear layout (out, in), as nn.Linear's state_dict holds it; Flax and Keras "
        "`kernel`s are (in, out): save each 2-D weight transposed (W.T) under the same name",
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
        two_d = {k: v for k, v in tensors.items() if v.ndim == 2}
        under = {k: v for k, v in two_d.items() if any(k.startswith(f"{m}.") for m in missing)}
        raise FPEError(
            f"--layers names not in the file: {', '.join(missing)}",
            f"2-D weights under {'those names' if len(missing) > 1 else 'that name'}: {_describe(under, LIST_ALL)}"
            if under else f"found: {_describe(two_d, LIST_ALL)}",
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
            raise ChainNotFoundError(
                f"no 2-D weight found, so no MLP chain: {_describe(user) if user else 'the file holds no tensors'}",
                "fpe reads MLP checkpoints: a chain of 2-D linear weights with optional biases",
            )
        keys = order_chain(keys, user)
    refuse_gated(keys, user)
    layers = [_make_layer(k, user) for k in keys]
    problems = check_chain(layers)
    if problems and layer_names and _looks_transposed(keys, user):
        raise _transposed(keys, user)
    if problems:
        hint = ("check the names and their order in --layers (first layer first)" if layer_names
                else "name the layers with --layers")
        raise FPEError("the layers do not form an MLP chain: " + "; ".join(problems), hint)
    used = {k for layer in layers for k in (layer.weight_key, layer.bias_key) if k}
    unused = sorted(set(user) - used, key=natural_key)
    if not layer_names:  # named layers are the user's choice to leave the rest out
        refuse_norms_inside(layers, {k: user[k] for k in unused})
    return layers, unused


def _make_layer(key: str, tensors: dict[str, torch.Tensor]) -> Layer:
    weight = tensors[key]
    if weight.ndim != 2:
        raise FPEError(f"{key}: expected a 2-D weight, found shape {tuple(weight.shape)}")
    for cand in bias_candidates(key):
        if cand in tensors:
            bias = tensors[cand]
            if bias.ndim != 1 and bias.numel() == weight.shape[0]:
                raise FPEError(f"{cand}: a bias of shape {tuple(bias.shape)}; fpe reads biases 1-D ({weight.shape[0]},) "
                               f"like nn.Linear's", "save it as a 1-D tensor, e.g. b.reshape(-1)")
            return Layer(weight_key=key, weight=weight, bias_key=cand, bias=bias)
    return Layer(weight_key=key, weight=weight)
