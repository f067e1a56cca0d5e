"""File-level workflows behind `fpe data`, `train`, `finetune` and `evaluate`: load, run, save, report.

Each function returns the JSON document the command prints. Under torchrun every rank runs the
work; only rank 0 writes files (the trained weights are identical on every rank).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from .checkpoint import check_finite, load_checkpoint, recorded_budget, save_checkpoint
from .data import (Dataset, check_input_width, check_output_width, label_notes, load_dataset, write_clause_map,
                   write_dataset_npz)
from .distributed import context, finish as finish_distributed
from .errors import FPEError, VerificationError
from .outputs import check_writable, outputs_together
from .train import Callback, TrainConfig, evaluate, finetune, train_dense
from .verify import check_invariants, model_counts


def parse_hidden(text: str) -> list[int]:
    try:
        widths = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise FPEError(f"--hidden must be comma-separated integers, got {text!r}", "e.g. --hidden 64 or --hidden 64,32") from None
    if not widths or min(widths) < 1:
        raise FPEError(f"--hidden needs positive widths, got {text!r}", "e.g. --hidden 64 or --hidden 64,32")
    return widths


def data_stem(spec: str) -> str:
    """`digits` -> digits, `dnf:vars=8` -> dnf, `path/to/set.npz` -> set."""
    if spec.endswith(".npz") or Path(spec).is_file():  # a path may hold ':' (runs/a:b/set.npz)
        return Path(spec).stem
    return spec.split(":", 1)[0]


def state_path_for(output: Path) -> Path:
    """Where the resume state of a run writing `output` lives: `OUT.resume.safetensors` beside it."""
    name = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(name + ".resume.safetensors")


def _data_record(dataset: Dataset) -> dict:
    info = {k: v for k, v in dataset.info.items() if k != "literals"}
    return {**dataset.summary(), "info": info}


def _counts(mlp) -> dict:
    total = model_counts(mlp)["total"]
    return {k: total[k] for k in ("weights", "nonzero_weights", "biases", "hidden_neurons")}


def _not_in_chain(ckpt, what: str) -> list[str]:
    """A note naming the tensors of the file that are not part of the MLP chain (a norm, an embedding)."""
    if not ckpt.unused:
        return []
    shown = ", ".join(ckpt.unused[:8]) + (f", ... ({len(ckpt.unused)} tensors)" if len(ckpt.unused) > 8 else "")
    return [f"{ckpt.path}: not part of the MLP chain, so {what}: {shown}"]


def _check_classes(dataset: Dataset) -> None:
    """A classifier trained on one class learns nothing (its loss is 0 from the start)."""
    if not dataset.multilabel and dataset.num_classes < 2:
        label = int(dataset.y_train[0])
        raise FPEError(f"{dataset.name}: every label is {label}: a classifier needs at least two classes",
                       "check the labels, or store num_classes in the .npz when a class is missing from this sample")


def data_inputs(data: str) -> tuple[Path, ...]:
    """The data file behind a spec, if it is a file: outputs must never overwrite it."""
    path = Path(data)
    return (path,) if path.exists() else ()


def check_checkpoint_every(every: int) -> None:
    if every < 0:
        raise FPEError(f"--checkpoint-every must be >= 0 (0: no resume state), got {every}", "e.g. --checkpoint-every 5")


def check_run_outputs(output: Path, state: Path, inputs: tuple[Path, ...], force: bool, resume: bool) -> None:
    """Refuse outputs that would overwrite an input: the output itself and the resume state beside it."""
    check_writable(output, force=force, inputs=inputs)
    for src in inputs:
        if src.exists() and state.exists() and state.resolve() == src.resolve():
            raise FPEError(f"{state}: the resume state of -o {output} would overwrite an input",
                           "choose another -o path")
    if state.exists() and not resume and not force:
        raise FPEError(f"{state}: a resume state of an earlier run exists",
                       "pass --resume to continue it, or --force to start over")


def start_over(state: Path, force: bool, resume: bool) -> None:
    """--force without --resume starts over: the earlier run's state goes now, so that this run's first save
    replaces nothing (one that appears later is another run's, see resume.save_state)."""
    if force and not resume and context().is_main:
        state.unlink(missing_ok=True)


@contextlib.contextmanager
def _no_state_after_failed_checks(state: Path, checkpoint_every: int) -> Iterator[None]:
    """Training that fails its final checks (diverged to NaN, a weight off its mask) writes no output,
    and the resume state it saved holds those same weights: resuming it cannot succeed, and leaving it
    would make the next run stop at 'a resume state exists'. Interruptions keep the state."""
    try:
        yield
    except VerificationError:
        if checkpoint_every and context().is_main:
            state.unlink(missing_ok=True)
        raise


def _finish(output: Path, state: Path, checkpoint_every: int) -> None:
    """The output is safely written: the resume state has served its purpose. Also without
    --checkpoint-every: a state left by an interrupted earlier run (--force started over, or --resume
    continued it) would otherwise outlive the output and be taken for this run's. Under torchrun the
    ranks then wait for each other and close the process group."""
    if context().is_main:
        state.unlink(missing_ok=True)
    finish_distributed()


# ---------------------------------------------------------------- commands


def data_file(spec: str, output: Path, clause_map: Path | None, force: bool) -> dict:
    check_writable(output, force=force, inputs=data_inputs(spec))  # never over the .npz it reads, even with --force
    if clause_map is not None:  # both before the data set is made (a large DNF takes a while)
        check_writable(clause_map, force=force, inputs=data_inputs(spec), outputs={"-o": output}, flag="--clause-map")
    dataset = load_dataset(spec)
    groups = dataset.info.get("groups")
    if clause_map is not None and groups is None:
        raise FPEError(f"{dataset.name}: has no clause map (only dnf data sets do)", "drop --clause-map")
    with outputs_together():  # a clause map that cannot be written leaves no data set behind
        doc = {"data": dataset.summary(), "output": str(output), "bytes": write_dataset_npz(dataset, output, force)}
        if clause_map is not None:
            doc.update(clause_map=str(clause_map),
                       clause_map_bytes=write_clause_map(groups, clause_map, dataset.num_inputs, force))
    if not dataset.multilabel:
        doc["label_counts"] = dataset.y_train.bincount(minlength=dataset.num_classes).tolist()
    else:
        doc["positive_rate"] = dataset.y_train.mean(dim=0).tolist()
    return doc


def train_file(data: str, hidden: list[int], activation: str, cfg: TrainConfig, output: Path | None, force: bool,
               checkpoint_every: int = 0, resume: bool = False, callback: Callback = None) -> dict:
    check_checkpoint_every(checkpoint_every)
    dataset = load_dataset(data)
    _check_classes(dataset)
    output = output or Path(f"{data_stem(data)}_mlp.safetensors")
    state = state_path_for(output)
    check_run_outputs(output, state, data_inputs(data), force, resume)
    start_over(state, force, resume)
    with _no_state_after_failed_checks(state, checkpoint_every):
        mlp, metrics = train_dense(dataset, hidden, activation=activation, **asdict(cfg), callback=callback,
                                   checkpoint_every=checkpoint_every, state_path=state, resume=resume)
    settings = {"hidden": hidden, "activation": activation, **asdict(cfg), "world_size": metrics["world_size"]}
    meta = {"fpe.train.settings": json.dumps(settings, sort_keys=True),
            "fpe.train.data": json.dumps(_data_record(dataset), sort_keys=True),
            "fpe.train.metrics": json.dumps({k: metrics[k] for k in ("train", "test")}, sort_keys=True)}
    size = save_checkpoint(mlp, output, "plain", meta, force=force) if context().is_main else 0
    _finish(output, state, checkpoint_every)
    doc = {"output": str(output), "bytes": size, "widths": mlp.widths, "settings": settings,
           "data": dataset.summary(), "counts": _counts(mlp), **metrics}
    return _with_notes(doc, label_notes(dataset))


def _with_notes(doc: dict, notes: list[str]) -> dict:
    """`notes`: warnings for the user (printed on stderr), only when there are any."""
    return {**doc, "notes": notes} if notes else doc


def default_finetune_output(model: Path) -> Path:
    name = model.name[: -len(".safetensors")] if model.name.endswith(".safetensors") else model.stem
    return model.with_name(f"{name}.ft.safetensors")


def finetune_file(model: Path, data: str, cfg: TrainConfig, output: Path | None, force: bool, checkpoint_every: int = 0,
                  resume: bool = False, callback: Callback = None, layers: list[str] | None = None,
                  activation: str | None = None) -> dict:
    check_checkpoint_every(checkpoint_every)
    ckpt = load_checkpoint(model, layers, activation)
    check_finite(ckpt.mlp)
    if ckpt.mlp.is_expanded:  # a broken expansion (masks dropped, siblings sharing edges) must not train
        problems = check_invariants(ckpt.mlp, recorded_budget(ckpt.metadata))
        if problems:
            raise VerificationError(problems, f"{model} breaks FPE's invariants; fine-tuning it would keep them "
                                      "broken (see fpe verify)")
    dataset = load_dataset(data)
    output = output or default_finetune_output(model)
    state = state_path_for(output)
    check_run_outputs(output, state, (model, *data_inputs(data)), force, resume)
    start_over(state, force, resume)
    with _no_state_after_failed_checks(state, checkpoint_every):
        tuned, metrics = finetune(ckpt.mlp, dataset, **asdict(cfg), checkpoint_every=checkpoint_every,
                                  state_path=state, resume=resume, callback=callback)
    settings = {**asdict(cfg), "masks_locked": tuned.has_masks, "world_size": metrics["world_size"]}
    meta = {"fpe.finetune.settings": json.dumps(settings, sort_keys=True),
            "fpe.finetune.data": json.dumps(_data_record(dataset), sort_keys=True),
            "fpe.finetune.metrics": json.dumps({k: metrics[k] for k in ("before", "train", "test")}, sort_keys=True),
            "fpe.finetune.source_sha256": json.dumps(ckpt.sha256),
            "fpe.finetune.source_file": json.dumps(model.name)}
    size = save_checkpoint(tuned, output, ckpt.layout, meta, force=force) if context().is_main else 0
    _finish(output, state, checkpoint_every)
    doc = {"model": str(model), "output": str(output), "layout": ckpt.layout, "bytes": size, "settings": settings,
           "data": dataset.summary(), "counts": _counts(tuned), "counts_before": _counts(ckpt.mlp),
           "dropped_tensors": ckpt.unused, **metrics}  # in the input but not part of the MLP chain: not written
    return _with_notes(doc, label_notes(dataset) + _not_in_chain(ckpt, "not trained and not written"))


def evaluate_files(models: list[Path], data: str, layers: list[str] | None = None, activation: str | None = None) -> dict:
    dataset = load_dataset(data)
    rows, notes = [], label_notes(dataset)
    for path in models:
        ckpt = load_checkpoint(path, layers, activation)
        notes += _not_in_chain(ckpt, "not applied")
        check_input_width(dataset, ckpt.mlp.layers[0].in_features, f"{path} ({ckpt.mlp.layers[0].weight_key})")
        check_output_width(dataset, ckpt.mlp.layers[-1].out_features, f"{path} ({ckpt.mlp.layers[-1].weight_key})")
        rows.append({"model": str(path), "sha256": ckpt.sha256, "layout": ckpt.layout, "widths": ckpt.mlp.widths,
                     "expanded": ckpt.mlp.is_expanded, **_counts(ckpt.mlp),
                     "test": evaluate(ckpt.mlp, dataset, "test"), "train": evaluate(ckpt.mlp, dataset, "train")})
    return _with_notes({"data": dataset.summary(), "models": rows}, notes)
