"""`fpe expand`, `params`, `inspect`, `verify`, `convert`: the checkpoint-level commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .. import report
from ..errors import FPEError
from .common import (ActivationOpt, ForceOpt, JsonOpt, LayersOpt, ModelArg, QuietOpt, app, emit_json,
                     err_console, handle_errors, out_console, parse_layers, working)


def _pipeline():
    """The library (and torch) load when a command runs, not for --help or a usage error."""
    from .. import pipeline

    return pipeline


def _split_list(value: str | None) -> list[str]:
    """Comma-separated names or `re:` patterns; a comma inside (), [] or {} belongs to the pattern
    (`re:[0-9]{1,2}\\.weight` is one item)."""
    items, depth, current = [], 0, ""
    for char in value or "":
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth <= 0:
            items.append(current)
            current, depth = "", 0
        else:
            current += char
    return [v.strip() for v in items + [current] if v.strip()]


def _parse_alpha(value: str | None) -> int | None:
    """--alpha is read as text so that a non-integer gives one `Error:` line (exit 2), not a usage panel."""
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        raise FPEError(f"alpha must be an integer >= 2, got {value!r}", "e.g. --alpha 4") from None


@app.command()
@handle_errors
def expand(
    model: ModelArg,
    alpha: Annotated[Optional[str], typer.Option("--alpha", "-a", metavar="INTEGER", help="Children per hidden neuron (integer >= 2).")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split strategy: random, structured, clause, gram or activation (needs --data). \\[default: random]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for the split. \\[default: 0]")] = None,
    outgoing: Annotated[Optional[str], typer.Option(help="Children's outgoing weights: copy (paper), split (divide by alpha) or tie (copies stay one shared parameter: no pruning, the next layer sums siblings; fastest with --group-size, but less accurate in the evidence sweep). \\[default: copy]")] = None,
    targets: Annotated[Optional[str], typer.Option(help="Hidden layers to expand, comma-separated names; 're:' marks a regex. \\[default: all]")] = None,
    ignore: Annotated[Optional[str], typer.Option(help="Hidden layers never to expand (names or 're:' regexes).")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe: alpha, split, seed, outgoing, targets (with per-target alpha/split), ignore.")] = None,
    plan: Annotated[Optional[Path], typer.Option(help="Apply a saved split plan instead of computing one.")] = None,
    save_plan: Annotated[Optional[Path], typer.Option(help="Also write the split plan used (safetensors).")] = None,
    clause_map: Annotated[Optional[Path], typer.Option(help="Clause map (JSON/YAML) for --split clause.")] = None,
    clusters: Annotated[Optional[int], typer.Option(help="Feature clusters for --split gram. \\[default: 4*alpha]")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="With --split random: share one random partition among each group of this many consecutive parents (fast kernels).")] = None,
    expand_top: Annotated[Optional[float], typer.Option(help="Selective expansion: split only the N most polysemantic neurons per layer (a count, or a fraction < 1); the rest keep one child.")] = None,
    layout: Annotated[str, typer.Option(help="Output storage: packed (values + compressed mask) or dense (widened tensors + bool masks).")] = "packed",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file. \\[default: MODEL.fpe<alpha>.safetensors beside the input]")] = None,
    data: Annotated[Optional[str], typer.Option(help="Data set (npz or built-in name): test inputs probe the drift; train inputs calibrate --split activation.")] = None,
    probe_samples: Annotated[int, typer.Option(help="Probe inputs for the function drift; 0 skips it (the two forward passes cost about 6x the file I/O on large models).")] = 256,
    force: ForceOpt = False,
    layers: LayersOpt = None,
    activation: ActivationOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Expand every hidden neuron into alpha children that own disjoint subsets of its edges.

    The weight count stays exactly the source's (global magnitude pruning after copying outgoing
    columns; with --outgoing tie the copies are one shared parameter and nothing is pruned).
    FPE changes the function: the report shows the drift; fine-tune afterwards.

    Example:  fpe expand model.safetensors --alpha 4 --split random --seed 0 -o model.fpe4.safetensors

    Example:  fpe expand model.safetensors --alpha 4 --group-size 1024 --outgoing tie   (fastest to train, less accurate)
    """
    alpha = _parse_alpha(alpha)
    if layout not in ("packed", "dense"):  # before the work, not when writing (plain cannot hold masks)
        raise FPEError(f"unknown layout {layout!r} for an expanded model", "choose one of: packed, dense")
    opts = _pipeline().ExpandOptions(model, alpha, split, seed, outgoing, _split_list(targets), _split_list(ignore), recipe, plan,
                         save_plan, clause_map, clusters, group_size, layout, output, force, parse_layers(layers), activation, data)
    opts.expand_top = expand_top
    opts.probe_samples = probe_samples
    with working(escape(f"expanding {model} ..."), quiet or json_out):
        doc = _pipeline().expand_file(opts)
    emit_json(doc) if json_out else None if quiet else report.render_expand(doc, err_console)


@app.command()
@handle_errors
def params(model: ModelArg, layers: LayersOpt = None, activation: ActivationOpt = None, json_out: JsonOpt = False) -> None:
    """Parameter, neuron and byte counts per layer and in total (and the budget of an expanded file).

    Example:  fpe params model.fpe4.safetensors --json | jq .total.weights
    """
    doc = _pipeline().params_report(model, parse_layers(layers), activation)
    emit_json(doc) if json_out else report.render_params(doc, out_console)


@app.command()
@handle_errors
def inspect(model: ModelArg, layers: LayersOpt = None, activation: ActivationOpt = None, json_out: JsonOpt = False) -> None:
    """The chain found, every tensor with its dtype and shape, masks, lineage and metadata.

    Example:  fpe inspect model.safetensors
    """
    doc = _pipeline().inspect_report(model, parse_layers(layers), activation)
    emit_json(doc) if json_out else report.render_inspect(doc, out_console)


@app.command()
@handle_errors
def verify(
    model: ModelArg,
    source: Annotated[Optional[Path], typer.Option(help="The dense checkpoint it was expanded from: also check lineage and budget against it.")] = None,
    layers: LayersOpt = None,
    activation: ActivationOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check FPE's invariants; exit 3 naming each violation.

    Checks: off-mask weights exactly zero, weights equal the budget, siblings own disjoint edges,
    and with --source: children's edges are their parent's, and the source is the file expanded.

    Example:  fpe verify model.fpe4.safetensors --source model.safetensors
    """
    doc = _pipeline().verify_file(model, source, parse_layers(layers), activation)
    emit_json(doc) if json_out else report.render_verify(doc, out_console)


@app.command()
@handle_errors
def convert(
    model: ModelArg,
    layout: Annotated[str, typer.Option(help="Target layout: dense, packed or plain (plain: files that are not "
                                              "expanded and whose masks are their non-zero weights).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file.")],
    force: ForceOpt = False,
    layers: LayersOpt = None,
    activation: ActivationOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Lossless change of storage layout (packed <-> dense, and back to plain for files that were plain).

    Example:  fpe convert model.fpe4.safetensors --layout dense -o model.fpe4.dense.safetensors
    """
    doc = _pipeline().convert_file(model, layout, output, force, parse_layers(layers), activation)
    if json_out:
        emit_json(doc)
    elif not quiet:
        report.render_convert(doc, err_console)
