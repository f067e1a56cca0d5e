"""Command workflows that connect files to the pure core: read -> plan -> expand -> write.

Each function takes paths and plain options, returns a JSON-ready report dict, and leaves
rendering to the CLI. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, check_finite, load_checkpoint, metadata_json, recorded_budget, save_checkpoint
from .errors import JSON_ERRORS, FPEError, VerificationError
from .expand import OUTGOING, ExpandResult, PlanInputs, expand_mlp, function_drift
from .outputs import check_writable, outputs_together
from .plan_file import PLAN_SETTINGS, load_plan, save_plan
from .plan import STRATEGIES
from .recipe import check_expand_top, load_clause_map, load_recipe, parse_selection, select_targets
from .stfile import read_header, sha256_file
from .verify import check_invariants, check_off_mask_zero, check_ties, compares_values, model_counts

PRUNE_RULE = "global-magnitude; ties: earlier layer, then row-major"


@dataclass
class ExpandOptions:
    model: Path
    alpha: int | None = None
    split: str | None = None
    seed: int | None = None
    outgoing: str | None = None
    targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    recipe: Path | None = None
    plan: Path | None = None
    save_plan: Path | None = None
    clause_map: Path | None = None
    clusters: int | None = None
    group_size: int | None = None
    layout: str = "packed"
    output: Path | None = None
    force: bool = False
    layers: list[str] | None = None
    activation: str | None = None
    probe_data: str | None = None
    probe_samples: int = 256
    expand_top: float | None = None
    calibration_samples: int = 512


def default_output(model: Path, alphas: set[int]) -> Path:
    tag = f"fpe{alphas.pop()}" if len(alphas) == 1 else "fpe"
    return model.with_name(f"{model.name.removesuffix('.safetensors')}.{tag}.safetensors")


def _resolve_settings(opts: ExpandOptions) -> dict:
    recipe = load_recipe(opts.recipe) if opts.recipe else {}

    def pick(flag, key, default):
        return flag if flag is not None else recipe.get(key, default)

    settings = {
        "alpha": pick(opts.alpha, "alpha", None),
        "split": pick(opts.split, "split", "random"),
        "seed": pick(opts.seed, "seed", None),  # None: the applied plan's seed, else 0 (expand_file)
        "outgoing": pick(opts.outgoing, "outgoing", "copy"),
        "clusters": pick(opts.clusters, "clusters", None),
        "group_size": pick(opts.group_size, "group_size", None),
        "expand_top": pick(opts.expand_top, "expand_top", None),
        "targets": opts.targets or recipe.get("targets") or [],
        "ignore": opts.ignore or recipe.get("ignore") or [],
    }
    check_settings(settings, opts)
    if opts.plan:
        _refuse_unused_with_plan(opts, recipe)
    return settings


def _refuse_unused_with_plan(opts: ExpandOptions, recipe: dict) -> None:
    """Settings that only shape a computed split would be recorded in the output as if they had
    produced the applied plan's split (a recipe target's own `split`/`expand_top` too: it would be dropped)."""
    targets = recipe.get("targets")
    per_target = {k for t in (targets if isinstance(targets, list) else []) if isinstance(t, dict) for k in t}
    given = [k for k in PLAN_SETTINGS if getattr(opts, k) is not None or k in recipe or k in per_target]
    if given:
        names = ", ".join(f"--{k.replace('_', '-')}" for k in given)
        raise FPEError(f"{names} cannot change an applied --plan (the plan fixes every split)",
                       "leave them out, or compute a new split without --plan")


def _int_or_none(settings: dict, key: str, low: int, high: int = 2**63 - 1) -> None:
    value = settings[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise FPEError(f"{key.replace('_', '-')} must be an integer in [{low}, {high}], got {value!r}")


def check_setting_values(settings: dict, expand_top_name: str = "expand_top") -> None:
    """Types and ranges of every setting, and how they combine (flags, a recipe, or a plan's record)."""
    _int_or_none(settings, "seed", 0)
    _int_or_none(settings, "clusters", 1)
    _int_or_none(settings, "group_size", 1)
    for key, names in (("split", STRATEGIES), ("outgoing", OUTGOING)):
        if not isinstance(settings[key], str):
            raise FPEError(f"{key} must be a name, got {settings[key]!r}")
        if settings[key] not in names:  # before any file is read or an output checked
            raise FPEError(f"unknown {key} {settings[key]!r}", f"choose one of: {', '.join(names)}")
    check_expand_top(settings["expand_top"], expand_top_name)
    if settings["group_size"] is not None and settings["split"] != "random":
        raise FPEError(f"--group-size applies to --split random, not {settings['split']}")


def check_settings(settings: dict, opts: ExpandOptions) -> None:
    """Every setting (flags or recipe), and flags that would be silently unused."""
    if isinstance(opts.probe_samples, bool) or not isinstance(opts.probe_samples, int) or opts.probe_samples < 0:
        raise FPEError(f"--probe-samples must be an integer >= 0 (0 skips the drift), got {opts.probe_samples!r}")
    check_setting_values(settings, "--expand-top" if opts.expand_top is not None else "expand_top")
    if opts.clause_map is not None and settings["split"] != "clause" and opts.recipe is None:
        raise FPEError(f"--clause-map is only used by --split clause (the split is {settings['split']})")


def _load_data(ckpt: Checkpoint, data: str):
    from .data import check_input_width, load_dataset  # data sets only when asked for

    dataset = load_dataset(data)
    check_input_width(dataset, ckpt.mlp.layers[0].in_features)
    return dataset


def calibration_inputs(ckpt: Checkpoint, data: str | None, samples: int) -> torch.Tensor:
    if not data:
        raise FPEError("--split activation needs calibration data", "pass --data (a built-in name or an .npz file)")
    return _load_data(ckpt, data).x_train[:samples].to(torch.float32)


def probe_inputs(ckpt: Checkpoint, data: str | None, samples: int, seed: int) -> tuple[torch.Tensor, str]:
    d_in = ckpt.mlp.layers[0].in_features
    if data:
        x_test = _load_data(ckpt, data).x_test
        x = x_test[:samples].to(torch.float32)
        return x, f"{data} (test split, first {len(x)} of {len(x_test)})"
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, d_in, generator=gen), f"{samples} standard-normal inputs (seed {seed})"


@contextlib.contextmanager
def _phase(timings: dict[str, float] | None, name: str):
    """Add the wall time of the block to timings[name] (for benchmarks; a no-op without a dict)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def expand_file(opts: ExpandOptions, timings: dict[str, float] | None = None) -> dict:
    """The whole `fpe expand`: returns the report; writes the output (and plan) atomically.

    `timings`, when given, receives the wall time of each phase (read, check, expand, drift, write).
    """
    settings = _resolve_settings(opts)
    with _phase(timings, "read"):
        ckpt = load_checkpoint(opts.model, opts.layers, opts.activation)
    with _phase(timings, "check"):
        check_finite(ckpt.mlp)
    plan = load_plan(opts.plan) if opts.plan else None
    if plan is not None:
        _plan_settings(settings, plan, ckpt.mlp, opts.plan)
    alpha = settings["alpha"] if settings["alpha"] is not None or plan is None else plan_alpha(plan)
    targets = select_targets(ckpt.mlp, parse_selection(settings["targets"], settings["ignore"]),
                             alpha, settings["split"], settings["expand_top"])
    output = opts.output or default_output(opts.model, {t.alpha for t in targets})
    inputs = input_files(opts)
    check_writable(output, force=opts.force, inputs=inputs)
    if opts.save_plan:
        check_writable(opts.save_plan, force=opts.force, inputs=inputs, outputs={"the output": output},
                       flag="--save-plan")
    groups = load_clause_map(opts.clause_map, ckpt.mlp.layers[0].in_features) if opts.clause_map else None
    if any(t.split == "clause" for t in targets) and groups is None and opts.plan is None:
        raise FPEError("--split clause needs a clause map", "pass --clause-map clauses.json")
    if settings["seed"] is None:  # record the seed that produced the split: an applied plan's own
        settings["seed"] = plan.seed if plan is not None else 0
    calibration = None
    calibrate = any(t.split == "activation" for t in targets) and plan is None
    if opts.probe_data is not None and not calibrate and not opts.probe_samples:
        raise FPEError(f"--data {opts.probe_data} would not be read: --probe-samples 0 skips the drift report and "
                       "no layer uses --split activation", "leave --data out, or drop --probe-samples 0")
    if calibrate:
        calibration = calibration_inputs(ckpt, opts.probe_data, opts.calibration_samples)
    inputs = PlanInputs(groups, settings["clusters"], settings["group_size"], calibration)
    with _phase(timings, "expand"):
        result = expand_mlp(ckpt.mlp, targets, seed=settings["seed"], outgoing=settings["outgoing"], plan=plan,
                            inputs=inputs)
    result.plan.settings = {k: settings[k] for k in PLAN_SETTINGS}  # saved with the plan (--save-plan)
    # the source's training and fine-tuning records describe the source (its widths, its accuracy), not this file,
    # whose weights are untrained; fpe.source_sha256 / fpe.source_file lead back to them
    result.mlp.metadata = {k: v for k, v in result.mlp.metadata.items()
                           if not k.startswith(("fpe.finetune.", "fpe.train."))}
    drift = None
    if opts.probe_samples:
        with _phase(timings, "drift"):
            probes, probe_desc = probe_inputs(ckpt, opts.probe_data, opts.probe_samples, settings["seed"])
            drift = function_drift(ckpt.mlp, result.mlp, probes) | {"probe": probe_desc}
    meta = expanded_metadata(ckpt, result, settings, targets)
    meta["fpe.inputs"] = json.dumps({
        "clause_map_sha256": sha256_file(opts.clause_map) if opts.clause_map else None,
        "data": opts.probe_data,
    }, sort_keys=True)
    with _phase(timings, "write"), outputs_together():  # a plan that cannot be written leaves no checkpoint
        size = save_checkpoint(result.mlp, output, opts.layout, meta, force=opts.force)
        if opts.save_plan:
            save_plan(result.plan, opts.save_plan, source_sha256=ckpt.sha256, force=opts.force)
    return expand_report(ckpt, result, settings, output, opts, size, drift)


def _plan_settings(settings: dict, plan, mlp, where: Path) -> None:
    """An applied plan's layers are the targets unless --targets/--ignore/a recipe say otherwise; its
    seed is the split's seed (another --seed would be recorded as if it had produced it), and the settings
    it records (split, clusters, group size, expand-top) are the ones the output records."""
    if not settings["targets"] and not settings["ignore"]:
        hidden = [layer.weight_key for layer in mlp.layers[:-1]]
        foreign = [p.weight_key for p in plan.layers if p.weight_key not in hidden]
        if foreign:
            raise FPEError(f"the plan splits {', '.join(foreign)}, which is not a hidden layer of this model "
                           f"(hidden layers: {', '.join(hidden) or 'none'})", "was the plan saved from another model?")
        settings["targets"] = [p.weight_key for p in plan.layers]
    if settings["seed"] is not None and settings["seed"] != plan.seed:
        raise FPEError(f"--seed {settings['seed']} differs from the applied plan's seed {plan.seed}",
                       "leave --seed out: the plan's split was made with its own seed")
    recorded = plan.settings or {}
    splits = {p.split for p in plan.layers}  # a plan written before settings were recorded: its layers' split
    known = splits.pop() if len(splits) == 1 and splits <= set(STRATEGIES) else settings["split"]
    settings["split"] = recorded.get("split", known)
    for key in ("clusters", "group_size", "expand_top"):  # what made the split is recorded as such
        settings[key] = recorded.get(key)
    try:
        check_setting_values(settings)
    except FPEError as exc:
        raise FPEError(f"{where}: the plan's recorded settings are malformed: {exc.message}",
                       "write the plan again with --save-plan") from None


def input_files(opts: ExpandOptions) -> tuple[Path, ...]:
    """Every file expand reads: none of them may be an output, even with --force."""
    data = Path(opts.probe_data) if opts.probe_data and Path(opts.probe_data).is_file() else None
    return tuple(Path(p) for p in (opts.model, opts.plan, opts.clause_map, opts.recipe, data) if p is not None)


def plan_alpha(plan) -> int:
    alphas = {p.alpha for p in plan.layers}
    if len(alphas) != 1:
        raise FPEError("the plan uses several alphas", "give them per target in a --recipe")
    return alphas.pop()


def expanded_metadata(ckpt: Checkpoint, result: ExpandResult, settings: dict, targets) -> dict[str, str]:
    resolved = [{"weight": ckpt.mlp.layers[t.index].weight_key, "alpha": t.alpha, "split": p.split}
                for t, p in zip(sorted(targets, key=lambda t: t.index), result.plan.layers)]
    return {
        "fpe.kind": "expanded",
        "fpe.source_sha256": ckpt.sha256,
        "fpe.source_file": ckpt.path.name,
        "fpe.settings": json.dumps({
            "seed": settings["seed"], "outgoing": settings["outgoing"], "bias": "copy",
            "prune": PRUNE_RULE if settings["outgoing"] != "tie" else "none: tied copies count once", "clusters": settings["clusters"], "group_size": settings["group_size"],
            "expand_top": settings["expand_top"], "default_split": settings["split"],
        }, sort_keys=True),
        "fpe.recipe": json.dumps({"targets": resolved, "ignore": settings["ignore"]}, sort_keys=True),
        "fpe.budget": json.dumps({
            "weights": result.budget, "source_weights": result.before,
            "source_biases": sum(layer.bias.numel() for layer in ckpt.mlp.layers if layer.bias is not None),
        }, sort_keys=True),
    }


def expand_report(ckpt: Checkpoint, result: ExpandResult, settings: dict, output: Path, opts: ExpandOptions,
                  size: int, drift: dict | None) -> dict:
    plans = {p.weight_key: p for p in result.plan.layers}
    layers = []
    for k, (src, new) in enumerate(zip(ckpt.mlp.layers, result.mlp.layers)):
        p = plans.get(src.weight_key)
        layers.append({
            "weight": src.weight_key, "shape_before": list(src.weight.shape), "shape_after": list(new.weight.shape),
            "weights_before": result.before[k], "weights_after": result.after[k], "pruned": result.pruned[k],
            "weights_widened": result.after[k] + result.pruned[k],  # after splitting rows and copying columns
            "split": p.split if p else None, "alpha": p.alpha if p else None,
            "rows_without_edges": result.dead_children[k],
        })
    total = sum(result.after)
    return {
        "input": str(opts.model), "output": str(output), "layout": opts.layout, "output_bytes": size,
        "input_bytes": opts.model.stat().st_size, "activation": ckpt.mlp.activation,
        "hidden_widths_before": ckpt.mlp.widths[1:-1], "hidden_widths_after": result.mlp.widths[1:-1],
        "budget": result.budget, "weights_after": total, "budget_holds": total == result.budget,
        "layers": layers, "drift": drift, "settings": {k: v for k, v in settings.items() if k not in ("targets",)},
        "plan_saved_to": str(opts.save_plan) if opts.save_plan else None,
        "dropped_tensors": ckpt.unused,  # in the input but not part of the MLP chain: not written
        "activation_source": ckpt.activation_source,
    }


def verify_file(model: Path, source: Path | None = None, layers=None, activation=None) -> dict:
    """Check every invariant; raises VerificationError (exit 3) listing the violations."""
    ckpt = load_checkpoint(model, layers, activation)
    # the source is read with the expanded file's chain, so names that needed --layers work for both
    src = None
    if source:
        names = [layer.weight_key for layer in ckpt.mlp.layers]
        header, _, _ = read_header(Path(source))
        missing = [k for k in names if k not in header and f"fpe.values:{k}" not in header]
        if missing:
            raise VerificationError([f"source {source}: it has no {', '.join(missing[:4])} (the expanded file's layers), "
                                     "so it is not the file that was expanded"])
        src = load_checkpoint(source, names, activation)
    budget = recorded_budget(ckpt.metadata)
    problems = check_invariants(ckpt.mlp, budget, src.mlp if src else None,
                                src.sha256 if src else None, ckpt.metadata.get("fpe.source_sha256"))
    if problems:
        raise VerificationError(problems)
    checks = ["finite weights", "off-mask weights are zero", "siblings own disjoint edges"]
    if any(layer.tied is not None for layer in ckpt.mlp.layers):
        checks.append("tied column copies are equal")
    if budget is not None:
        checks.append("weights equal the recorded budget")
    if src:
        checks += ["source sha256 matches"] if ckpt.metadata.get("fpe.source_sha256") else []
        checks += ["children's edges are their parent's"]
        checks += ["weights equal the source's"] if compares_values(ckpt.mlp) else []
    return {"model": str(model), "source": str(source) if source else None, "ok": True, "checks": checks,
            "expanded": ckpt.mlp.is_expanded, "has_masks": ckpt.mlp.has_masks}


def params_report(model: Path, layers=None, activation=None) -> dict:
    ckpt = load_checkpoint(model, layers, activation)
    counts = model_counts(ckpt.mlp)
    for entry, layer in zip(counts["layers"], ckpt.mlp.layers):
        entry["bytes_on_disk"] = _bytes_of(ckpt, layer)
    counts["total"]["bytes_on_disk"] = sum(e["bytes_on_disk"] for e in counts["layers"])
    counts["file_bytes"] = model.stat().st_size
    counts["layout"] = ckpt.layout
    counts["model"] = str(model)
    budget = metadata_json(ckpt.metadata, "fpe.budget")
    if isinstance(budget, dict):
        counts["source"] = {"weights": budget.get("weights"), "biases": budget.get("source_biases"),
                            "weights_per_layer": budget.get("source_weights")}
        counts["budget_holds"] = counts["total"]["weights"] == budget.get("weights")
    return counts


def _bytes_of(ckpt: Checkpoint, layer) -> int:
    key = layer.weight_key
    names = [key, layer.bias_key, f"fpe.mask:{key}", f"fpe.children:{key}", f"fpe.tied:{key}", f"fpe.values:{key}",
             f"fpe.zmask:{key}", f"fpe.bitmask:{key}", f"fpe.shape:{key}"]
    return sum(ckpt.tensor_bytes.get(n, 0) for n in names if n)


def inspect_report(model: Path, layers=None, activation=None) -> dict:
    ckpt = load_checkpoint(model, layers, activation)
    header, _, _ = read_header(model)
    meta = {}
    for k, v in ckpt.metadata.items():
        try:
            meta[k] = json.loads(v) if k.startswith("fpe.") else v
        except JSON_ERRORS:
            meta[k] = v
    return {
        "model": str(model), "layout": ckpt.layout, "sha256": ckpt.sha256, "file_bytes": model.stat().st_size,
        "activation": ckpt.mlp.activation, "activation_source": ckpt.activation_source,
        "widths": ckpt.mlp.widths, "expanded": ckpt.mlp.is_expanded,
        "chain": [{"weight": l.weight_key, "bias": l.bias_key, "shape": list(l.weight.shape),
                   "dtype": str(l.weight.dtype).replace("torch.", ""), "mask": l.mask is not None,
                   "lineage": l.parents is not None, "tied": l.tied is not None} for l in ckpt.mlp.layers],
        "tensors": [{"name": n, "dtype": e["dtype"], "shape": e["shape"]} for n, e in sorted(header.items())],
        "unused_tensors": ckpt.unused, "metadata": meta,
    }


def convert_file(model: Path, layout: str, output: Path, force: bool = False, layers=None, activation=None) -> dict:
    ckpt = load_checkpoint(model, layers, activation)
    check_writable(output, force=force, inputs=(model,))
    lossy = check_off_mask_zero(ckpt.mlp) + (check_ties(ckpt.mlp) if layout == "packed" else [])
    if lossy:  # off-mask values (either layout) and unequal tied copies (packed keeps one) would be dropped
        raise VerificationError(lossy, "converting would drop these values; the conversion would not be lossless")
    meta = {k: v for k, v in ckpt.metadata.items() if k != "fpe.layout"}
    size = save_checkpoint(ckpt.mlp, output, layout, meta, force=force)
    return {"input": str(model), "output": str(output), "from_layout": ckpt.layout, "to_layout": layout,
            "input_bytes": model.stat().st_size, "output_bytes": size}
