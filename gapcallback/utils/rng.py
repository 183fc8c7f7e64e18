"""Run callback work without perturbing the training run's random number streams."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def isolated_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Fork the torch (CPU and ``device``), numpy and python RNGs, seed them, restore on exit.

    On an MPS ``device`` its generator is seeded but not restored (torch has no fork for it).

    Anything drawn inside (a sampler using the global RNG, a shuffled DataLoader creating its
    iterator) leaves the training run's streams exactly as they were.
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    np_state = np.random.get_state()  # noqa: NPY002 - we restore the legacy global state
    py_state = random.getstate()
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        seed_torch(seed, device)
        try:
            yield
        finally:
            np.random.set_state(np_state)  # noqa: NPY002
            random.setstate(py_state)


def seed_torch(seed: int, device: torch.device | None = None) -> None:
    """Seed torch's CPU generator and, for a CUDA or MPS ``device``, that device's generator.

    Only these: ``torch.manual_seed`` also seeds every other device (which :func:`isolated_rng`
    does not restore) and, with CUDA not initialised, queues a lazy seeding call with a formatted
    stack trace (milliseconds under a Trainer).
    """
    torch.default_generator.manual_seed(seed)
    if device is None:
        return
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, evaluation index, rank ...), stable across runs."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
        >> np.uint64(1)
    )
