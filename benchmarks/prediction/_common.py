"""Shared helpers of the prediction benchmarks (not part of the library): environment, MLPs, fits."""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int) -> dict[str, Any]:
    import lightning
    import numpy
    import sklearn

    return {
        "cpu": cpu_model(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def mlp(d_in: int, d_out: int, hidden: int = 256, depth: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d_in, hidden), nn.SiLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.SiLU()]
    layers.append(nn.Linear(hidden, d_out))
    return nn.Sequential(*layers)


def train_threads(threads: int):
    """A context manager running the block on ``threads`` torch threads (tiny MLP steps run faster
    on one thread than on two shared cores: the OpenMP barriers dominate)."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return scope()


def train_steps(
    model: nn.Module,
    loss_fn: Callable[[Tensor], Tensor],
    n: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    generator: torch.Generator,
) -> float:
    """``steps`` AdamW steps with a cosine learning rate; ``loss_fn(index)`` on a minibatch of row
    indices (without replacement within an epoch). Returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    batch_size = min(batch_size, n)
    order = torch.randperm(n, generator=generator)
    pos = 0
    loss = torch.tensor(math.nan)
    model.train()
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        index = order[pos : pos + batch_size]
        pos += batch_size
        loss = loss_fn(index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def loglog_slope(n: list[float], values: list[float]) -> float:
    """Least-squares slope of log(values) against log(n)."""
    x = torch.tensor(n, dtype=torch.float64).log()
    y = torch.tensor(values, dtype=torch.float64).log()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())
