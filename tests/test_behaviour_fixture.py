"""The engine's behaviour is pinned: every search and estimator reproduces its recorded output.

``tests/fixtures/behaviour.pt`` holds the outputs of ``knn`` (plain, leave-one-out, k > 1,
duplicates, float64, odd block sizes), ``representation_gap``, ``memorization``, every intrinsic
dimension method, ``GapLaw.fit`` and every symmetry search on fixed seeds, recorded before the
engine-room refactor (``tests/fixtures/record_behaviour.py``). They must come back bit for bit.

Bit-for-bit holds for one CPU kernel family (torch dispatches its reductions by the CPU's
capability: AVX2 and AVX-512 sum in different orders). On another family, indices must still be
equal and floats agree to 1e-12 relative.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from record_behaviour import FIXTURE, cases

RECORDED = torch.load(FIXTURE, weights_only=False)
SAME_KERNELS = RECORDED["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
CASES = cases()


def _flatten(value: object, prefix: str = "") -> dict[str, object]:
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            out.update(_flatten(v, f"{prefix}.{key}"))
        return out
    if isinstance(value, (tuple, list)) and not all(isinstance(v, (int, float)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _same(got: object, want: object, where: str) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and got.shape == want.shape, where
        if SAME_KERNELS or not want.is_floating_point():
            assert torch.equal(got, want), f"{where}: values changed"
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=0, equal_nan=True, msg=where)
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), where
    elif isinstance(want, float) and not SAME_KERNELS:
        assert got == pytest.approx(want, rel=1e-12), where
    elif isinstance(want, (tuple, list)):  # a list of numbers: each number by the rules above
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def test_fixture_covers_every_case() -> None:
    assert sorted(RECORDED["values"]) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_behaviour_unchanged(name: str) -> None:
    got = _flatten(CASES[name]())
    want = _flatten(RECORDED["values"][name])
    assert sorted(got) == sorted(want)
    for where, value in want.items():
        _same(got[where], value, name + where)
