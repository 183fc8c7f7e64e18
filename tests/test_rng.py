"""utils.rng: the callbacks' seeded, isolated random streams."""

from __future__ import annotations

import random

import numpy as np
import torch

from gapcallback.utils.rng import derive_seed, isolated_rng, seed_torch


def test_seed_torch_seeds_the_cpu_generator_like_manual_seed():
    seed_torch(1234)
    ours = torch.rand(5)
    torch.manual_seed(1234)
    assert torch.equal(ours, torch.rand(5))
    seed_torch(1234, torch.device("cpu"))
    assert torch.equal(ours, torch.rand(5))


def test_isolated_rng_draws_the_seeded_stream_and_restores_every_stream():
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - the legacy global state is what it must restore
    random.seed(0)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    with isolated_rng(derive_seed(7, 3), torch.device("cpu")):
        inside = torch.rand(4)
        np.random.rand(3)  # noqa: NPY002
        random.random()
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])  # noqa: NPY002
    assert random.getstate() == before[2]
    with isolated_rng(derive_seed(7, 3)):  # the same seed: the same draws, whatever came before
        torch.rand(100)
    with isolated_rng(derive_seed(7, 3)):
        assert torch.equal(torch.rand(4), inside)


def test_derive_seed_is_stable_and_separates_its_parts():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, i, r) for i in range(20) for r in range(4)}) == 80
    assert 0 <= derive_seed(2**40, -1) < 2**63
