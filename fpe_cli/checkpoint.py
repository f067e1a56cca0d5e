"""Checkpoints on disk: load any MLP safetensors file into an `MLP`, save it in fpe's layouts.

Layouts:
- `plain`: the user's own tensor names and shapes, nothing else (a dense model, no masks).
- `dense`: original names with widened shapes and exact zeros off-mask, plus `fpe.mask:<key>` (bool)
  and `fpe.children:<key>` (int32 lineage: how many consecutive rows each parent became) beside
  them; loads into a plain torch.nn MLP.
- `packed`: each weight stored as `fpe.values:<key>` (its masked entries, row-major),
  `fpe.zmask:<key>` (the mask, zlib-compressed in 4-row strips; see masks.py; format version 3)
  and `fpe.shape:<key>` (int64 [out, in]); biases and lineage as in `dense`. Files of format
  version 1 hold `fpe.bitmask:<key>` (uint8 rows of little-endian bits) instead and are still read.
Tied columns (`--outgoing tie`, format version 2): `fpe.tied:<key>` (int32 copies of each parent
column, as `fpe.children` of the layer before); `dense` stores every copy (a plain torch.nn module
computes the same function), `packed` stores each shared column once (`fpe.shape` is [out, parents]).
Metadata is strings only: `format: pt` plus `fpe.*` keys (JSON-encoded values).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import BASE_FORMAT_VERSION, FORMAT_VERSION, TIED_FORMAT_VERSION, ZMASK_FORMAT_VERSION, __version__
from .discovery import FPE_PREFIX, discover_layers, natural_key
from .errors import JSON_ERRORS, FPEError
from .masks import encode_zmask, packed_values, unpack_packed
from .model import MLP, Layer, activation_fn, effective_weight, first_of_groups
from .shards import refuse_shard
from .stfile import read_safetensors, write_safetensors
from .verify import non_finite_tensors

LAYOUTS = ("plain", "dense", "packed")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Checkpoint:
    mlp: MLP
    layout: str
    path: Path
    sha256: str
    metadata: dict[str, str]
    tensor_bytes: dict[str, int] = field(default_factory=dict)  # stored bytes of every tensor in the file
    unused: list[str] = field(default_factory=list)  # tensors that are not part of the chain
    activation_source: str = "metadata"  # "metadata", "flag" or "default"


def metadata_json(metadata: dict[str, str], key: str, default=None, where: Path | None = None):
    """Decode a JSON-encoded metadata value; a broken one is a clear error (naming the file `where`)."""
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except JSON_ERRORS:
        prefix = f"{where}: " if where is not None else ""
        raise FPEError(f"{prefix}metadata {key!r} is not valid JSON: {metadata[key][:80]!r}") from None


def recorded_budget(metadata: dict[str, str]) -> int | None:
    """The weight budget an expanded file records (`fpe.budget`), or None when it records none."""
    budget = metadata_json(metadata, "fpe.budget")
    if budget is None:
        return None
    weights = budget.get("weights") if isinstance(budget, dict) else None
    if isinstance(weights, bool) or not isinstance(weights, int):
        raise FPEError("metadata fpe.budget is malformed (expected {\"weights\": N, ...})")
    return weights


def check_format_version(metadata: dict[str, str], path: Path) -> None:
    version = metadata.get("fpe.format_version")
    if version is None:
        return
    if not (version.isascii() and version.isdigit() and len(version) <= 6) or int(version) > FORMAT_VERSION:
        raise FPEError(
            f"{path}: written in fpe format version {version!r}; this fpe reads versions up to {FORMAT_VERSION}",
            "upgrade fpe",
        )


def _lineage_problem(counts: torch.Tensor, rows: int) -> str | None:
    """Children counts per parent must be int32 >= 1 and add up to the layer's rows."""
    if counts.dtype != torch.int32 or counts.ndim != 1:
        return f"expected a 1-D int32 tensor of children per parent, found {counts.dtype} {tuple(counts.shape)}"
    if counts.numel() and int(counts.min()) < 1:
        return "a parent has fewer than one child"
    if int(counts.to(torch.int64).sum()) != rows:
        return f"children add up to {int(counts.to(torch.int64).sum())}, but the layer has {rows} outputs"
    return None


def lineage_counts(parents: torch.Tensor) -> torch.Tensor:
    """int32 children per parent from a lineage whose children are consecutive (as fpe writes them)."""
    if parents.numel() and bool((parents[1:] < parents[:-1]).any()):
        raise FPEError("lineage is not in parent order; fpe stores children of one parent consecutively")
    return torch.bincount(parents).to(torch.int32)


def _attach_masks_and_lineage(layers: list[Layer], tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    problems = []
    for layer in layers:
        key = layer.weight_key
        mask = masks.get(key, tensors.get(f"{FPE_PREFIX}mask:{key}"))
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(layer.weight.shape):
                problems.append(f"mask of {key}: expected bool {tuple(layer.weight.shape)}, found {mask.dtype} {tuple(mask.shape)}")
            else:
                layer.mask = mask
        counts = tensors.get(f"{FPE_PREFIX}children:{key}")
        if counts is not None:
            problem = _lineage_problem(counts, layer.out_features)
            if problem:
                problems.append(f"lineage of {key}: {problem}")
            else:
                layer.parents = torch.arange(counts.numel()).repeat_interleave(counts.to(torch.int64))
    if problems:
        raise FPEError("; ".join(problems))


def _is_lineage_of(tensors: dict[str, torch.Tensor], name: str, lineage: torch.Tensor, counts: torch.Tensor, total: int) -> bool:
    """`name` is an `fpe.children:<key>` equal to `counts` whose weight exists with `total` rows (and inputs)."""
    if not name.startswith(FPE_PREFIX + "children:") or lineage.dtype != counts.dtype or not torch.equal(lineage, counts):
        return False
    weight = tensors.get(name.split(":", 1)[1])
    return weight is not None and weight.ndim == 2 and weight.shape[0] == total and weight.shape[1] > 0


def _refuse_stored_once(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_model` stores a shared module once and records each dropped name in the
    metadata (`{"4.weight": "2.weight"}`). When the dropped name is part of the chain the names describe
    (a Linear reused in a Sequential), discovery without it would build another network: refused. A
    second name that is no place in the chain (`self.classifier = self.fc2`) changes nothing."""
    aliases = {k: v for k, v in metadata.items() if k not in tensors and v in tensors and k.rsplit(".", 1)[-1] in ("weight", "bias")}
    if not aliases:
        return
    restored = {n: t for n, t in tensors.items() if not n.startswith(FPE_PREFIX)} | {k: tensors[v] for k, v in aliases.items()}
    try:
        chain, _ = discover_layers(restored)
    except FPEError:
        return  # with the dropped names the tensors form no chain: the stored names alone decide
    used = sorted((k for layer in chain for k in (layer.weight_key, layer.bias_key) if k in aliases), key=natural_key)
    if used:
        shown = ", ".join(f"{k} (= {aliases[k]})" for k in used[:4])
        raise FPEError(
            f"{shown}: a layer the model uses more than once, stored once (safetensors.torch.save_model records "
            "the shared name in the metadata); fpe expands layers that own their weights",
            "save a state_dict with every weight, e.g. save_file({k: v.clone() for k, v in "
            "model.state_dict().items()}, path)",
        )


def _check_no_stray_lineage(tensors: dict[str, torch.Tensor]) -> None:
    """Every `fpe.children:<key>` must describe a weight in the file."""
    stray = [n for n in tensors if n.startswith(FPE_PREFIX + "children:") and n.split(":", 1)[1] not in tensors]
    if stray:
        raise FPEError(f"{', '.join(stray[:3])}: lineage of a weight that is not in the file", "the file is corrupt or was edited")


def _widen_tied(tensors: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read `fpe.tied:<key>` (int32 copies per parent column); a packed weight stored once per parent is
    widened to its copies here. Returns {key: parent of each input column}."""
    tied = {}
    for name in [n for n in tensors if n.startswith(FPE_PREFIX + "tied:")]:
        key, counts = name.split(":", 1)[1], tensors.pop(name)
        weight = tensors.get(key)
        if weight is None or weight.ndim != 2:
            raise FPEError(f"{name}: ties a weight that is not in the file")
        if counts.dtype != torch.int32 or counts.ndim != 1 or (counts.numel() and int(counts.min()) < 1):
            raise FPEError(f"{name}: expected a 1-D int32 tensor of copies per parent column (each >= 1), "
                           f"found {counts.dtype} {tuple(counts.shape)}")
        # sizes first, from tensors that exist: a corrupt count would otherwise allocate its sum
        total = int(counts.to(torch.int64).sum())
        if not any(_is_lineage_of(tensors, n, t, counts, total) for n, t in tensors.items()):
            raise FPEError(f"{name}: its copies per column are no expanded layer's children counts",
                           "the file is corrupt or was edited")
        packed = weight.shape[1] == counts.numel() and key in masks  # packed: one column per parent
        if not packed and weight.shape[1] != total:
            raise FPEError(f"{name}: {total} tied columns, but {key} has {weight.shape[1]} inputs")
        parents = torch.arange(counts.numel()).repeat_interleave(counts.to(torch.int64))
        if packed:
            tensors[key], masks[key] = weight[:, parents], masks[key][:, parents]
        tied[key] = parents
    return tied


def _attach_ties(layers: list[Layer], tied: dict[str, torch.Tensor]) -> None:
    """A tied layer's column groups must be the children of the layer before it (its lineage)."""
    index = {layer.weight_key: i for i, layer in enumerate(layers)}
    for key, parents in tied.items():
        i = index.get(key)
        if i is None:
            raise FPEError(f"fpe.tied:{key}: the tied weight is not part of the MLP chain")
        prev = layers[i - 1].parents if i else None
        if prev is None or not torch.equal(prev, parents):
            raise FPEError(f"fpe.tied:{key}: its column groups are not the children of the layer before it",
                           "the file is corrupt or was edited")
        layers[i].tied = parents


# torch's own reprs of activations at their defaults (repr(nn.GELU()) is "GELU(approximate='none')")
DEFAULT_ARGUMENTS = {"approximate='none'", "negative_slope=0.01", "0.01"}


def normalize_activation(text: str) -> str:
    """'ReLU', 'nn.GELU', 'torch.nn.SiLU()', 'LeakyReLU' -> fpe's names ('relu', 'gelu', 'silu', 'leaky_relu')."""
    name, _, args = text.strip().strip('"').partition("(")
    settings = [a.replace(" ", "").replace('"', "'") for a in args.strip().rstrip(")").split(",") if a.strip()]
    settings = [a for a in settings if a not in DEFAULT_ARGUMENTS and not a.startswith("inplace=")]  # no value changes
    if settings:  # LeakyReLU(0.2): a setting fpe would silently replace by its default
        raise FPEError(f"activation {text.strip()!r}: {', '.join(settings)} is not supported",
                       "fpe applies each activation with torch's defaults (leaky_relu: negative_slope=0.01; gelu: "
                       "approximate='none'); --activation NAME overrides one recorded in the file")
    name = name.strip().split(".")[-1]
    name = {"leakyrelu": "leaky_relu", "swish": "silu", "linear": "identity", "none": "identity"}.get(name.lower(), name)
    return name.lower()


def _resolve_activation(metadata: dict[str, str], flag: str | None) -> tuple[str, str]:
    if flag is not None and not flag.strip():
        raise FPEError("--activation is empty", "name one, e.g. --activation gelu, or leave the flag out")
    if flag:
        name = normalize_activation(flag)
        activation_fn(name)
        return name, "flag"
    for key in ("fpe.activation", "activation"):
        if key in metadata:
            name = normalize_activation(metadata[key])
            activation_fn(name)
            return name, "metadata"
    return "relu", "default"


def load_checkpoint(path: Path, layers: list[str] | None = None, activation: str | None = None) -> Checkpoint:
    """Read, validate and discover the MLP of any safetensors checkpoint (plain, dense or packed)."""
    path = Path(path)
    refuse_shard(path, layers)  # before reading: one shard of several is not the model (unless --layers fits it)
    digest = hashlib.sha256()
    tensors, metadata = read_safetensors(path, digest)  # hashed as read: the hash is of these very bytes
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}  # stored bytes (as the header says)
    check_format_version(metadata, path)
    _refuse_other_artifacts(metadata, path)
    tensors, masks = unpack_packed(tensors)
    _check_no_stray_lineage(tensors)
    if layers is None:  # named layers are the user's choice
        _refuse_stored_once(tensors, metadata)
    tied = _widen_tied(tensors, masks)
    layout = "packed" if masks else "dense" if any(k.startswith(FPE_PREFIX + "mask:") for k in tensors) else "plain"
    if layers is None and "fpe.layers" in metadata:
        layers = metadata_json(metadata, "fpe.layers", where=path)
        if not (isinstance(layers, list) and layers and all(isinstance(k, str) for k in layers)):
            raise FPEError(f"{path}: metadata fpe.layers must be a JSON list of weight names, found {metadata['fpe.layers'][:80]!r}",
                           "name the layers with --layers")
    chain, unused = discover_layers(tensors, layers)
    for layer in chain:
        refuse_weight_dtype(layer.weight_key, layer.weight.dtype)
        if layer.bias is not None:
            refuse_weight_dtype(layer.bias_key, layer.bias.dtype, "biases")
    _attach_masks_and_lineage(chain, tensors, masks)
    _attach_ties(chain, tied)
    act, act_source = _resolve_activation(metadata, activation)
    unused = [u for u in unused if not u.startswith(FPE_PREFIX)]
    return Checkpoint(MLP(chain, act, dict(metadata)), layout, path, digest.hexdigest(), metadata, sizes, unused, act_source)


def _refuse_other_artifacts(metadata: dict[str, str], path: Path) -> None:
    """fpe's other safetensors artifacts are no model: a split plan, and a resume state (whose weights
    lack the run's masks, lineage and activation, so reading it as an MLP computes another network)."""
    kind = metadata.get("fpe.kind")
    if kind == "plan":
        raise FPEError(f"{path}: a split plan (written by fpe expand --save-plan), not a model",
                       f"apply it to the model it was made for: fpe expand MODEL --plan {path}")
    if kind == "resume-state":
        raise FPEError(f"{path}: a resume state of an interrupted fpe finetune/train run, not a model",
                       "continue the run: rerun the same command with --resume (the state lies beside its -o)")


def refuse_weight_dtype(key: str, dtype: torch.dtype, what: str = "weights") -> None:
    """The chain's weights and biases must be float16, bfloat16, float32 or float64: fpe ranks, splits and runs them."""
    if dtype in FLOAT_DTYPES:
        return
    readable = "float16, bfloat16, float32 or float64"
    if dtype.is_complex:
        raise FPEError(f"{key}: complex {what} ({dtype}) are not supported (fpe reads real {readable} {what})")
    if dtype.is_floating_point:  # float8: quantized storage
        raise FPEError(f"{key}: {dtype} {what} are not supported (fpe reads {readable} {what})",
                       "dequantize first: save w.to(torch.float32) (times its scale, if the file keeps one)")
    raise FPEError(f"{key}: {what} must be floating point ({readable}), found {dtype}",
                   "a quantized checkpoint? save the dequantized float tensors")


def check_finite(mlp: MLP) -> None:
    bad = non_finite_tensors(mlp)
    if bad:
        raise FPEError(f"non-finite (NaN or Inf) values in: {', '.join(bad)}", "fix or retrain the checkpoint")


def _without_masks(mlp: MLP) -> MLP:
    """The MLP for the plain layout, where a weight exists where it is non-zero: possible without loss only
    for a file that is not expanded and whose masks are exactly its non-zero entries (a plain file
    converted to packed or dense and back)."""
    for layer in mlp.layers:
        if layer.parents is not None or layer.tied is not None:
            raise FPEError("the plain layout cannot store an expanded model's lineage and masks",
                           "use --layout dense or packed")
        if layer.mask is not None and not torch.equal(layer.mask, layer.weight != 0):
            raise FPEError(f"the plain layout cannot store the mask of {layer.weight_key}: it holds weights that are "
                           "exactly zero (or zeros off the mask), which plain files count as missing",
                           "use --layout dense or packed")
    return replace(mlp, layers=[replace(layer, mask=None) for layer in mlp.layers])


def mlp_tensors(mlp: MLP, layout: str) -> dict[str, torch.Tensor]:
    """The tensors a layout stores for this MLP."""
    if layout not in LAYOUTS:
        raise FPEError(f"unknown layout {layout!r}", f"choose one of: {', '.join(LAYOUTS)}")
    if layout == "plain" and mlp.has_masks:
        mlp = _without_masks(mlp)
    out: dict[str, torch.Tensor] = {}
    for layer in mlp.layers:
        key = layer.weight_key
        mask = layer.support() if layout != "plain" else None  # a plain file's weights exist where non-zero
        if layer.tied is not None:
            if layout == "plain":
                raise FPEError("the plain layout cannot store tied columns", "use --layout dense or packed")
            out[f"{FPE_PREFIX}tied:{key}"] = lineage_counts(layer.tied)
        if layout == "packed":
            weight = layer.weight
            if layer.tied is not None:  # the shared parameter once: the first copy of each tied group
                first = first_of_groups(layer.tied)
                weight, mask = weight[:, first], mask[:, first]
            out[f"{FPE_PREFIX}values:{key}"] = packed_values(weight, mask)
            out[f"{FPE_PREFIX}zmask:{key}"] = encode_zmask(mask)
            out[f"{FPE_PREFIX}shape:{key}"] = torch.tensor(list(weight.shape), dtype=torch.int64)
        else:
            out[key] = effective_weight(layer) if layer.mask is not None else layer.weight
            if layout == "dense":
                out[f"{FPE_PREFIX}mask:{key}"] = mask
        if layer.bias is not None:
            out[layer.bias_key] = layer.bias
        if layer.parents is not None:
            out[f"{FPE_PREFIX}children:{key}"] = lineage_counts(layer.parents)
    return out


def fpe_metadata(mlp: MLP, layout: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    meta = {k: v for k, v in mlp.metadata.items() if k not in ("format",)}
    meta.update(extra or {})
    meta.update({
        "format": "pt",
        "fpe.version": __version__,
        "fpe.format_version": str(BASE_FORMAT_VERSION),
        "fpe.layout": layout,
        "fpe.activation": mlp.activation,
        "fpe.layers": json.dumps([layer.weight_key for layer in mlp.layers]),
    })
    needs = [BASE_FORMAT_VERSION]  # the oldest version that reads the file, so older fpe keeps reading what it can
    if any(layer.tied is not None for layer in mlp.layers):
        needs.append(TIED_FORMAT_VERSION)
    if layout == "packed":
        needs.append(ZMASK_FORMAT_VERSION)
    meta["fpe.format_version"] = str(max(needs))
    return meta


def save_checkpoint(mlp: MLP, path: Path, layout: str = "packed", metadata: dict[str, str] | None = None,
                    force: bool = False) -> int:
    """Write the MLP atomically in `layout`; returns the bytes written."""
    tensors = mlp_tensors(mlp, layout)
    return write_safetensors(Path(path), tensors, fpe_metadata(mlp, layout, metadata), force=force)
