"""`fpe analyze`: the interference and polysemanticity report (metrics in analysis.py, rendering in
report_analysis.py, plots in plots.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .common import (ActivationOpt, ForceOpt, JsonOpt, LayersOpt, ModelArg, QuietOpt, app, emit_json, err_console,
                     handle_errors, note, out_console, parse_layers)


@app.command()
@handle_errors
def analyze(
    model: ModelArg,
    expanded: Annotated[Optional[Path], typer.Argument(help="An expansion of MODEL (written by fpe expand): adds fold changes (expanded / dense) through the lineage.", show_default=False)] = None,
    data: Annotated[Optional[str], typer.Option(help="Probe set for data metrics (class selectivity, dead neurons, density): an .npz file or a built-in name (digits, dnf:...); its test split is used.")] = None,
    samples: Annotated[Optional[int], typer.Option(help="Use only the first N probe samples. \\[default: all]")] = None,
    top: Annotated[int, typer.Option(help="Most polysemantic neurons (and parents) to list per layer.")] = 10,
    csv: Annotated[Optional[Path], typer.Option("--csv", help="Also write one CSV row per neuron to this file.")] = None,
    plots: Annotated[Optional[Path], typer.Option(help="Also write PNG plots (Gram heatmaps, first-layer weights, capacity histograms) into this directory; needs matplotlib.")] = None,
    force: ForceOpt = False,
    layers: LayersOpt = None,
    activation: ActivationOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Interference and polysemanticity of each hidden layer: feature capacity, neuron |cos|, polysemanticity.

    With a second (expanded) model: each metric's fold change, expanded / dense, per layer and for the
    most polysemantic parents. With --data: per-neuron class selectivity, dead neurons, density.

    Example:  fpe analyze model.safetensors model.fpe4.safetensors --data digits --plots plots/
    """
    from .. import plots as plotting  # matplotlib itself is imported only when --plots asks for it
    from .. import report_analysis as report  # the library (and torch) load when the command runs, not for --help

    report.check_outputs(csv, plots, force, inputs=(model, expanded, Path(data) if data and Path(data).exists() else None))
    plotting.check_plot_targets(plots, force)
    paths = [model] + ([expanded] if expanded is not None else [])
    with report.progress_bar(err_console, sys.stderr.isatty() and not (quiet or json_out)) as bar:
        result = report.analyze_files(paths, data, top, parse_layers(layers), activation, samples, progress=bar)
    for message in result.notes:  # warnings: on stderr even with --json (stdout keeps the one document)
        note(escape(message), quiet)
    rows, pngs = report.write_outputs(result, csv, plots, force)
    emit_json(result.doc) if json_out else report.render_analyze(result.doc, out_console)
    note(escape(f"wrote {rows} neuron rows to {csv}"), quiet or json_out or csv is None)
    note(escape(f"wrote {', '.join(map(str, pngs))}"), quiet or json_out or not pngs)
