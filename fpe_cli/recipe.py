"""User configuration files: YAML expansion recipes, clause maps, and target selection.

A recipe (YAML, loaded with yaml.safe_load; no tags):
    alpha: 4                 # default alpha for every target
    split: random            # default split
    seed: 0
    outgoing: copy           # or split
    targets:                 # which hidden layers to expand (default: all); first match wins
      - fc1                  # a layer name (prefix or weight key)
      - match: "re:layers\\.[0-9]+"   # `re:` marks a regular expression (full match)
        alpha: 2             # per-target overrides
        split: gram
    ignore: ["re:.*head.*"]  # never expand these
Command-line flags, when given, override the recipe's defaults; per-target entries override both.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .errors import JSON_ERRORS, FPEError
from .expand import Target
from .model import MLP

RECIPE_KEYS = {"alpha", "split", "seed", "outgoing", "targets", "ignore", "clusters", "group_size", "expand_top"}


@dataclass
class Selection:
    """Parsed target selection: patterns with optional per-target alpha/split."""

    targets: list[dict] = field(default_factory=list)  # [{"match": str, "alpha"?: int, "split"?: str}]
    ignore: list[str] = field(default_factory=list)


def read_yaml_or_json(path: Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise FPEError(f"{path}: no such {what} file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of the text
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, *JSON_ERRORS, yaml.YAMLError) as exc:  # ValueError also: yaml's own
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FPEError(f"{path}: cannot parse {what}: {first}") from None


def load_recipe(path: Path) -> dict:
    data = read_yaml_or_json(path, "recipe")
    if not isinstance(data, dict):
        raise FPEError(f"{path}: a recipe must be a mapping with keys such as alpha, split, targets")
    unknown = {str(k) for k in data} - RECIPE_KEYS  # YAML keys may be numbers (`1: 2`)
    if unknown:
        raise FPEError(f"{path}: unknown recipe key(s): {', '.join(sorted(unknown))}", f"allowed: {', '.join(sorted(RECIPE_KEYS))}")
    return data


def _as_list(value, what: str) -> list:
    """A recipe's `targets`/`ignore`: a list, or one name (never iterated character by character)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise FPEError(f"{what} must be a list of names or 're:' patterns, got {value!r}",
                       f"e.g. {what}: [fc1, \"re:layers\\\\.[0-9]+\"]")
    return value


def parse_selection(targets, ignore) -> Selection:
    """Normalise targets (strings or mappings) and ignore patterns from flags or a recipe."""
    targets, ignore = _as_list(targets, "targets"), _as_list(ignore, "ignore")
    entries = []
    for item in targets:
        if isinstance(item, str):
            entries.append({"match": item})
        elif isinstance(item, dict) and isinstance(item.get("match"), str) and set(item) <= {"match", "alpha", "split", "expand_top"}:
            entries.append(dict(item))
        else:
            raise FPEError(f"bad target entry {item!r}", "use a name, 're:REGEX', or {match: ..., alpha: N, split: NAME}")
    if not all(isinstance(p, str) for p in ignore or []):
        raise FPEError("ignore must be a list of names or 're:' patterns")
    return Selection(entries, list(ignore or []))


def pattern_matches(pattern: str, names: tuple[str, ...]) -> bool:
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise FPEError(f"bad regular expression {pattern!r}: {exc}") from None
        return any(rx.fullmatch(n) for n in names)
    return pattern in names


def select_targets(mlp: MLP, selection: Selection, alpha: int | None, split: str,
                   expand_top: float | None = None) -> list[Target]:
    """Hidden layers to expand, each with its alpha and split."""
    hidden = [(i, (layer.prefix, layer.weight_key)) for i, layer in enumerate(mlp.layers[:-1])]
    hidden_names = ", ".join(names[0] for _, names in hidden)
    if not hidden:
        only = mlp.layers[0]
        raise FPEError(f"the MLP is a single linear layer ({only.weight_key} {tuple(only.weight.shape)}): it has no "
                       "hidden layer to expand", "fpe expand widens the hidden layers of a chain of two or more linear layers")
    for entry in selection.targets:
        if not any(pattern_matches(entry["match"], names) for _, names in hidden):
            raise FPEError(f"target {entry['match']!r} matches no hidden layer", f"hidden layers: {hidden_names}")
    for pattern in selection.ignore:
        if not any(pattern_matches(pattern, names) for _, names in hidden):
            raise FPEError(f"ignore {pattern!r} matches no hidden layer", f"hidden layers: {hidden_names}")
    chosen = []
    for i, names in hidden:
        if any(pattern_matches(p, names) for p in selection.ignore):
            continue
        entry = next((e for e in selection.targets if pattern_matches(e["match"], names)), None)
        if selection.targets and entry is None:
            continue
        entry = entry or {}
        layer_alpha = entry.get("alpha", alpha)
        if layer_alpha is None:
            raise FPEError("--alpha is required (or set alpha in the recipe)")
        top = check_expand_top(entry.get("expand_top", expand_top), "expand_top")
        chosen.append(Target(i, _as_alpha(layer_alpha), str(entry.get("split", split)), top))
    if not chosen:
        raise FPEError("no hidden layer left to expand after --targets/--ignore", f"hidden layers: {hidden_names}")
    return chosen


def check_expand_top(top, name: str = "--expand-top"):
    """A neuron count (1, 2, ...) or a fraction in (0, 1); None passes. NaN, Inf and 1.5 neurons do not."""
    if top is not None and (isinstance(top, bool) or not isinstance(top, (int, float))
                            or (isinstance(top, float) and not math.isfinite(top))  # a huge int is finite
                            or top <= 0 or (top >= 1 and top != int(top))):
        raise FPEError(f"{name} must be a neuron count (1, 2, ...) or a fraction in (0, 1), got {top!r}")
    return top


def _as_alpha(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise FPEError(f"alpha must be an integer >= 2, got {value!r}")
    return value


def load_clause_map(path: Path, num_inputs: int) -> torch.Tensor:
    """Clause map -> (num_inputs,) int64 group id per input, -1 for inputs in no group.

    Accepted (JSON or YAML): {"groups": [[inputs of group 0], [..group 1], ...]},
    a list of length num_inputs of group ids (-1 or null: no group), or a mapping {input: group}.
    """
    data = read_yaml_or_json(path, "clause map")
    groups = torch.full((num_inputs,), -1, dtype=torch.int64)
    pairs = _clause_pairs(data, path, num_inputs)
    problems = []
    for inp, grp in pairs:
        if not 0 <= inp < num_inputs:
            problems.append(f"input {inp} is out of range for a layer with {num_inputs} inputs")
        elif groups[inp] >= 0 and groups[inp] != grp:
            problems.append(f"input {inp} is in two groups ({int(groups[inp])} and {grp})")
        else:
            groups[inp] = grp
    if problems:
        raise FPEError(f"{path}: clause map does not match the model: " + "; ".join(problems[:5]))
    if not (groups >= 0).any():
        raise FPEError(f"{path}: clause map assigns no input to a group")
    return groups


def _clause_pairs(data, path: Path, num_inputs: int) -> list[tuple[int, int]]:
    def as_int(v):
        if isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, str) and not v.lstrip("-").isdigit()):
            raise FPEError(f"{path}: clause map entries must be integers, found {v!r}")
        if not -2**62 <= int(v) < 2**62:  # group ids are stored as int64
            raise FPEError(f"{path}: clause map entry {v!r} is out of range", "inputs are numbered from 0, groups 0, 1, 2, ...")
        return int(v)

    if isinstance(data, dict) and "groups" in data:
        if not isinstance(data["groups"], list) or not all(isinstance(g, list) for g in data["groups"]):
            raise FPEError(f"{path}: 'groups' must be a list of lists of input indices")
        return [(as_int(i), g) for g, members in enumerate(data["groups"]) for i in members]
    if isinstance(data, list):
        if len(data) != num_inputs:
            raise FPEError(f"{path}: the clause map lists {len(data)} inputs but the layer has {num_inputs}",
                           "give one group id per input (-1 or null for none)")
        return [(i, as_int(g)) for i, g in enumerate(data) if g is not None and as_int(g) >= 0]
    if isinstance(data, dict):
        return [(as_int(k), as_int(v)) for k, v in data.items() if v is not None and as_int(v) >= 0]
    raise FPEError(f"{path}: a clause map must be {{'groups': [[...], ...]}}, a list, or a mapping")
