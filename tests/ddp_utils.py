"""Run a function in two real CPU processes joined by a gloo process group."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_ddp(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Spawn ``world_size`` processes running ``fn(rank, world_size, *args)``; re-raise failures.

    ``fn`` must be importable (module level) and should write its results to a file in a
    temporary directory passed through ``args`` for the parent to check.
    """
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
