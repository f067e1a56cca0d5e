"""Data-parallel plumbing for the training loops: one process, or many under `torchrun`.

Under torchrun (env `WORLD_SIZE` > 1) the process group is started once (gloo on CPU, nccl when CUDA
is available), the module is wrapped in DistributedDataParallel, and every global batch is cut into
`world` contiguous shards, one per rank. Each rank's loss is its shard's summed loss times
`world / global_batch`; DDP averages gradients over ranks, so the step equals the single-process
step on the whole batch up to float summation order. Every rank runs the same seeded shuffle, so no
sampler is needed. Only rank 0 writes files or reports progress.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return dist.get_backend() if self.world > 1 else None

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch of sample indices (contiguous, sizes differ by <= 1)."""
        return idx.tensor_split(self.world)[self.rank] if self.world > 1 else idx

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

        ids = [self.device.index] if self.device.type == "cuda" else None
        params = inspect.signature(DDP.__init__).parameters  # the buffers (masks) are equal on every rank
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DDP(module, device_ids=ids, **no_sync)

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum numbers over ranks (float64); identity in one process."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def context() -> DistContext:
    """The current process's place in a torchrun job; starts the process group on first use."""
    if world_size() <= 1:
        return DistContext()
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistContext(dist.get_rank(), dist.get_world_size(), device)


def finish() -> None:
    """End a torchrun job cleanly: wait for every rank (rank 0 may still be writing the output),
    then tear the process group down. A rank that exits while gloo's connections are live can make
    its peer abort (SIGABRT) at shutdown. A no-op in one process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True outside torchrun and on rank 0 (uses the environment, so it is safe before `context()`)."""
    return os.environ.get("RANK", "0") == "0"
