"""Training loops on `MLP` objects: dense baselines, fine-tuning with locked masks, evaluation.

No printing: progress goes through `callback(dict)` (rank 0 only). Deterministic: weights are
initialised and batches shuffled by seeded `torch.Generator`s, so the same seed and inputs give the
same weights. Master weights are float32 whatever the checkpoint's dtype; results are cast back.

Masks are locked in four ways (momentum and weight decay revive pruned weights otherwise):
  1. a gradient hook zeroes the gradient off the mask (before DDP averages it);
  2. the mask is re-applied to the weight after every optimizer step;
  3. the optimizer state (Adam moments, SGD momentum) is zeroed off the mask after every step;
  4. `assert_masks_hold` checks the result and raises VerificationError (exit 3) if a weight revived.
Resumable through `resume.py`: resuming from a state gives bit-identical final weights.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .data import Dataset, check_input_width, check_output_width
from .distributed import DistContext, context
from .errors import FPEError, VerificationError
from .layers import KernelMLP
from .model import MLP, Layer, activation_fn
from .resume import fingerprint, load_state, save_state
from .verify import check_finite_values, check_off_mask_zero

OPTIMIZERS = ("adam", "adamw", "sgd")
SINGLE_THREAD_BELOW = 1_000_000  # parameters: smaller models train on one thread (see `thread_policy`)
Callback = Callable[[dict], None] | None


@dataclass
class TrainConfig:
    """Settings of one training run (recorded in the output's metadata)."""

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, str):  # SGD, Adam: names are case-insensitive, as activations are
            self.optimizer = self.optimizer.lower()

    def validate(self) -> None:
        problems = []
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be an integer >= 0 (as for fpe expand), got {self.seed!r}")
        if self.epochs < 0:
            problems.append(f"epochs must be >= 0, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"learning rate must be a positive number, got {self.lr}")
        if self.batch_size < 1:
            problems.append(f"batch size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (self.momentum >= 0 and math.isfinite(self.momentum)):
            problems.append(f"momentum must be a finite number >= 0, got {self.momentum}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            problems.append(f"weight decay must be a finite number >= 0, got {self.weight_decay}")
        if problems:
            raise FPEError("; ".join(problems))


# ---------------------------------------------------------------- the module and its masks


class MaskedMLP(KernelMLP):
    """float32 trainable copy of an MLP on FPELinear's kernels (`layers.KernelMLP`: grouped layers, from
    splits shared within parent groups, train as compact blocks); each layer's mask (or None) is a
    buffer `mask{i}`, its complement a non-persistent buffer `off{i}`."""

    def __init__(self, mlp: MLP):
        super().__init__(mlp, keep_masks=True)
        for i, mask in enumerate(self.masks()):
            self.register_buffer(f"off{i}", ~mask if mask is not None else None, persistent=False)

    def masks(self) -> list[torch.Tensor | None]:
        return [getattr(self, f"mask{i}") for i in range(len(self.weights))]

    def off_masks(self) -> list[torch.Tensor | None]:
        """The complements (entries that must stay zero), computed once rather than at every step."""
        return [getattr(self, f"off{i}") for i in range(len(self.weights))]

    def to_mlp(self, template: MLP) -> MLP:
        """The template's layers (keys, masks, lineage, dtypes) with this module's values."""
        out = template.copy()
        for i, layer in enumerate(out.layers):
            w = self.expanded_weight(i, layer.in_features)
            layer.weight = w.to(template.layers[i].weight.dtype).clone()
            if layer.bias is not None:
                layer.bias = self.biases[self.bias_of[i]].detach().cpu().to(template.layers[i].bias.dtype).clone()
        return out


def lock_gradients(module: MaskedMLP) -> list:
    """Step 1: gradient hooks that zero every off-mask gradient entry."""
    return [w.register_hook(lambda g, off=off: g.masked_fill(off, 0))
            for w, off in zip(module.weights, module.off_masks()) if off is not None]


@torch.no_grad()
def enforce_masks(module: MaskedMLP) -> None:
    """Step 2: re-apply the masks to the weights."""
    for w, off in zip(module.weights, module.off_masks()):
        if off is not None:
            w.masked_fill_(off, 0)


@torch.no_grad()
def zero_masked_state(optimizer: torch.optim.Optimizer, module: MaskedMLP) -> None:
    """Step 3: zero the optimizer state (exp_avg, exp_avg_sq, momentum_buffer) off the mask."""
    for w, off in zip(module.weights, module.off_masks()):
        if off is None:
            continue
        for value in optimizer.state.get(w, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == w.shape:
                value.masked_fill_(off, 0)


def assert_masks_hold(mlp: MLP) -> None:
    """Step 4: raise VerificationError (exit 3) if any off-mask weight is not exactly zero, or if
    training diverged to non-finite weights (nothing is written then)."""
    diverged = check_finite_values(mlp)
    problems = diverged + check_off_mask_zero(mlp) + (["training diverged: lower --lr"] if diverged else [])
    if problems:
        raise VerificationError(problems)


def build_module(mlp: MLP, lock: bool = True, device: torch.device | None = None) -> MaskedMLP:
    """A trainable module with the MLP's masks as buffers (and gradient hooks when `lock`)."""
    module = MaskedMLP(mlp).to(device or torch.device("cpu"))  # before the hooks: they capture the masks
    if lock:
        lock_gradients(module)
    return module


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(module.parameters())
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@contextlib.contextmanager
def thread_policy(mlp: MLP):
    """Small models run on one intra-op thread: their per-step ops are microseconds, and thread
    hand-offs cost more than they save (erratically so on shared CPUs). It also makes results
    independent of the machine's core count. Larger models keep torch's thread setting."""
    size = sum(layer.weight.numel() for layer in mlp.layers)
    before = torch.get_num_threads()
    if size < SINGLE_THREAD_BELOW:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# ---------------------------------------------------------------- losses and evaluation


def batch_loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Loss summed over the batch's samples: cross-entropy, or BCE-with-logits averaged over the labels."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / logits.shape[1]
    return F.cross_entropy(logits, y, reduction="sum")


def _correct(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """(N,) bool: arg-max class is the label, or every label right (exact match) when multilabel."""
    return ((logits > 0) == (y > 0.5)).all(dim=1) if multilabel else logits.argmax(dim=1) == y


@torch.no_grad()
def evaluate(mlp: MLP, dataset: Dataset, split: str = "test", chunk: int = 8192) -> dict:
    """Loss and accuracy on a split; multi-label adds exact match and per-label accuracy.

    Single-label: `loss` (mean cross-entropy), `accuracy`. Multi-label: `loss` (BCE with logits, mean
    over samples and labels), `accuracy` = `exact_match` (every label right), `per_label_accuracy`
    (list) and `label_accuracy` (their mean). A logit > 0 predicts 1.
    """
    x, y = getattr(dataset, f"x_{split}"), getattr(dataset, f"y_{split}")
    check_input_width(dataset, mlp.layers[0].in_features)
    check_output_width(dataset, mlp.layers[-1].out_features)
    with thread_policy(mlp):
        return _evaluate(mlp, dataset, x, y, chunk)


def _evaluate(mlp: MLP, dataset: Dataset, x: torch.Tensor, y: torch.Tensor, chunk: int) -> dict:
    loss, correct, label_hits = 0.0, 0, torch.zeros(dataset.num_outputs, dtype=torch.float64)
    module = build_module(mlp, lock=False)  # FPELinear's kernels (grouped where the split allows), masks applied
    for start in range(0, len(x), chunk):
        with torch.no_grad():
            logits, yb = module(x[start:start + chunk].to(torch.float32)), y[start:start + chunk]  # (n, C)
        loss += float(batch_loss(logits, yb, dataset.multilabel))
        correct += int(_correct(logits, yb, dataset.multilabel).sum())
        if dataset.multilabel:
            label_hits += ((logits > 0) == (yb > 0.5)).sum(dim=0).double()
    n = max(len(x), 1)
    out = {"samples": len(x), "loss": loss / n, "accuracy": correct / n}
    if dataset.multilabel:
        per_label = (label_hits / n).tolist()
        out.update(exact_match=correct / n, per_label_accuracy=per_label, label_accuracy=sum(per_label) / len(per_label))
    return out


# ---------------------------------------------------------------- the loop


def fit(mlp: MLP, dataset: Dataset, cfg: TrainConfig, *, callback: Callback = None, checkpoint_every: int = 0,
        state_path: Path | None = None, resume: bool = False, ctx: DistContext | None = None) -> tuple[MLP, dict]:
    """Train `mlp` (its masks locked) on the training split; returns (trained copy, metrics)."""
    cfg.validate()
    check_input_width(dataset, mlp.layers[0].in_features)
    check_output_width(dataset, mlp.layers[-1].out_features)
    ctx = ctx or context()
    with thread_policy(mlp):
        return _fit(mlp, dataset, cfg, callback, checkpoint_every, state_path, resume, ctx)


def _fit(mlp, dataset, cfg, callback, checkpoint_every, state_path, resume, ctx) -> tuple[MLP, dict]:
    module = build_module(mlp, device=ctx.device)
    optimizer = make_optimizer(module, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)  # the shuffle; identical on every rank
    fp = fingerprint(mlp, cfg, dataset.sha256())
    if resume and state_path is None:
        raise FPEError("resume needs the path of a resume state")
    start = load_state(state_path, module, optimizer, gen, fp, cfg.epochs) if resume else 0
    # --resume continues the state there; a fresh run's first save must not replace one that appeared after its
    # start: that is another run writing the same output (a leftover state was refused, or removed by --force)
    replace = resume
    net, x, y = ctx.wrap(module), dataset.x_train.to(ctx.device), dataset.y_train.to(ctx.device)
    loss = float("nan")
    for epoch in range(start, cfg.epochs):
        loss, acc = _epoch(net, module, optimizer, x, y, dataset.multilabel, cfg.batch_size, gen, ctx)
        if callback and ctx.is_main:
            callback({"epoch": epoch + 1, "epochs": cfg.epochs, "loss": loss, "accuracy": acc})
        if checkpoint_every and state_path and ((epoch + 1) % checkpoint_every == 0 or epoch + 1 == cfg.epochs):
            if ctx.is_main:
                save_state(state_path, module, optimizer, gen, epoch + 1, fp, replace=replace)
            replace = True
            ctx.barrier()
    trained = module.to_mlp(mlp)
    assert_masks_hold(trained)
    metrics = {"train": evaluate(trained, dataset, "train"), "test": evaluate(trained, dataset, "test"),
               "epochs": cfg.epochs, "resumed_at_epoch": start, "last_epoch_loss": loss, "world_size": ctx.world}
    return trained, metrics


def _epoch(net, module, optimizer, x, y, multilabel, batch_size, gen, ctx) -> tuple[float, float]:
    """One pass over shuffled data; returns (mean training loss, training accuracy) over all ranks."""
    perm = torch.randperm(len(x), generator=gen).to(x.device)  # (N,)
    total = correct = 0.0
    for start in range(0, len(x), batch_size):
        batch = perm[start:start + batch_size]  # (B,) the global batch
        local = ctx.shard(batch)  # (B / world,)
        logits = net(x[local])
        summed = batch_loss(logits, y[local], multilabel)
        optimizer.zero_grad(set_to_none=True)
        (summed * (ctx.world / len(batch))).backward()  # DDP averages over ranks: the global batch mean
        optimizer.step()
        enforce_masks(module)
        zero_masked_state(optimizer, module)
        total += float(summed.detach())
        correct += float(_correct(logits.detach(), y[local], multilabel).sum())
    total, correct = ctx.all_sum([total, correct])
    return total / len(x), correct / len(x)


# ---------------------------------------------------------------- entry points


def init_mlp(widths: list[int], activation: str = "relu", seed: int = 0) -> MLP:
    """nn.Linear's default init (U(-1/sqrt(fan_in), 1/sqrt(fan_in))) from a seeded generator.

    Tensor names follow nn.Sequential(Linear, act, Linear, ...): `0.weight`, `0.bias`, `2.weight`, ...
    """
    activation_fn(activation)
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise FPEError(f"widths must be positive, got {widths}")
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(widths, widths[1:])):
        bound = 1.0 / math.sqrt(d_in)
        w = torch.empty(d_out, d_in).uniform_(-bound, bound, generator=gen)  # (out, in)
        b = torch.empty(d_out).uniform_(-bound, bound, generator=gen)
        layers.append(Layer(f"{2 * i}.weight", w, f"{2 * i}.bias", b))
    return MLP(layers, activation)


def train_dense(dataset: Dataset, hidden: list[int], *, activation: str = "relu", epochs: int = 20, lr: float = 1e-3,
                batch_size: int = 64, optimizer: str = "adam", momentum: float = 0.9, weight_decay: float = 0.0,
                seed: int = 0, callback: Callback = None, checkpoint_every: int = 0, state_path: Path | None = None,
                resume: bool = False) -> tuple[MLP, dict]:
    """A dense MLP d -> hidden... -> classes, initialised from `seed` and trained on the data."""
    if not hidden:
        raise FPEError("give at least one hidden width", "e.g. --hidden 64 or --hidden 64,32")
    mlp = init_mlp([dataset.num_inputs, *hidden, dataset.num_outputs], activation, seed)
    cfg = TrainConfig(epochs, lr, batch_size, optimizer, momentum, weight_decay, seed)
    return fit(mlp, dataset, cfg, callback=callback, checkpoint_every=checkpoint_every, state_path=state_path, resume=resume)


def finetune(mlp: MLP, dataset: Dataset, *, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64,
             optimizer: str = "adam", momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
             checkpoint_every: int = 0, state_path: Path | None = None, resume: bool = False,
             callback: Callback = None) -> tuple[MLP, dict]:
    """Fine-tune with every mask locked; metrics include the test metrics `before` fine-tuning."""
    before = evaluate(mlp, dataset, "test")
    cfg = TrainConfig(epochs, lr, batch_size, optimizer, momentum, weight_decay, seed)
    tuned, metrics = fit(mlp, dataset, cfg, callback=callback, checkpoint_every=checkpoint_every,
                         state_path=state_path, resume=resume)
    return tuned, {"before": before, **metrics}
