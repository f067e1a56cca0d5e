"""FPELinear: an expanded linear layer that keeps off-mask weights exactly zero and runs fast.

Kernels (all compute the same function as the masked-dense oracle `x @ (W * M).T + b`):
- `dense`:   weights are kept exactly zero off the mask (gradient masked by a hook, re-masked after
             each optimizer step by `enforce_mask`), so forward is a plain `F.linear` with no mask
             multiply. Works for any mask (the paper's per-edge random split).
- `grouped`: for splits shared within groups of G consecutive parents (`--group-size`, or
             `structured`): each (group, child) sees a fixed input subset, so the layer runs as one
             gather of x plus a batched matmul over (group, child) blocks: the arithmetic of the
             dense parent layer instead of alpha times it. Weights live in compact blocks.
`masked_dense_linear` is the oracle the tests compare both against.

`KernelMLP` runs a whole expanded MLP through these kernels (grouped for each layer whose split the
checkpoint's recorded `--group-size` allows, dense otherwise): the one fast forward shared by
training and evaluation (`train.MaskedMLP` adds the mask locking) and by `fpe analyze`'s activation
statistics. Masks are applied once, when the module is built, never per call. A layer with tied
columns (`--outgoing tie`) keeps one parameter per (row, parent) and applies it to the sum of that
parent's children's activations: the consumer's arithmetic of the dense model.
"""

from __future__ import annotations

import json

import torch
from torch import nn
from torch.nn import functional as F

from .errors import JSON_ERRORS, FPEError
from .model import MLP, activation_fn, first_of_groups, sibling_sum, uniform_children


def masked_dense_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Reference: apply the mask on every call."""
    return F.linear(x, weight * mask.to(weight.dtype), bias)


def group_layout(mask: torch.Tensor, alpha: int, group_size: int) -> torch.Tensor | None:
    """(groups, alpha, m) input indices per (group, child), padded with -1; None if the mask is not grouped.

    Grouped means: within each group of `group_size` parents (rows alpha*i .. alpha*i+alpha-1 per
    parent), the inputs used by child c of any parent never appear in another child c' of the group.
    """
    rows, d = mask.shape
    if rows % alpha or (rows // alpha) % group_size:
        return None
    n_groups = rows // alpha // group_size
    per = mask.view(n_groups, group_size, alpha, d).any(dim=1)  # (groups, alpha, d): inputs each child uses
    if bool((per.sum(dim=1) > 1).any()):
        return None  # an input feeds two different children of one group: not a shared split
    m = int(per.sum(dim=2).max())
    idx = torch.full((n_groups, alpha, m), -1, dtype=torch.int64)
    for g in range(n_groups):
        for c in range(alpha):
            cols = per[g, c].nonzero().flatten()
            idx[g, c, : cols.numel()] = cols
    return idx


def to_blocks(weight: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight and mask -> compact (groups, alpha, G, m) blocks for the grouped kernel."""
    n_groups, alpha, m = idx.shape
    group = weight.shape[0] // (n_groups * alpha)
    gather = idx.clamp(min=0).unsqueeze(2).expand(n_groups, alpha, group, m)  # (groups, alpha, G, m)
    valid = (idx >= 0).unsqueeze(2).expand_as(gather)
    block_mask = torch.gather(mask.view(n_groups, group, alpha, -1).transpose(1, 2), 3, gather) & valid
    block = torch.gather(weight.view(n_groups, group, alpha, -1).transpose(1, 2), 3, gather)
    return block.masked_fill(~block_mask, 0).contiguous(), block_mask.contiguous()


def grouped_linear(x: torch.Tensor, block: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (N, in) through (groups, alpha, G, m) blocks -> (N, alpha*h), rows in (parent, child) order."""
    n_groups, alpha, group, m = block.shape
    xg = x[:, index.clamp(min=0).view(-1)].view(x.shape[0], n_groups * alpha, m).transpose(0, 1)  # (groups*alpha, N, m)
    out = torch.bmm(xg, block.view(n_groups * alpha, group, m).transpose(1, 2))  # (groups*alpha, N, G)
    n = x.shape[0]  # explicit sizes below: an empty shard (N = 0) cannot infer a -1
    out = out.view(n_groups, alpha, n, group).permute(2, 0, 3, 1).reshape(n, n_groups * group * alpha)  # (N, alpha*h)
    return out + bias if bias is not None else out


def from_blocks(block: torch.Tensor, block_mask: torch.Tensor, idx: torch.Tensor, in_features: int) -> torch.Tensor:
    """Compact blocks -> the (out, in) weight with exact zeros off the mask."""
    n_groups, alpha, group, m = block.shape
    out = torch.zeros(n_groups, alpha, group, in_features + 1, dtype=block.dtype)  # +1: a sink for padding
    target = torch.where(idx >= 0, idx, in_features).unsqueeze(2).expand(n_groups, alpha, group, m)
    out.scatter_(3, target, block.masked_fill(~block_mask, 0))
    return out[..., :-1].transpose(1, 2).reshape(n_groups * group * alpha, in_features)


MIN_GROUP = 64  # parents per group below which KernelMLP keeps the dense kernel (measured crossover ~48)


def layer_group_index(mask: torch.Tensor, parents: torch.Tensor | None, group_size: int | None) -> torch.Tensor | None:
    """The grouped layout of an expanded layer whose parents all have the same number of children.

    Without a recorded group size (or with one above the width), one group of every parent is tried:
    a split shared by all parents (`--split structured` on dense parents) runs grouped too.
    """
    if parents is None or mask is None:
        return None
    counts = torch.bincount(parents)
    if counts.numel() == 0 or bool((counts != counts[0]).any()) or int(counts[0]) < 2:
        return None
    parents_n = counts.numel()
    group = min(group_size or parents_n, parents_n)
    if group < MIN_GROUP:  # many tiny matmuls: slower than the dense kernel (bench: 3.8x at 8, 1.2x at 32)
        return None
    return group_layout(mask, int(counts[0]), group)


class FPELinear(nn.Module):
    """A linear layer with a frozen mask. `kernel`: 'dense', 'grouped' or 'auto' (grouped when possible)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor, *,
                 alpha: int = 1, group_size: int | None = None, kernel: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        idx = group_layout(mask, alpha, group_size) if (kernel != "dense" and group_size and alpha > 1) else None
        if kernel == "grouped" and idx is None:
            raise ValueError("mask is not grouped for this alpha/group_size")
        self.kernel = "grouped" if idx is not None else "dense"
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        if self.kernel == "dense":
            self.register_buffer("mask", mask.clone())
            self.weight = nn.Parameter(weight.masked_fill(~mask, 0))
        else:
            self._init_grouped(weight, mask, idx, alpha, group_size)
        self.weight.register_hook(lambda g: g * self.mask.to(g.dtype))

    def _init_grouped(self, weight, mask, idx, alpha, group_size) -> None:
        self.alpha, self.group_size = alpha, group_size
        self.register_buffer("index", idx)  # (groups, alpha, m) input of each slot; -1 = padding
        block, block_mask = to_blocks(weight, mask, idx)
        self.register_buffer("mask", block_mask)
        self.weight = nn.Parameter(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dense":
            return F.linear(x, self.weight, self.bias)
        return grouped_linear(x, self.weight, self.index, self.bias)

    @torch.no_grad()
    def enforce_mask(self) -> None:
        """Re-zero off-mask weights (call after every optimizer step)."""
        self.weight.masked_fill_(~self.mask, 0)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight with exact zeros off the mask, whatever the kernel."""
        if self.kernel == "dense":
            return self.weight.detach().clone()
        return from_blocks(self.weight.detach(), self.mask, self.index, self.in_features)


# ---------------------------------------------------------------- a whole MLP through the kernels


def recorded_group_size(metadata: dict[str, str]) -> int | None:
    """The --group-size an expanded checkpoint was made with (recorded in fpe.settings), if any."""
    try:
        value = json.loads(metadata.get("fpe.settings", "{}")).get("group_size")
    except (*JSON_ERRORS, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def as_f32(t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 copy of t, with exact zeros off `mask` when one is given."""
    t = t.detach().to(torch.float32).clone()
    return t.masked_fill_(~mask, 0) if mask is not None else t


def collapse_tied(layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, mask) of a layer, tied column groups reduced to their first copy (the shared parameter)."""
    if layer.tied is None:
        return layer.weight, layer.mask
    first = first_of_groups(layer.tied)
    weight, mask = layer.weight[:, first], (layer.mask[:, first] if layer.mask is not None else None)
    w_eff = weight if mask is None else weight.masked_fill(~mask, 0)
    full = layer.weight if layer.mask is None else layer.weight.masked_fill(~layer.mask, 0)
    if not torch.equal(full, w_eff[:, layer.tied]) or (mask is not None and not torch.equal(layer.mask, mask[:, layer.tied])):
        raise FPEError(f"{layer.weight_key}: its tied column copies differ, so they are not one parameter",
                       "run fpe verify on the file; it was edited or written by another tool")
    return weight, mask


def kernel_weight(weight: torch.Tensor, mask: torch.Tensor | None, parents: torch.Tensor | None,
                  group_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One layer's float32 weight laid out for its fastest kernel: (weight, kernel mask, index).

    index None: the dense kernel, an (out, in) copy with exact zeros off `mask` (kernel mask = mask).
    index given: the grouped kernel, compact (groups, alpha, G, m) blocks and their block mask.
    """
    index = layer_group_index(mask, parents, group_size)
    if index is None:
        return as_f32(weight, mask), mask, None
    block, block_mask = to_blocks(weight.detach().to(torch.float32), mask, index)
    return block, block_mask, index


def kernel_linear(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """x (N, in) through a `kernel_weight` layout: F.linear (dense) or grouped_linear (grouped)."""
    return F.linear(x, weight, bias) if index is None else grouped_linear(x, weight, index, bias)


class KernelMLP(nn.Module):
    """float32 copy of an MLP whose layers run through FPELinear's kernels (no per-call mask multiply).

    Parameters `weights.{i}` (dense (out, in) or grouped blocks, see `kernel_weight`) and `biases.{j}`;
    `index[i]` is layer i's grouped layout or None (dense kernel). With keep_masks, each layer's
    kernel mask (or None) is kept as buffer `mask{i}` (what training needs to lock it).
    """

    def __init__(self, mlp: MLP, *, keep_masks: bool = False):
        super().__init__()
        self.activation = mlp.activation
        activation_fn(mlp.activation)
        group_size = recorded_group_size(mlp.metadata)
        self.tied = [layer.tied for layer in mlp.layers]  # tied layers run at the parents' width
        self.siblings = [uniform_children(t) if t is not None else None for t in self.tied]
        built = [kernel_weight(*collapse_tied(layer), layer.parents, group_size) for layer in mlp.layers]
        self.index = [index for _, _, index in built]
        self.weights = nn.ParameterList([nn.Parameter(w) for w, _, _ in built])
        self.biases = nn.ParameterList([nn.Parameter(as_f32(layer.bias)) for layer in mlp.layers if layer.bias is not None])
        self.bias_of = [sum(l.bias is not None for l in mlp.layers[:i]) if layer.bias is not None else -1
                        for i, layer in enumerate(mlp.layers)]
        if keep_masks:
            for i, (_, mask, _) in enumerate(built):
                self.register_buffer(f"mask{i}", mask.clone() if mask is not None else None)

    @property
    def kernels(self) -> list[str]:
        """The kernel of each layer: 'dense' or 'grouped'."""
        return ["dense" if index is None else "grouped" for index in self.index]

    @property
    def gather_width(self) -> int:
        """Floats the grouped kernel gathers per input row (the widest layer; 0 without grouped layers):
        its transient copy of x is (N, gather_width), groups times the input width."""
        return max((index.numel() for index in self.index if index is not None), default=0)

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's linear map (before the activation): (N, in_i) -> (N, out_i).

        A tied layer first sums each parent's children (its columns are one parameter per parent).
        """
        b = self.biases[self.bias_of[i]] if self.bias_of[i] >= 0 else None
        if self.tied[i] is not None:
            x = sibling_sum(x, self.tied[i], self.siblings[i])
        return kernel_linear(x, self.weights[i], self.index[i], b)

    def expanded_weight(self, i: int, in_features: int) -> torch.Tensor:
        """Layer i's weight as the file stores it: (out, in) with exact zeros off the mask, tied copies repeated."""
        w = self.weights[i].detach().cpu()
        if self.index[i] is not None:
            width = in_features if self.tied[i] is None else int(self.tied[i][-1]) + 1
            w = from_blocks(w, getattr(self, f"mask{i}").cpu(), self.index[i], width)
        return w[:, self.tied[i]] if self.tied[i] is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act, last = activation_fn(self.activation), len(self.weights) - 1
        for i in range(len(self.weights)):
            x = self.layer(i, x)  # (N, out_i)
            x = act(x) if i < last else x
        return x

    def hidden_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post-activation outputs of every hidden layer, (N, width_k) each; x is cast to float32."""
        act, h, out = activation_fn(self.activation), x.to(torch.float32), []
        for i in range(len(self.weights) - 1):
            h = act(self.layer(i, h))
            out.append(h)
        return out
