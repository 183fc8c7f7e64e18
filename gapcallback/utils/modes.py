"""Switch a module to eval mode for a measurement and give every submodule its own mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Put ``module`` (and every submodule) in eval mode; restore each one's previous mode.

    ``module.train(was_training)`` would flip submodules the user froze in eval mode (a frozen
    encoder, BatchNorm layers kept in eval) back into training mode; this restores each
    submodule's own flag instead.
    """
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.train(mode)
