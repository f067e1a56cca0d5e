"""`fpe analyze`: checkpoints (and a probe set) -> the analysis document; rich tables and CSV for it.

The metrics themselves live in `analysis.py` (pure tensors); this module reads files, assembles the
JSON document (schema `fpe.analyze/1`, see README) and renders it. No math beyond ranking.
"""

from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import analysis as A
from .checkpoint import Checkpoint, load_checkpoint
from .errors import ChainNotFoundError, FPEError
from .outputs import atomic_output, check_writable, outputs_together
from .report import markup_safe, print_table
from .verify import non_finite_tensors

SCHEMA = "fpe.analyze/1"
CSV_FIELDS = ("model", "role", "layer", "neuron", "parent", "polysemanticity", "norm", "class_selectivity", "density")


@dataclass
class Probe:
    """The probe set for data metrics: inputs, labels and where they came from."""

    x: torch.Tensor  # (N, d) float32
    y: torch.Tensor  # (N,) int64 or (N, C) float 0/1
    num_classes: int  # label groups: the classes present in the probe rows (ids renumbered), or C for (N, C)
    info: dict


@dataclass
class ModelAnalysis:
    role: str  # "model", or "dense" / "expanded" when two are compared
    ckpt: Checkpoint
    layers: list[A.LayerAnalysis]


@dataclass
class AnalyzeResult:
    doc: dict
    models: list[ModelAnalysis]
    notes: list[str] = field(default_factory=list)  # warnings for stderr (not part of the document)


class _Ticker:
    """Adapts a progress object (`start(total)`, `advance(n)`) or None to analysis' `progress(n)`."""

    def __init__(self, bar):
        self.bar = bar

    def start(self, total: int) -> None:
        if self.bar is not None:
            self.bar.start(total)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(n)


def load_probe(data: str, d_in: int, samples: int | None) -> tuple[Probe, list[str]]:
    """The test split of a data set (first `samples` rows) as the probe set, and notes on its labels.

    The labels group the probe rows; they need not be the model's classes (any grouping works, e.g. clause
    indicators). Class ids are renumbered to the classes present, so the class-conditional statistics are
    sized by those (a stray id such as 999999 would otherwise ask for gigabytes); classes without samples
    never enter the metrics anyway."""
    from .data import check_input_width, label_notes, load_dataset  # data sets only when asked for

    ds = load_dataset(data)
    check_input_width(ds, d_in)
    n = ds.x_test.shape[0] if samples is None else min(samples, ds.x_test.shape[0])
    if n < 1:
        raise FPEError(f"{data}: the probe set is empty", "give a data set with test rows, or a positive --samples")
    y, groups = ds.y_test[:n], ds.num_classes
    if not ds.multilabel:
        present, y = torch.unique(y, return_inverse=True)  # (classes present,), (n,) ids 0..present-1
        groups = int(present.numel())
    info = {"source": str(data), "split": "test", "samples": n, "num_classes": ds.num_classes,
            "classes_present": groups, "multilabel": ds.multilabel}
    return Probe(ds.x_test[:n].float(), y, groups, info), [f"note: {text}" for text in label_notes(ds)]


def _top_neurons(la: A.LayerAnalysis, top: int) -> list[dict]:
    rows = []
    for i in A.top_indices(la.polysemanticity, top):
        row = {"neuron": i, "parent": int(la.parents[i]) if la.parents is not None else None,
               "polysemanticity": float(la.polysemanticity[i]), "norm": float(la.norms[i])}
        for name in ("class_selectivity", "density"):
            row[name] = float(la.neuron_data[name][i]) if la.neuron_data else None
        rows.append(row)
    return rows


def layer_doc(la: A.LayerAnalysis, top: int) -> dict:
    return {"layer": la.key, "index": la.index, "neurons": la.shape[0], "features": la.shape[1],
            "expanded": la.parents is not None, "alpha": la.alpha, "metrics": dict(la.metrics),
            "top_neurons": _top_neurons(la, top)}


def _model_doc(m: ModelAnalysis, top: int) -> dict:
    c = m.ckpt
    return {"path": str(c.path), "role": m.role, "sha256": c.sha256, "layout": c.layout, "activation": c.mlp.activation,
            "widths": c.mlp.widths, "expanded": c.mlp.is_expanded, "layers": [layer_doc(la, top) for la in m.layers]}


def _load_compared(paths: list[Path], layers: list[str] | None, activation: str | None) -> list:
    """The checkpoints to analyze. Without --layers, a dense model whose chain names and shapes do not
    determine (an MLP inside a bigger model) is read with the chain its expansion records, as `fpe verify
    --source` does."""
    if layers is not None or len(paths) < 2:
        return [load_checkpoint(p, layers, activation) for p in paths]
    try:
        first = load_checkpoint(paths[0], None, activation)
    except ChainNotFoundError:
        expanded = load_checkpoint(paths[1], None, activation)
        recorded = [layer.weight_key for layer in expanded.mlp.layers]
        return [load_checkpoint(paths[0], recorded, activation), expanded]
    return [first, load_checkpoint(paths[1], None, activation)]


def analyze_files(paths: list[Path], data: str | None = None, top: int = 10, layers: list[str] | None = None,
                  activation: str | None = None, samples: int | None = None, *, chunk: int = A.CHUNK,
                  progress=None) -> AnalyzeResult:
    """The whole `fpe analyze`: one model, or a dense model and its expansion (fold changes via lineage)."""
    if top < 0:
        raise FPEError(f"--top must be >= 0, got {top}")
    if samples is not None and (isinstance(samples, bool) or samples < 1):
        raise FPEError(f"--samples must be a positive count of probe rows, got {samples}")
    if samples is not None and data is None:
        raise FPEError("--samples limits the --data probe set, and no --data was given",
                       "pass --data, e.g. --data digits")
    ckpts = _load_compared(paths, layers, activation)
    for p, c in zip(paths, ckpts):  # NaN/Inf would silently turn into "all-zero" features and skipped rows
        bad = non_finite_tensors(c.mlp)
        if bad:
            raise FPEError(f"{p}: non-finite (NaN or Inf) values in: {', '.join(bad)}; the metrics would be meaningless",
                           "fix or retrain the checkpoint")
    roles = ["model"] if len(ckpts) == 1 else ["dense", "expanded"]
    notes = []
    if len(ckpts) == 2:
        (d_in, *_, d_out), (x_in, *_, x_out) = ckpts[0].mlp.widths, ckpts[1].mlp.widths
        if (d_in, d_out) != (x_in, x_out):
            raise FPEError(f"{paths[1]} maps {x_in} -> {x_out} but {paths[0]} maps {d_in} -> {d_out}: "
                           "it was not expanded from it", "give the dense model first and its expansion second")
        recorded = ckpts[1].metadata.get("fpe.source_sha256")
        if recorded and recorded != ckpts[0].sha256:
            notes.append(f"note: {paths[1]} was expanded from another file (sha256 {recorded[:12]}..., "
                         f"{paths[0]} is {ckpts[0].sha256[:12]}...): its children are compared with parents they "
                         "did not come from")
    probe = None
    if data is not None:
        probe, probe_notes = load_probe(data, ckpts[0].mlp.layers[0].in_features, samples)
        notes += probe_notes
    ticker = _Ticker(progress)
    batches = -(-probe.x.shape[0] // A.BATCH) if probe else 0
    ticker.start(sum(A.work_units(c.mlp, chunk) + batches for c in ckpts))
    models = []
    for role, c in zip(roles, ckpts):
        stats = A.activation_stats(c.mlp, probe.x, probe.y, probe.num_classes, progress=ticker) if probe else None
        models.append(ModelAnalysis(role, c, A.analyze_mlp(c.mlp, stats, chunk=chunk, progress=ticker)))
    comparison = A.compare(models[0].layers, models[1].layers, top) if len(models) == 2 else None
    doc = {"schema": SCHEMA, "top": top, "data": probe.info if probe else None,
           "models": [_model_doc(m, top) for m in models], "comparison": comparison}
    return AnalyzeResult(doc, models, notes)


# ---------------------------------------------------------------- CSV


def csv_rows(result: AnalyzeResult):
    for m in result.models:
        for la in m.layers:
            for i in range(la.shape[0]):
                yield {"model": str(m.ckpt.path), "role": m.role, "layer": la.key, "neuron": i,
                       "parent": int(la.parents[i]) if la.parents is not None else "",
                       "polysemanticity": _csv_num(la.polysemanticity[i]), "norm": _csv_num(la.norms[i]),
                       "class_selectivity": _csv_num(la.neuron_data["class_selectivity"][i]) if la.neuron_data else "",
                       "density": _csv_num(la.neuron_data["density"][i]) if la.neuron_data else ""}


def _csv_num(value) -> str:
    v = float(value)
    return "" if math.isnan(v) else repr(v)


def write_outputs(result: AnalyzeResult, csv_path: Path | None, plots_dir: Path | None,
                  force: bool = False) -> tuple[int, list[Path]]:
    """The --csv file and the --plots PNGs, published together: a failure (a full disk) leaves none of them,
    nor the directories this call created for the plots."""
    created = [] if plots_dir is None else [d for d in (Path(plots_dir), *Path(plots_dir).parents) if not d.exists()]
    try:
        with outputs_together():
            rows = write_csv(result, csv_path, force) if csv_path is not None else 0
            if plots_dir is None:
                return rows, []
            from . import plots  # matplotlib only when --plots asks for it

            return rows, plots.write_plots(result, plots_dir, force)
    except BaseException:
        for directory in created:  # the plots directory first, then the parents this call created
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty
        raise


def write_csv(result: AnalyzeResult, path: Path, force: bool = False) -> int:
    """One row per neuron (every analyzed layer of every model); empty cells for undefined values."""
    n = 0
    # surrogateescape: file names that are not valid UTF-8 are written back as their original bytes
    with atomic_output(path, force=force) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                                       errors="surrogateescape") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in csv_rows(result):
            writer.writerow(row)
            n += 1
    return n


def check_outputs(csv_path: Path | None, plots_dir: Path | None, force: bool, inputs: tuple = ()) -> None:
    """Refuse before any work: a CSV path that is an input or exists without --force, a plots path that is a file."""
    if csv_path is not None:
        check_writable(Path(csv_path), force=force, inputs=tuple(Path(p) for p in inputs if p is not None))
    if plots_dir is not None and Path(plots_dir).exists() and not Path(plots_dir).is_dir():
        raise FPEError(f"{plots_dir}: --plots needs a directory, found a file", "name a directory (it is created if missing)")
    if plots_dir is not None and Path(plots_dir).is_dir():  # an existing one must take the plots (tried for real)
        check_writable(Path(plots_dir) / "gram.png", force=True, inputs=tuple(Path(p) for p in inputs if p is not None))


# ---------------------------------------------------------------- rich tables


def _f(value, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt) if isinstance(value, float) else str(value)


def _fold(value) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


SUMMARY_COLUMNS = (("capacity mean", "capacity_mean", ".3f"), ("capacity median", "capacity_median", ".3f"),
                   ("capacity sum", "capacity_sum", ".2f"), ("cap < 0.5", "capacity_fraction_below_half", ".1%"),
                   ("|cos| all", "cosine_mean_abs", ".3f"), ("|cos| non-sib", "cosine_mean_abs_non_sibling", ".3f"),
                   ("polysem. mean", "polysemanticity_mean", ".2f"), ("classes mean", "class_selectivity_mean", ".2f"),
                   ("dead", "dead_fraction", ".1%"), ("density", "activation_density", ".1%"))


def _summary_table(model: dict) -> Table:
    table = Table(title=f"fpe analyze: {model['path']} ({model['role']})", title_justify="left")
    has_data = any("dead_fraction" in layer["metrics"] for layer in model["layers"])
    cols = [c for c in SUMMARY_COLUMNS if has_data or c[1] not in ("class_selectivity_mean", "dead_fraction", "activation_density")]
    for name in ("layer", "neurons x features", "alpha") + tuple(c[0] for c in cols):
        table.add_column(name, justify="left" if name == "layer" else "right")
    for layer in model["layers"]:
        m = layer["metrics"]
        table.add_row(layer["layer"], f"{layer['neurons']} x {layer['features']}", _f(layer["alpha"]),
                      *[_f(m.get(key), fmt) for _, key, fmt in cols])
    return table


def _top_table(model: dict) -> Table:
    table = Table(title=f"most polysemantic neurons ({model['role']}): effective number of input features",
                  title_justify="left")
    for name in ("layer", "neuron", "parent", "polysemanticity", "|w|", "classes", "density"):
        table.add_column(name, justify="left" if name == "layer" else "right")
    for layer in model["layers"]:
        for r in layer["top_neurons"]:
            table.add_row(layer["layer"], str(r["neuron"]), _f(r["parent"]), _f(r["polysemanticity"], ".2f"),
                          _f(r["norm"], ".3f"), _f(r["class_selectivity"], ".2f"), _f(r["density"], ".1%"))
    return table


def _comparison_tables(doc: dict) -> list[Table]:
    tables = []
    dense, expanded = doc["models"]
    for cmp, d, x in zip(doc["comparison"], dense["layers"], expanded["layers"]):
        t = Table(title=f"dense vs. expanded: {cmp['layer']} ({cmp['neurons_dense']} -> {cmp['neurons_expanded']} neurons)",
                  title_justify="left")
        for name in ("metric", "dense", "expanded", "fold change"):
            t.add_column(name, justify="left" if name == "metric" else "right")
        for label, key, fmt in SUMMARY_COLUMNS:
            if key in x["metrics"]:
                dense_key = "cosine_mean_abs" if key == "cosine_mean_abs_non_sibling" else key  # dense: every pair
                t.add_row(label, _f(d["metrics"].get(dense_key), fmt), _f(x["metrics"].get(key), fmt),
                          _fold(cmp["fold_change"].get(key)))
        tables.append(t)
        tables.append(_parents_table(cmp))
    return tables


def _parents_table(cmp: dict) -> Table:
    t = Table(title=f"most polysemantic parents of {cmp['dense_layer']} and their children", title_justify="left")
    for name in ("parent", "children", "polysem. dense", "children mean", "fold", "classes dense", "children mean", "fold"):
        t.add_column(name, justify="right")
    for r in cmp["top_parents"]:
        t.add_row(str(r["parent"]), ",".join(map(str, r["children"])), _f(r["polysemanticity_dense"], ".2f"),
                  _f(r["polysemanticity_children_mean"], ".2f"), _fold(r["polysemanticity_fold_change"]),
                  _f(r.get("class_selectivity_dense"), ".2f"), _f(r.get("class_selectivity_children_mean"), ".2f"),
                  _fold(r.get("class_selectivity_fold_change")))
    return t


def render_analyze(doc: dict, console: Console) -> None:
    doc = markup_safe(doc)
    for model in doc["models"]:
        print_table(console, _summary_table(model))
    if doc["data"]:
        d = doc["data"]
        console.print(f"data metrics on {d['source']} ({d['split']} split, {d['samples']} samples, {d['num_classes']} classes, "
                      f"{d['classes_present']} of them present)")
    if doc["top"]:
        for model in doc["models"]:
            print_table(console, _top_table(model))
    for table in _comparison_tables(doc) if doc["comparison"] else []:
        print_table(console, table)
    console.print("capacity: higher = less interference (sum <= neurons); |cos|: lower = more orthogonal neurons")
    console.print("polysemanticity: effective number of input features per neuron; fold change = expanded / dense")


@contextlib.contextmanager
def progress_bar(console: Console, enabled: bool):
    """A rich progress bar on `console` when enabled (the caller checks for a terminal), else None."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("analyzing"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn(),
                  console=console, transient=True) as prog:
        task = prog.add_task("analyze", total=None)

        class Bar:
            def start(self, total: int) -> None:
                prog.update(task, total=total)

            def advance(self, n: int) -> None:
                prog.advance(task, n)

        yield Bar()
