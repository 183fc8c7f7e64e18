"""A brute-force top-k: the oracle of the search tests."""

from __future__ import annotations

import torch


def topk_oracle(n_rows: int, k: int, rows: list[int], dists: list[float], cols: list[int]):
    """Per row, the k smallest (distance, column) pairs of the flat candidates, padded with
    (inf, -1): ``[n_rows, k]`` float64 distances and int64 columns."""
    out_d = torch.full((n_rows, k), float("inf"), dtype=torch.float64)
    out_i = torch.full((n_rows, k), -1, dtype=torch.long)
    for r in range(n_rows):
        pairs = sorted((d, c) for rr, d, c in zip(rows, dists, cols, strict=True) if rr == r)
        for j, (d, c) in enumerate(pairs[:k]):
            out_d[r, j], out_i[r, j] = d, c
    return out_d, out_i
