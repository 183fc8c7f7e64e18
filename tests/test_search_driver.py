"""The blocked driver's branch and bound against a brute-force oracle.

A bounds product brackets a known distance matrix by loose, random, valid bounds (many ties, equal
bounds, bounds equal to the distance); whatever the blocks, the pending cap (which forces the
pruning flushes), ``k``, ``first_batch`` and ``exclude_diagonal``, the search returns per row the
k smallest (distance, column) pairs, ties by the lower column.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapcallback.search import RowBlock, blocked_search
from tests.topk_oracle import topk_oracle


class KnownBounds:
    """``(lower, upper)`` = ``(dist - below, dist + above)`` of a given ``[n, m]`` matrix."""

    def __init__(self, dist: torch.Tensor, below: torch.Tensor, above: torch.Tensor) -> None:
        self.lower, self.upper = dist - below, dist + above

    def rows(self, start: int, end: int) -> RowBlock:
        return RowBlock((start, end), None)

    def block(self, rows: RowBlock, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        rs, re = rows.operands
        return self.lower[rs:re, start:end].clone(), self.upper[rs:re, start:end].clone()


def oracle(dist: torch.Tensor, k: int, exclude_diagonal: bool):
    """Every pair of ``dist`` ``[n, m]`` as a flat candidate (but the diagonal, if excluded)."""
    n, m = dist.shape
    pairs = [(r, c) for r in range(n) for c in range(m) if not (exclude_diagonal and r == c)]
    rows, cols = [r for r, _ in pairs], [c for _, c in pairs]
    return topk_oracle(n, k, rows, [float(dist[r, c]) for r, c in pairs], cols)


@st.composite
def searches(draw):
    n = draw(st.integers(1, 9))
    m = draw(st.integers(2, 11))
    exclude_diagonal = draw(st.booleans()) and n <= m
    k = draw(st.integers(1, m - 1 if exclude_diagonal else m))
    values = st.sampled_from([0.0, 0.25, 1.0, 1.0, 2.0, 3.5])
    dist = torch.tensor(draw(st.lists(values, min_size=n * m, max_size=n * m)))
    slack = st.sampled_from([0.0, 0.0, 0.5, 1.0, 4.0])
    below = torch.tensor(draw(st.lists(slack, min_size=n * m, max_size=n * m)))
    above = torch.tensor(draw(st.lists(slack, min_size=n * m, max_size=n * m)))
    return (
        dist.reshape(n, m).double(),
        below.reshape(n, m).double(),
        above.reshape(n, m).double(),
        k,
        exclude_diagonal,
        draw(st.integers(1, n)),  # query block
        draw(st.integers(1, m)),  # column block
        draw(st.sampled_from([None, 1, 2])),  # first batch
        draw(st.sampled_from([1, 2, 64])),  # pending per row
    )


@settings(deadline=None, max_examples=300)
@given(case=searches())
def test_branch_and_bound_finds_the_k_nearest_whatever_the_blocks(case) -> None:
    dist, below, above, k, exclude, q_block, col_block, first_batch, pending = case
    n, m = dist.shape
    evaluated: list[int] = []

    def exact(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        evaluated.append(rows.numel())
        return dist[rows, cols]

    best = blocked_search(
        KnownBounds(dist, below, above), exact, n, m, k,
        row_blocks=[(s, min(s + q_block, n)) for s in range(0, n, q_block)],
        col_block=col_block, dtype=torch.float64, device=torch.device("cpu"),
        evaluate="by_lower_bound", exclude_diagonal=exclude, distinct=True,
        first_batch=first_batch, pending_per_row=pending,
    )  # fmt: skip
    want_d, want_i = oracle(dist, k, exclude)
    assert torch.equal(best.dists, want_d), (best.dists, want_d)
    assert torch.equal(best.indices, want_i), (best.indices, want_i)
    assert sum(evaluated) <= n * m


def test_branch_and_bound_refuses_a_symmetric_search() -> None:
    dist = torch.zeros(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"by_lower_bound.*symmetric=False"):
        blocked_search(
            KnownBounds(dist, dist, dist), lambda r, c: dist[r, c], 3, 3, 1,
            row_blocks=[(0, 3)], col_block=3, dtype=torch.float64,
            device=torch.device("cpu"), evaluate="by_lower_bound", symmetric=True,
        )  # fmt: skip
