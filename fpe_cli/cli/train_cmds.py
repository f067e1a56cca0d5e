"""`fpe data`, `train`, `finetune`, `evaluate`: data sets, dense baselines, locked-mask fine-tuning."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..report import markup_safe, print_table
from .common import (ActivationOpt, ForceOpt, JsonOpt, LayersOpt, ModelArg, QuietOpt, app, emit_json, err_console,
                     handle_errors, note, out_console, parse_layers)

DataOpt = Annotated[str, typer.Option("--data", "-d", help="An .npz file (x_train, y_train, x_test, y_test) or a built-in: digits, dnf:vars=32,clauses=8,k=3,...")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file.")]
EpochsOpt = Annotated[int, typer.Option(help="Passes over the training data.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Learning rate.")]
BatchOpt = Annotated[int, typer.Option(help="Global batch size (split over ranks under torchrun).")]
OptimOpt = Annotated[str, typer.Option(help="adam, adamw or sgd (any case).")]
MomentumOpt = Annotated[float, typer.Option(help="SGD momentum.")]
DecayOpt = Annotated[float, typer.Option(help="Weight decay (L2 for adam/sgd, decoupled for adamw).")]
SeedOpt = Annotated[int, typer.Option(help="Seed for initialisation and shuffling.")]
EveryOpt = Annotated[int, typer.Option(help="Write a resume state every N epochs (OUT.resume.safetensors, removed on success); 0: never.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the resume state of an interrupted run with the same settings.")]


def _workflows():
    """The library (and torch) load when a command runs, not for --help or a usage error."""
    from .. import train_pipeline

    return train_pipeline


def is_main_process() -> bool:
    from ..distributed import is_main_process as main_process

    return main_process()


def _config(*args):
    from ..train import TrainConfig

    return TrainConfig(*args)


@contextlib.contextmanager
def progress(label: str, quiet: bool) -> Iterator:
    """A rich progress bar (epoch, loss, accuracy) on a terminal; no callback at all otherwise."""
    if quiet or not sys.stderr.isatty() or not is_main_process():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                  TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(label, total=None, stats="")

        def update(ev: dict) -> None:
            bar.update(task, total=ev["epochs"], completed=ev["epoch"], stats=f"loss {ev['loss']:.4f} acc {ev['accuracy']:.3f}")

        yield update


def _say(doc: dict, json_out: bool, quiet: bool, text: str) -> None:
    if not is_main_process():
        return
    emit_json(doc) if json_out else note(escape(text), quiet)
    _notes(doc, json_out or quiet)


def _notes(doc: dict, quiet: bool) -> None:
    """Warnings the workflow collected (one-hot labels read as multi-label, tensors outside the chain);
    in --json mode they are the document's `notes`."""
    for text in doc.get("notes", []):
        note(f"[yellow]note:[/] {escape(text)}", quiet)


def _acc(metrics: dict) -> str:
    return f"loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.4f}"


@app.command()
@handle_errors
def data(
    name: Annotated[str, typer.Argument(help="digits[:test=0.25,seed=0], dnf:key=value,... or an .npz file.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .npz file.")],
    clause_map: Annotated[Optional[Path], typer.Option(help="Also write the clause map (JSON) of a dnf data set.")] = None,
    force: ForceOpt = False, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Write a built-in data set to .npz (x_train, y_train, x_test, y_test), and a DNF set's clause map.

    Example:  fpe data dnf:vars=48,clauses=16,k=3,seed=0 -o dnf.npz --clause-map clauses.json
    """
    doc = _workflows().data_file(name, output, clause_map, force)
    d = doc["data"]
    _say(doc, json_out, quiet, f"wrote {output} ({d['train']} train / {d['test']} test, {d['inputs']} inputs, "
                               f"{d['outputs']} {'labels' if d['multilabel'] else 'classes'})"
                               + (f" and {clause_map}" if clause_map else ""))


@app.command()
@handle_errors
def train(
    data: DataOpt, hidden: Annotated[str, typer.Option(help="Hidden widths, comma-separated, e.g. 64 or 64,32.")],
    activation: Annotated[str, typer.Option(help="relu, gelu, tanh, sigmoid, silu, leaky_relu or identity.")] = "relu",
    epochs: EpochsOpt = 20, lr: LrOpt = 1e-3, batch_size: BatchOpt = 64, optimizer: OptimOpt = "adam",
    momentum: MomentumOpt = 0.9, weight_decay: DecayOpt = 0.0, seed: SeedOpt = 0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file. \\[default: <data>_mlp.safetensors]")] = None,
    checkpoint_every: EveryOpt = 0, resume: ResumeOpt = False, force: ForceOpt = False, json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a dense MLP baseline (plain nn.Sequential names); settings, data hash and metrics go into its metadata.

    Example:  fpe train --data digits --hidden 32 --epochs 30 --seed 0 -o digits_mlp.safetensors
    """
    cfg = _config(epochs, lr, batch_size, optimizer, momentum, weight_decay, seed)
    with progress("train", quiet or json_out) as callback:
        doc = _workflows().train_file(data, _workflows().parse_hidden(hidden), activation, cfg, output, force, checkpoint_every, resume, callback)
    _say(doc, json_out, quiet, f"wrote {doc['output']} ({'-'.join(map(str, doc['widths']))}): test {_acc(doc['test'])}")


@app.command()
@handle_errors
def finetune(
    model: ModelArg, data: DataOpt, epochs: EpochsOpt = 10, lr: LrOpt = 1e-3, batch_size: BatchOpt = 64,
    optimizer: OptimOpt = "adam", momentum: MomentumOpt = 0.9, weight_decay: DecayOpt = 0.0, seed: SeedOpt = 0,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file. \\[default: MODEL.ft.safetensors beside the input]")] = None,
    checkpoint_every: EveryOpt = 10, resume: ResumeOpt = False, force: ForceOpt = False,
    layers: LayersOpt = None, activation: ActivationOpt = None, json_out: JsonOpt = False, quiet: QuietOpt = False,
) -> None:
    """Fine-tune a dense or expanded checkpoint with every mask locked; writes the input's layout back.

    Masked weights stay exactly zero (gradients masked, weights re-masked and optimizer state zeroed
    after every step); a violation at the end exits 3. Run under torchrun for data parallelism.

    Example:  fpe finetune model.fpe4.safetensors --data digits --epochs 30 -o model.fpe4.ft.safetensors
    """
    cfg = _config(epochs, lr, batch_size, optimizer, momentum, weight_decay, seed)
    with progress("finetune", quiet or json_out) as callback:
        doc = _workflows().finetune_file(model, data, cfg, output, force, checkpoint_every, resume, callback, parse_layers(layers), activation)
    _say(doc, json_out, quiet, f"wrote {doc['output']} ({doc['layout']}, {doc['counts']['weights']} weights): "
                               f"test accuracy {doc['before']['accuracy']:.4f} -> {doc['test']['accuracy']:.4f}")


@app.command()
@handle_errors
def evaluate(
    models: Annotated[list[Path], typer.Argument(help="One or more safetensors checkpoints.", show_default=False)],
    data: DataOpt, layers: LayersOpt = None, activation: ActivationOpt = None, json_out: JsonOpt = False,
) -> None:
    """Loss and accuracy of one or more checkpoints side by side, with their weight counts.

    Multi-label data: accuracy is exact match (every label right); label acc. is the mean per-label accuracy.

    Example:  fpe evaluate dense.safetensors dense.fpe4.ft.safetensors --data digits
    """
    doc = _workflows().evaluate_files(models, data, parse_layers(layers), activation)
    emit_json(doc) if json_out else print_table(out_console, evaluation_table(doc))
    _notes(doc, json_out)


def evaluation_table(doc: dict) -> Table:
    doc = markup_safe(doc)
    multilabel = doc["data"]["multilabel"]
    table = Table(title=f"{doc['data']['name']} (test: {doc['data']['test']} samples)")
    for col in ("model", "layout", "widths", "weights", "non-zero", "biases", "test loss", "test acc", "train acc"):
        left = col in ("model", "layout", "widths")
        table.add_column(col, justify="left" if left else "right")
    if multilabel:
        table.add_column("label acc", justify="right")
    for row in doc["models"]:
        cells = [row["model"], row["layout"], "-".join(map(str, row["widths"])), f"{row['weights']:,}",
                 f"{row['nonzero_weights']:,}", f"{row['biases']:,}", f"{row['test']['loss']:.4f}",
                 f"{row['test']['accuracy']:.4f}", f"{row['train']['accuracy']:.4f}"]
        table.add_row(*cells, *([f"{row['test']['label_accuracy']:.4f}"] if multilabel else []))
    return table
