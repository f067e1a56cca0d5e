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
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


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
        n_groups, _, m = idx.shape
        self.alpha, self.group_size = alpha, group_size
        self.register_buffer("index", idx.clamp(min=0))  # (groups, alpha, m); padding reads input 0
        self.register_buffer("slot_valid", idx >= 0)  # (groups, alpha, m): False for padding slots
        rows = weight.view(n_groups, group_size, alpha, -1).transpose(1, 2)  # (groups, alpha, G, d)
        gather = self.index.unsqueeze(2).expand(n_groups, alpha, group_size, m)  # (groups, alpha, G, m)
        valid = (idx >= 0).unsqueeze(2).expand_as(gather)
        block_mask = torch.gather(mask.view(n_groups, group_size, alpha, -1).transpose(1, 2), 3, gather) & valid
        block = torch.gather(rows, 3, gather).masked_fill(~block_mask, 0)  # (groups, alpha, G, m)
        self.register_buffer("mask", block_mask.contiguous())
        self.weight = nn.Parameter(block.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dense":
            return F.linear(x, self.weight, self.bias)
        n_groups, alpha, group, m = self.weight.shape
        xg = x[:, self.index.view(-1)].view(x.shape[0], n_groups * alpha, m).transpose(0, 1)  # (groups*alpha, N, m)
        w = self.weight.view(n_groups * alpha, group, m).transpose(1, 2)  # (groups*alpha, m, G)
        out = torch.bmm(xg, w)  # (groups*alpha, N, G)
        out = out.view(n_groups, alpha, -1, group).permute(2, 0, 3, 1).reshape(x.shape[0], -1)  # (N, alpha*h) rows (i, c)
        return out + self.bias if self.bias is not None else out

    @torch.no_grad()
    def enforce_mask(self) -> None:
        """Re-zero off-mask weights (call after every optimizer step)."""
        self.weight.masked_fill_(~self.mask, 0)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight with exact zeros off the mask, whatever the kernel."""
        if self.kernel == "dense":
            return self.weight.detach().clone()
        n_groups, alpha, group, m = self.weight.shape
        out = torch.zeros(n_groups, alpha, group, self.in_features + 1, dtype=self.weight.dtype)  # +1: padding sink
        target = torch.where(self.slot_valid, self.index, self.in_features)  # (groups, alpha, m)
        out.scatter_(3, target.unsqueeze(2).expand(n_groups, alpha, group, m), self.weight.masked_fill(~self.mask, 0))
        return out[..., :-1].transpose(1, 2).reshape(self.out_features, self.in_features)
