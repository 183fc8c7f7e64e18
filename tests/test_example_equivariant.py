"""The equivariant-denoiser example: its memory denoiser is exactly equivariant and equals the ideal
equivariant denoiser at its optimum, and the script runs end to end (tiny settings)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from gapcallback.symmetry import CyclicShifts, ideal_denoiser

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "equivariant_denoisers.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("equivariant_denoisers", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_denoiser_is_exactly_shift_equivariant(example):
    torch.manual_seed(0)
    net = example.CircularMemoryNet(filters=5).double()
    x = torch.randn(7, example.LENGTH, dtype=torch.float64)
    sigma = torch.rand(7, dtype=torch.float64) + 0.3
    for shift in (1, 5, 17):
        moved = net(torch.roll(x, shift, dims=-1), sigma)
        torch.testing.assert_close(moved, torch.roll(net(x, sigma), shift, dims=-1))


def test_memory_denoiser_with_the_data_as_filters_is_the_ideal_equivariant_denoiser(example):
    g = torch.Generator().manual_seed(0)
    data = example.bump_signals(4, g).double()
    net = example.CircularMemoryNet(filters=4).double()
    with torch.no_grad():
        net.filters.copy_(data)
    atoms = CyclicShifts().orbit(data).reshape(-1, example.LENGTH)  # G(D), 4 x 32 atoms
    x = example.bump_signals(6, g).double() + 0.3 * torch.randn(6, example.LENGTH, generator=g)
    for sigma in (2.0, 0.5, 0.1):
        expected = ideal_denoiser(x, atoms, sigma)
        got = net(x, torch.full((6,), sigma, dtype=torch.float64))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)


def test_example_runs_end_to_end(example, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = [
        "equivariant_denoisers.py", "--sizes", "2", "3", "--steps", "50",
        "--steps-per-epoch", "25", "--n-reference", "40", "--num-samples", "32",
        "--out", str(out), "--threads", str(torch.get_num_threads()),
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setitem(example.MODELS["memory"][2], "steps", 50)
    example.main()
    results = torch.load(out / "results.pt", weights_only=False)
    assert [r["n"] for r in results] == [2, 3]
    for r in results:
        for kind in example.MODELS:
            # Orbit distances never exceed plain ones, for the model and for the lines.
            assert 0 < r[kind]["orbit_observed"] <= r[kind]["plain_observed"] + 1e-6
        assert r["law_orbit"] <= r["law_plain"]
    table = (out / "equivariant_denoisers.md").read_text()
    assert table.count("\n| 2 |") == 1 and table.count("\n| 3 |") == 1
    assert (out / "equivariant_denoisers.png").stat().st_size > 10_000
