"""Split plans on disk (`--save-plan` / `--plan`): a safetensors artifact of its own.

`plan.child:<key>` (int16, the producer weight's shape: the child owning each edge, -1 where the parent
has no edge), `plan.children:<key>` (int64 children per parent, for selective expansion) and `fpe.plan`
metadata: seed, source sha256, per layer alpha and split, and the settings that shaped the split.
The structure is checked here; the match with a model when the plan is applied (expand.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import BASE_FORMAT_VERSION
from .checkpoint import check_format_version, metadata_json
from .errors import FPEError
from .plan import LayerPlan, SplitPlan
from .stfile import read_safetensors, write_safetensors

PLAN_SETTINGS = ("split", "clusters", "group_size", "expand_top")  # what shapes a split, recorded in a plan
MAX_PLAN_ALPHA = 32767  # plans store child indices as int16 (and check_alpha refuses more)


def save_plan(plan: SplitPlan, path: Path, *, source_sha256: str = "", force: bool = False) -> int:
    """A split plan as its own safetensors artifact: `plan.child:<key>` int16 tensors + JSON metadata."""
    tensors = {f"plan.child:{p.weight_key}": p.child.to(torch.int16).contiguous() for p in plan.layers}
    tensors.update({f"plan.children:{p.weight_key}": p.children.to(torch.int64) for p in plan.layers if p.children is not None})
    meta = {
        "format": "pt",
        "fpe.kind": "plan",
        "fpe.format_version": str(BASE_FORMAT_VERSION),
        "fpe.plan": json.dumps({
            "seed": plan.seed,
            "source_sha256": source_sha256,
            "layers": [{"weight_key": p.weight_key, "alpha": p.alpha, "split": p.split} for p in plan.layers],
            **({"settings": plan.settings} if plan.settings else {}),
        }, sort_keys=True),
    }
    return write_safetensors(Path(path), tensors, meta, force=force)


def load_plan(path: Path) -> SplitPlan:
    """Read a plan file; structure is checked here, the match with a model when it is applied."""
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    check_format_version(metadata, path)
    if metadata.get("fpe.kind") != "plan":
        raise FPEError(f"{path}: not an fpe split plan (no fpe.kind=plan in its metadata)", "write one with --save-plan")
    info = metadata_json(metadata, "fpe.plan", {}, where=path)
    entries = info.get("layers", []) if isinstance(info, dict) else []
    seed = info.get("seed", 0) if isinstance(info, dict) else 0
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or isinstance(seed, bool) \
            or not isinstance(seed, int) or seed < 0 or not all(isinstance(e.get("split", ""), str) for e in entries):
        raise FPEError(f"{path}: malformed plan metadata (fpe.plan needs 'layers': [{{weight_key, alpha, split}}, ...] "
                       "with split a name, and an integer 'seed' >= 0)", "write the plan again with --save-plan")
    layers = []
    for entry in entries:
        key, alpha = entry.get("weight_key"), entry.get("alpha")
        child = tensors.get(f"plan.child:{key}")
        if child is None or child.ndim != 2 or child.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
            raise FPEError(f"{path}: plan entry {key!r} lacks a 2-D integer child tensor")
        if isinstance(alpha, bool) or not isinstance(alpha, int) or not 2 <= alpha <= MAX_PLAN_ALPHA:
            raise FPEError(f"{path}: plan entry {key!r} has alpha {alpha!r}; expected an integer in 2..{MAX_PLAN_ALPHA}")
        children = tensors.get(f"plan.children:{key}")
        if children is not None and (children.dtype != torch.int64 or tuple(children.shape) != (child.shape[0],)):
            raise FPEError(f"{path}: plan entry {key!r}: children counts must be int64 ({child.shape[0]},)")
        layers.append(LayerPlan(key, alpha, str(entry.get("split", "unknown")), child.to(torch.int16), children))
    if not layers:
        raise FPEError(f"{path}: the plan has no layers")
    settings = info.get("settings")  # absent in plans written before fpe recorded them
    if settings is not None and not (isinstance(settings, dict) and set(settings) <= set(PLAN_SETTINGS)):
        raise FPEError(f"{path}: malformed plan metadata (settings must map some of {', '.join(PLAN_SETTINGS)})",
                       "write the plan again with --save-plan")
    return SplitPlan(layers, seed, settings)
