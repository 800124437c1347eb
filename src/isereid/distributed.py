"""torch.distributed in one small object, with single-process fallbacks.

A run started with ``torchrun`` initialises the default process group from the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); a plain ``isereid train`` has world size 1 and
every collective below is the identity, so the trainer has one code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Send a picklable object from ``src`` to every rank (trusted, in-process data only)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equally-sized ``tensor`` (n, ...) from all ranks in rank order -> (W*n, ...).
        No gradient flows back (use :func:`gather_with_grad` for that)."""
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def all_gather_uneven(self, tensor: torch.Tensor) -> torch.Tensor:
        """Like :meth:`all_gather` for per-rank row counts that may differ by rank."""
        if not self.enabled:
            return tensor
        count = torch.tensor([tensor.shape[0]], device=tensor.device)
        counts = self.all_gather(count).tolist()
        padded = torch.zeros((max(counts),) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        gathered = self.all_gather(padded)
        rows = max(counts)
        return torch.cat([gathered[r * rows: r * rows + c] for r, c in enumerate(counts)])

    def shard(self, n: int) -> range:
        """Contiguous block of ``range(n)`` handled by this rank (sizes differ by at most 1)."""
        per, extra = divmod(n, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (1 if self.rank < extra else 0))


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns the gradient of this rank's own slice.

    Correct when every rank computes the SAME loss from the gathered tensor (as the
    isereid trainer does): rank r's autograd graph then holds exactly dL/df_r, and the
    gradient all-reduce of DDP sums the ranks' parameter gradients (the trainer scales the
    loss by the world size because DDP averages).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        start = ctx.rank * ctx.rows
        return grad[start: start + ctx.rows], None, None


def gather_with_grad(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """(n, D) per rank -> (W*n, D) in rank order; the local slice keeps its gradient."""
    if not ctx.enabled:
        return tensor
    return _GatherWithGrad.apply(tensor, ctx.rank, ctx.world_size)


def init_distributed(device_name: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun, and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda:")
    if device_name.startswith("cuda:"):
        device = torch.device(device_name)
    elif use_cuda:
        device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=60))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
