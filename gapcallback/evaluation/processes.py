"""The processes of an evaluation: rank, shards and the few collectives, over torch.distributed.

Outside a process group (one process) every function here is the identity. Inside one (started
by ``torchrun``: gloo on CPU, NCCL on GPU) the collectives run on the default group; tensors must
be on the backend's device (CPU for gloo, the process's GPU for NCCL).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Processes",
    "agree",
    "broadcast_from_zero",
    "current_processes",
    "gather_rows",
    "shard_rows",
    "sum_over_processes",
]


class Processes(NamedTuple):
    """This process's ``rank`` among ``world`` processes."""

    rank: int
    world: int


def current_processes() -> Processes:
    """The default process group's rank and size, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size())
    return Processes(0, 1)


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Contiguous rows ``[start, end)`` of process ``rank``: the first ``n % world`` processes
    take one row more (the split :class:`~gapcallback.GapCallback` uses for its samples)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def sum_over_processes(t: Tensor) -> Tensor:
    """``t`` summed over processes (a copy; ``t`` itself in one process)."""
    if current_processes().world == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def agree(ok: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``ok`` holds on every process (one all-reduce; ``ok`` in one process)."""
    if current_processes().world == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def gather_rows(t: Tensor) -> Tensor:
    """Concatenate every process's ``t`` (``[n_r, ...]``, sizes may differ) in rank order, on
    every process."""
    processes = current_processes()
    if processes.world == 1:
        return t
    sizes = torch.zeros(processes.world, dtype=torch.int64, device=t.device)
    sizes[processes.rank] = t.shape[0]
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM)
    longest = int(sizes.max())
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(processes.world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes.tolist(), strict=True)])


def broadcast_from_zero(obj: Any) -> Any:
    """Process zero's ``obj`` on every process (a picklable object: sent between these
    processes only, never written to a file); ``obj`` itself in one process."""
    if current_processes().world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
