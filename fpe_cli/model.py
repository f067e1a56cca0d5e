"""In-memory MLP representation shared by every module: a chain of linear layers with masks.

Pure data and pure functions: nothing here touches files or terminals.
A `Layer` holds one linear map y = x @ W.T + b with W of shape (out, in). `mask` is the set of
weights that exist (True) — explicit, never inferred from zeros, because a trained weight can be 0.
`parents` on a layer maps each of its output units to the parent unit it was split from (lineage);
None when the layer was not expanded. `tied` marks a consumer expanded with `--outgoing tie`: its
input columns are copies of the parent's column, one shared parameter per (row, parent) — the
copies hold equal values and masks, count once in the budget, and the fast kernels apply the
parent's column once to the sum of its children's activations (`sibling_sum`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .errors import FPEError

ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": torch.nn.functional.silu,
    "leaky_relu": torch.nn.functional.leaky_relu,
    "identity": lambda x: x,
}


@dataclass
class Layer:
    """One linear layer of the chain. Keys are the tensor names it was read from / is written to."""

    weight_key: str
    weight: torch.Tensor  # (out, in)
    bias_key: str | None = None
    bias: torch.Tensor | None = None  # (out,)
    mask: torch.Tensor | None = None  # bool (out, in); None = dense (every entry is a weight)
    parents: torch.Tensor | None = None  # int64 (out,): parent unit of each output unit
    tied: torch.Tensor | None = None  # int64 (in,): parent of each input column when sibling columns are tied

    @property
    def prefix(self) -> str:
        return self.weight_key[: -len(".weight")] if self.weight_key.endswith(".weight") else self.weight_key

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def support(self) -> torch.Tensor:
        """The weights that exist: the explicit mask, or the non-zero entries of a dense weight."""
        return self.mask if self.mask is not None else self.weight != 0

    def active_weights(self) -> int:
        """Weights that exist; a group of tied columns (copies of one parameter) counts once."""
        support = self.support()
        if self.tied is not None:
            support = support[:, first_of_groups(self.tied)]
        return count_true(support)


def count_true(mask: torch.Tensor) -> int:
    """Number of True entries of a bool CPU tensor (numpy's count is ~5x torch's on large masks)."""
    return int(np.count_nonzero(mask.numpy()))


def true_per_row(mask: torch.Tensor) -> torch.Tensor:
    """int64 (rows,): True entries per row of a bool (rows, cols) CPU tensor (numpy's count is several times
    torch's sum)."""
    return torch.from_numpy(np.count_nonzero(mask.numpy(), axis=1).astype(np.int64))


def empty_rows(mask: torch.Tensor) -> int:
    """Rows of a bool (rows, cols) CPU tensor without any True entry (numpy's any is ~100x torch's here)."""
    return int(mask.shape[0] - np.count_nonzero(mask.numpy().any(axis=1)))


BLOCK_ENTRIES = 1 << 22  # entries per row block when a pass over a large layer bounds its temporaries


def row_blocks(rows: int, cols: int, entries: int = BLOCK_ENTRIES):
    """Slices of consecutive rows of a (rows, cols) matrix, about `entries` entries each (at least one row)."""
    step = max(1, entries // max(1, cols))
    for start in range(0, rows, step):
        yield slice(start, start + step)


def first_of_groups(tied: torch.Tensor) -> torch.Tensor:
    """Index of the first column of each tied group (groups are runs of equal parent ids, in order)."""
    if tied.numel() == 0:
        return tied
    starts = torch.ones_like(tied, dtype=torch.bool)
    starts[1:] = tied[1:] != tied[:-1]
    return starts.nonzero().flatten()


def uniform_children(tied: torch.Tensor) -> int | None:
    """k when every parent has k consecutive tied columns (then a reshape sums them), else None."""
    parents = int(tied[-1]) + 1 if tied.numel() else 0
    if not parents or tied.numel() % parents:
        return None
    k = tied.numel() // parents
    return k if torch.equal(tied, torch.arange(parents).repeat_interleave(k)) else None


def sibling_sum(x: torch.Tensor, tied: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """(N, children) -> (N, parents): the activations of each parent's children summed (tied columns).

    `k`: `uniform_children(tied)` when the caller has it (a reshape instead of an index_add).
    """
    k = k if k is not None else uniform_children(tied)
    if k:
        return x.view(x.shape[0], x.shape[1] // k, k).sum(dim=2)  # explicit sizes: an empty shard has N = 0
    parents = int(tied[-1]) + 1 if tied.numel() else 0
    return torch.zeros(x.shape[0], parents, dtype=x.dtype).index_add_(1, tied, x)


@dataclass
class MLP:
    """A chain of layers with one activation between consecutive layers (none after the last)."""

    layers: list[Layer]
    activation: str = "relu"
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def widths(self) -> list[int]:
        return [self.layers[0].in_features] + [layer.out_features for layer in self.layers]

    @property
    def is_expanded(self) -> bool:
        return any(layer.parents is not None for layer in self.layers)

    @property
    def has_masks(self) -> bool:
        return any(layer.mask is not None for layer in self.layers)

    def weight_budget(self) -> int:
        """Number of weights that exist, over every weight matrix (biases excluded)."""
        return sum(layer.active_weights() for layer in self.layers)

    def copy(self) -> "MLP":
        return replace(self, layers=[replace(layer) for layer in self.layers], metadata=dict(self.metadata))


def activation_fn(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise FPEError(
            f"unknown activation '{name}'",
            f"choose one of: {', '.join(sorted(ACTIVATIONS))}; --activation overrides one recorded in the file's metadata",
        ) from None


def effective_weight(layer: Layer) -> torch.Tensor:
    """The weight with off-mask entries forced to zero (what the network really computes with)."""
    if layer.mask is None:
        return layer.weight
    return layer.weight.masked_fill(~layer.mask, 0)


def forward(mlp: MLP, x: torch.Tensor, *, dtype: torch.dtype = torch.float32, apply_masks: bool = True) -> torch.Tensor:
    """Reference forward pass: (N, d_in) -> (N, d_out), computed in `dtype` with masks applied.

    apply_masks=False skips the mask multiply for models known to hold exact zeros off the mask
    (what `expand_mlp` produces; `fpe verify` checks it for files).
    """
    act = activation_fn(mlp.activation)
    h = x.to(dtype)
    for i, layer in enumerate(mlp.layers):
        w = (effective_weight(layer) if apply_masks else layer.weight).to(dtype)
        b = layer.bias.to(dtype) if layer.bias is not None else None
        h = torch.nn.functional.linear(h, w, b)  # (N, out)
        if i < len(mlp.layers) - 1:
            h = act(h)
    return h


def hidden_activations(mlp: MLP, x: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Post-activation outputs of every hidden layer: a list of (N, width_k) tensors."""
    act = activation_fn(mlp.activation)
    h = x.to(dtype)
    out = []
    for layer in mlp.layers[:-1]:
        w = effective_weight(layer).to(dtype)
        b = layer.bias.to(dtype) if layer.bias is not None else None
        h = act(torch.nn.functional.linear(h, w, b))
        out.append(h)
    return out


def check_chain(layers: list[Layer]) -> list[str]:
    """Shape problems of a layer chain, all collected (empty list = the chain is consistent)."""
    problems = []
    for layer in layers:
        if layer.weight.ndim != 2:
            problems.append(f"{layer.weight_key}: expected a 2-D weight, found shape {tuple(layer.weight.shape)}")
            continue
        if 0 in layer.weight.shape:
            problems.append(f"{layer.weight_key}: zero-sized weight {tuple(layer.weight.shape)}")
        if layer.bias is not None and tuple(layer.bias.shape) != (layer.out_features,):
            problems.append(
                f"{layer.bias_key}: expected shape ({layer.out_features},) to match {layer.weight_key}, "
                f"found {tuple(layer.bias.shape)}"
            )
        if layer.mask is not None and tuple(layer.mask.shape) != tuple(layer.weight.shape):
            problems.append(
                f"mask of {layer.weight_key}: expected shape {tuple(layer.weight.shape)}, found {tuple(layer.mask.shape)}"
            )
    for prev, nxt in zip(layers, layers[1:]):
        if prev.weight.ndim == 2 and nxt.weight.ndim == 2 and prev.out_features != nxt.in_features:
            problems.append(
                f"{prev.weight_key} has {prev.out_features} outputs but {nxt.weight_key} takes {nxt.in_features} inputs"
            )
    return problems
