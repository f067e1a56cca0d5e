"""Resume states of training runs: weights, optimizer state, RNG states and the epoch, in safetensors.

Written atomically every `checkpoint_every` epochs (never pickled); `load_state` restores them so a
resumed run reaches bit-identical final weights, and refuses a damaged or foreign state (exit 2).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import JSON_ERRORS, FPEError, OutputExistsError
from .model import MLP
from .stfile import read_safetensors, write_safetensors

if TYPE_CHECKING:  # type hints only: train.py imports this module
    from .train import MaskedMLP, TrainConfig

STATE_VERSION = 1


def fingerprint(mlp: MLP, cfg: TrainConfig, data_sha: str) -> dict:
    """What a resume state must match: the starting weights and masks, the settings, the data.

    `digest` covers all of it; the parts are kept beside it so that a mismatch can be named.
    """
    settings = asdict(cfg)
    digest = hashlib.sha256(json.dumps([settings, data_sha, mlp.activation]).encode())
    model = hashlib.sha256()
    for layer in mlp.layers:
        for t in (layer.weight, layer.bias, layer.mask):
            if t is not None:
                chunk = f"{t.dtype}{tuple(t.shape)}".encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                digest.update(chunk)
                model.update(chunk)
    return {"digest": digest.hexdigest(), "settings": settings, "data_sha256": data_sha,
            "activation": mlp.activation, "model_sha256": model.hexdigest()}


def _differences(saved: dict, now: dict) -> list[str]:
    """What differs between the run that wrote a state and this one, in words."""
    out = [f"{key} {saved['settings'].get(key)!r} -> {value!r}"
           for key, value in now["settings"].items() if saved.get("settings", {}).get(key) != value]
    out += [what for key, what in (("data_sha256", "the data"), ("model_sha256", "the starting model"),
                                   ("activation", "the activation")) if saved.get(key) != now[key]]
    return out


def save_state(path: Path, module: MaskedMLP, optimizer: torch.optim.Optimizer, gen: torch.Generator,
               epoch: int, fp: dict, *, replace: bool = True) -> None:
    """Write the resume state atomically. `replace=False` (a run's first state, when none was there at its
    start): a state that appeared meanwhile is another run's, and is not overwritten."""
    tensors = {f"model.{k}": v.detach().cpu() for k, v in module.named_parameters()}
    tensors.update({"rng.shuffle": gen.get_state(), "rng.torch": torch.get_rng_state()})
    scalars = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    meta = {"fpe.kind": "resume-state", "fpe.resume": json.dumps(
        {"version": STATE_VERSION, "epoch": epoch, "fingerprint": fp["digest"], "run": fp, "optim_scalars": scalars},
        sort_keys=True)}
    try:
        write_safetensors(path, tensors, meta, force=replace)
    except OutputExistsError:  # only without replace: the state is there, or appeared while it was written
        raise FPEError(f"{path}: another fpe run started writing this resume state (the same -o) while this one "
                       "trained; stopped without touching it", "run one job per output, or give each its own -o") from None


def load_state(path: Path, module: MaskedMLP, optimizer: torch.optim.Optimizer, gen: torch.Generator, fp: dict,
               epochs: int | None = None) -> int:
    """Restore everything `save_state` wrote; returns the number of epochs already done.

    A state that is damaged in any way is an FPEError (exit 2), never a crash or a silent misread.
    """
    try:
        done = _load_state(path, module, optimizer, gen, fp)
    except FPEError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
        raise FPEError(f"{path}: the resume state is damaged ({type(exc).__name__}: {exc})",
                       "delete it and run without --resume") from None
    if not 0 <= done <= (epochs if epochs is not None else done):
        raise FPEError(f"{path}: the resume state claims {done} epochs done", "delete it and run without --resume")
    return done


def _check_state_tensors(tensors: dict, module: MaskedMLP, optimizer: torch.optim.Optimizer) -> None:
    for name, param in module.named_parameters():
        t = tensors[f"model.{name}"]
        if t.dtype != param.dtype or t.shape != param.shape:
            raise ValueError(f"model.{name} is {t.dtype} {tuple(t.shape)}, expected {param.dtype} {tuple(param.shape)}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in tensors.items():
        if key.startswith("optim.") and value.ndim:
            index = int(key.split(".")[1])
            if value.shape != params[index].shape:
                raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {tuple(params[index].shape)}")


def _load_state(path: Path, module: MaskedMLP, optimizer: torch.optim.Optimizer, gen: torch.Generator, fp: dict) -> int:
    if not Path(path).exists():
        raise FPEError(f"{path}: no resume state to continue from", "run without --resume to start from the beginning")
    tensors, meta = read_safetensors(Path(path))
    try:
        info = json.loads(meta.get("fpe.resume", "{}")) if meta.get("fpe.kind") == "resume-state" else {}
    except JSON_ERRORS:
        info = {}
    if not isinstance(info, dict) or info.get("version") != STATE_VERSION \
            or not isinstance(info.get("optim_scalars"), dict) or "fingerprint" not in info:
        raise FPEError(f"{path}: not an fpe resume state (or from another version)", "delete it and start again")
    if info["fingerprint"] != fp["digest"]:
        saved = info.get("run")
        what = ", ".join(_differences(saved, fp)) if isinstance(saved, dict) else ""
        raise FPEError(f"{path}: this resume state belongs to another run ({what or 'model, data or settings differ'})",
                       "rerun with the same model, --data and settings, or without --resume")
    _check_state_tensors(tensors, module, optimizer)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(tensors[f"model.{name}"])
    state: dict = {}
    for key, value in [(k[len("optim."):], v) for k, v in tensors.items() if k.startswith("optim.")] + list(info["optim_scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    gen.set_state(tensors["rng.shuffle"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(info["epoch"])
