"""The top-k accumulator against a brute-force oracle: any candidates, pushed in any chunks, give
per row the k smallest (distance, column) pairs in that order (ties by the lower column)."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapcallback.search import TopK
from tests.topk_oracle import topk_oracle


@st.composite
def candidates(draw):
    n_rows = draw(st.integers(1, 6))
    n_cols = draw(st.integers(1, 12))
    k = draw(st.integers(1, 4))
    rows, dists, cols = [], [], []
    for r in range(n_rows):  # each column at most once per row, as every search pushes them
        picked = draw(st.lists(st.integers(0, n_cols - 1), unique=True, max_size=n_cols))
        for c in picked:
            rows.append(r)
            cols.append(c)
            # Few distinct values: ties are common; 0 and large values included.
            dists.append(draw(st.sampled_from([0.0, 0.5, 1.0, 1.0 + 2**-52, 3.0, 1e300])))
    order = draw(st.permutations(range(len(rows))))
    rows, dists, cols = ([v[i] for i in order] for v in (rows, dists, cols))
    cuts = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=3)))
    return n_rows, k, rows, dists, cols, cuts


@settings(deadline=None, max_examples=300)
@given(case=candidates())
def test_topk_keeps_the_k_smallest_pairs_whatever_the_chunks(case) -> None:
    n_rows, k, rows, dists, cols, cuts = case
    best = TopK(n_rows, k, torch.float64, torch.device("cpu"))
    bounds = [0, *cuts, len(rows)]
    for a, b in itertools.pairwise(bounds):
        best.push(
            torch.tensor(rows[a:b], dtype=torch.long),
            torch.tensor(dists[a:b], dtype=torch.float64),
            torch.tensor(cols[a:b], dtype=torch.long),
        )
    want_d, want_i = topk_oracle(n_rows, k, rows, dists, cols)
    assert torch.equal(best.dists, want_d), (best.dists, want_d)
    assert torch.equal(best.indices, want_i), (best.indices, want_i)


def test_topk_span_merges_only_its_rows() -> None:
    best = TopK(4, 1, torch.float64, torch.device("cpu"))
    best.push(torch.tensor([2, 2, 3]), torch.tensor([1.0, 1.0, 5.0]), torch.tensor([7, 4, 0]))
    best.push(torch.tensor([1]), torch.tensor([2.0]), torch.tensor([9]), span=(1, 2))
    assert best.indices[:, 0].tolist() == [-1, 9, 4, 0]
    assert best.dists[:, 0].tolist() == [float("inf"), 2.0, 1.0, 5.0]
