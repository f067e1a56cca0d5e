"""Sharded checkpoints (Hugging Face `save_pretrained`): recognise them and say how to merge them.

A sharded checkpoint is `model-00001-of-00002.safetensors`, ... plus `model.safetensors.index.json`,
whose `weight_map` names the shard that holds each tensor. One shard alone is not the model: a layer's
weight and bias, or the layers of the MLP, can sit in different shards, and expanding a shard as if it
were the whole model computes another network. fpe reads one file, so a shard is refused with a
one-line merge recipe instead of being misread, unless `--layers` names a chain whose weights and
biases the shard holds itself (one block's MLP of a big model). The index itself, and other text files
given as a model, are named as what they are rather than as a truncated safetensors file.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path

from .errors import FPEError
from .names import bias_candidates

INDEX_SUFFIX = ".index.json"
TEXT_SAMPLE = 1 << 20  # bytes read to tell a text file from a broken safetensors file
MAX_INDEX_BYTES = 64 << 20  # a larger "index" is something else; it is never read whole
SAFE_PATH = re.compile(r"[^'\"$`\\]*")  # paths that can be pasted into the quoted one-liner as they are


def merge_hint(index: Path) -> str:
    """A one-liner that writes the shards listed by `index` as one safetensors file beside it."""
    target = index.with_name(index.name[: -len(INDEX_SUFFIX)]) if index.name.endswith(INDEX_SUFFIX) else \
        index.with_name("model.safetensors")
    if not (SAFE_PATH.fullmatch(str(index)) and SAFE_PATH.fullmatch(str(target))):
        return (f"merge the shards into one file first: load_file every shard that {index.name} lists and save_file "
                "the union of their tensors (safetensors.torch)")
    return ("merge the shards into one file first: python -c \"import json, pathlib; from safetensors.torch import "
            f"load_file, save_file; i = pathlib.Path('{index}'); m = json.loads(i.read_text())['weight_map']; "
            "save_file({k: v for f in sorted(set(m.values())) for k, v in load_file(i.parent / f).items()}, "
            f"'{target}')\"")


def _weight_map(index: Path) -> dict[str, str] | None:
    """The index's tensor -> shard map, or None when the file is not a shard index (a FIFO or a huge
    file named like one is never read)."""
    try:
        if not index.is_file() or index.stat().st_size > MAX_INDEX_BYTES:
            return None
        doc = json.loads(index.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        return None
    return weight_map


def _shards(weight_map: dict[str, str]) -> list[str]:
    return sorted(set(weight_map.values()))


def _describe_shards(shards: list[str]) -> str:
    return ", ".join(shards[:3]) + (f", ... ({len(shards)} files)" if len(shards) > 3 else "")


def refuse_index(path: Path, weight_map: dict[str, str]) -> None:
    shards = _shards(weight_map)
    raise FPEError(f"{path}: the index of a sharded checkpoint ({len(weight_map)} tensors in {len(shards)} shard(s): "
                   f"{_describe_shards(shards)}), not a safetensors file; fpe reads one file holding the whole MLP",
                   merge_hint(path))


def _needed(layers: list[str]) -> set[str]:
    """The tensors a `--layers` chain reads: each named weight (as given, or with `.weight`) and its biases."""
    keys = {k for name in layers for k in (name, f"{name}.weight")}
    return keys | {b for k in keys for b in bias_candidates(k)}


def refuse_shard(path: Path, layers: list[str] | None = None) -> None:
    """A file that an index beside it calls one of several shards: refused, unless `layers` (--layers) names
    a chain none of whose weights or biases the index puts in another shard."""
    path = Path(path)
    if not path.is_file():
        return  # the reader says what is wrong with it
    for index in sorted(path.parent.glob(f"*{INDEX_SUFFIX}")):
        weight_map = _weight_map(index)
        if weight_map is None or path.name not in weight_map.values():
            continue
        elsewhere = sorted(k for k, f in weight_map.items() if f != path.name)
        if layers:
            elsewhere = sorted(_needed(layers) & set(elsewhere))
        if elsewhere:
            shards = _shards(weight_map)
            raise FPEError(f"{path}: one of {len(shards)} shards of a sharded checkpoint ({index.name} puts "
                           f"{len(elsewhere)} {'tensor(s) the chain needs' if layers else 'other tensor(s)'}, e.g. "
                           f"{elsewhere[0]}, in {_describe_shards([f for f in shards if f != path.name])}); one shard "
                           "is not the model", merge_hint(index))
        return  # the index puts every tensor (or every one the chain needs) in this file


def missing_file_hint(path: Path) -> str | None:
    """For a model file that does not exist: point at the shard index that stands in its place."""
    index = Path(path).with_name(Path(path).name + INDEX_SUFFIX)
    if _weight_map(index) is not None:
        return f"the checkpoint is sharded: {index} lists its shards; " + merge_hint(index)
    return None


def refuse_text(path: Path) -> None:
    """Called when a file is not a safetensors file: a shard index, or another text file (JSON, YAML,
    CSV, a note), is named as such instead of as a broken or truncated safetensors file."""
    with open(path, "rb") as fh:
        sample = fh.read(TEXT_SAMPLE)
    if not sample or b"\x00" in sample:
        return
    try:  # incremental: a character cut at the end of the sample is not an error
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(sample, final=False)
    except UnicodeDecodeError:
        return
    weight_map = _weight_map(Path(path)) if text.lstrip().startswith("{") else None
    if weight_map is not None:
        refuse_index(path, weight_map)
    kind = "JSON" if text.lstrip()[:1] in ("{", "[") else "text"
    raise FPEError(f"{path}: not a safetensors file (it is a {kind} file)",
                   "pass the .safetensors checkpoint itself (a config or index file describes it)")
