r"""The top-k accumulator every search merges its exact candidates into (faiss' ``ResultHeap``).

:class:`TopK` holds, for ``R`` rows, the ``k`` smallest exact distances seen so far and their
column indices; :meth:`TopK.push` merges flat candidates ``(rows, dists, cols)``. The merge sorts by
(row, distance, column), so the result never depends on block sizes or on the order in which
candidates arrive: ties are broken by the lower column. With ``distinct=True`` a column pushed
twice for a row (an orbit search meets a point once per group element) keeps its smaller distance.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["KNNResult", "TopK", "distinct_topk", "merge_distinct", "merge_sorted"]


class KNNResult(NamedTuple):
    """Result of an exact k-nearest-neighbour search (:func:`gapcallback.functional.knn`).

    Attributes:
        sq_dists: ``[N, k]`` squared distances, ascending along the last dimension; float32, or
            float64 when an input is float64 or when float32 would flush a non-zero squared
            distance to zero (see :func:`gapcallback.search.output_sq_dists`). The engine itself
            returns exact float64 values (float32 on MPS) before that cast.
        indices: ``[N, k]`` int64 indices into ``points`` (ties: lower index first).
    """

    sq_dists: Tensor
    indices: Tensor


class TopK:
    """Per-row k smallest ``(distance, column)`` pairs of ``rows`` rows.

    Args:
        rows: number of rows ``R``.
        k: neighbours kept per row.
        dtype: dtype of the distances (exact re-checks: float64).
        device: where the state lives.
        distinct: merge a column seen twice for a row into one entry (its smaller distance).

    Attributes:
        dists: ``[R, k]`` ascending distances (``inf`` where fewer than k were pushed).
        indices: ``[R, k]`` int64 columns (``-1`` where fewer than k were pushed).
    """

    def __init__(
        self, rows: int, k: int, dtype: torch.dtype, device: torch.device, *, distinct: bool = False
    ) -> None:
        self.dists = torch.full((rows, k), float("inf"), dtype=dtype, device=device)
        self.indices = torch.full((rows, k), -1, dtype=torch.long, device=device)
        self.distinct = distinct

    def push(
        self, rows: Tensor, dists: Tensor, cols: Tensor, span: tuple[int, int] | None = None
    ) -> None:
        """Merge candidates: ``rows``, ``dists``, ``cols`` are ``[T]`` (rows global).

        ``span = (start, end)``: every row lies in ``[start, end)``, so only that slice is merged
        (a block of queries merges in time proportional to its own size).
        """
        if rows.numel() == 0:
            return
        start, end = span if span is not None else (0, self.dists.shape[0])
        merge = merge_distinct if self.distinct else merge_sorted
        d, i = merge(self.dists[start:end], self.indices[start:end], rows - start, dists, cols)
        self.dists[start:end] = d
        self.indices[start:end] = i


def merge_sorted(
    best_d: Tensor, best_i: Tensor, rows: Tensor, dists: Tensor, cols: Tensor
) -> tuple[Tensor, Tensor]:
    """Merge flat candidates ``(rows, dists, cols)`` into the per-row top-k ``best_d``/``best_i``
    ``[R, k]`` (each column at most once per row).

    The candidates are laid out per row in a padded ``[R, W]`` table and sorted by (distance,
    column) (by column and then, stably, by distance where distances tie), whatever the order of
    the candidates, so the result does not depend on the blocks. An empty state (every index ``-1``) is not merged
    in, only padded.
    """
    n_rows, k = best_d.shape
    if rows.numel() == 0:
        return best_d, best_i
    if k == 1:
        return _merge_nearest(best_d, best_i, rows, dists, cols)
    if not bool((best_i[:, 0] < 0).all()):
        base_rows = torch.arange(n_rows, device=rows.device).repeat_interleave(k)
        live = best_i.reshape(-1) >= 0
        rows = torch.cat([base_rows[live], rows])
        dists = torch.cat([best_d.reshape(-1)[live], dists])
        cols = torch.cat([best_i.reshape(-1)[live], cols])
    order = torch.argsort(rows, stable=True)
    counts = torch.bincount(rows, minlength=n_rows)
    starts = torch.cumsum(counts, dim=0) - counts
    width = max(int(counts.max()), k)
    sorted_rows = rows[order]
    slot = torch.arange(rows.numel(), device=rows.device) - starts[sorted_rows]
    unused = torch.iinfo(torch.long).max  # sorts after every real column
    table_d = torch.full((n_rows, width), float("inf"), dtype=dists.dtype, device=rows.device)
    table_c = torch.full((n_rows, width), unused, dtype=torch.long, device=rows.device)
    table_d[sorted_rows, slot] = dists[order]
    table_c[sorted_rows, slot] = cols[order]
    # By (distance, column). Without ties among a row's k + 1 smallest finite distances the
    # order by distance alone is that order (the common case: one sort; the padding is +inf
    # with no column); with ties, by column first, then stably by distance.
    sorted_d, by_dist = torch.sort(table_d, dim=1)
    head = sorted_d[:, : min(k + 1, width)]
    if bool(((head[:, 1:] == head[:, :-1]) & torch.isfinite(head[:, 1:])).any()):
        table_c, by_col = torch.sort(table_c, dim=1, stable=True)
        sorted_d, by_dist = torch.sort(table_d.gather(1, by_col), dim=1, stable=True)
    table_d = sorted_d
    table_c = table_c.gather(1, by_dist)
    out_i = table_c[:, :k]
    return table_d[:, :k].contiguous(), torch.where(out_i == unused, -1, out_i)


def _merge_nearest(
    best_d: Tensor, best_i: Tensor, rows: Tensor, dists: Tensor, cols: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`merge_sorted` for ``k = 1`` without a sort: per row the smallest distance (a
    scatter minimum), then the lowest column among the entries at it (the current one included
    when the row has one)."""
    current_d, current_i = best_d[:, 0], best_i[:, 0]
    dists = dists.to(best_d.dtype)
    d = current_d.clone().scatter_reduce_(0, rows, dists, "amin")
    unused = torch.iinfo(torch.long).max
    keep = (current_i >= 0) & (current_d == d)
    c = torch.where(keep, current_i, unused)
    at_min = dists == d.index_select(0, rows)
    c.scatter_reduce_(0, rows[at_min], cols[at_min], "amin")
    return d[:, None], torch.where(c == unused, -1, c)[:, None]


def merge_distinct(
    best_d: Tensor, best_i: Tensor, rows: Tensor, dists: Tensor, cols: Tensor
) -> tuple[Tensor, Tensor]:
    """Merge candidates ``(rows, dists, cols)`` into per-row top-k over *distinct* ``cols``.

    A column seen twice for a row keeps its smaller distance; ties are broken by the lower column.
    """
    n_rows, k = best_d.shape
    base_rows = torch.arange(n_rows, device=rows.device).repeat_interleave(k)
    all_r = torch.cat([base_rows, rows])
    all_d = torch.cat([best_d.reshape(-1), dists.to(best_d.dtype)])
    all_c = torch.cat([best_i.reshape(-1), cols])
    real = all_c >= 0
    all_r, all_d, all_c = all_r[real], all_d[real], all_c[real]
    # Sort by (row, distance, column); then keep the first occurrence of each (row, column).
    order = torch.argsort(all_c, stable=True)
    order = order[torch.argsort(all_d[order], stable=True)]
    order = order[torch.argsort(all_r[order], stable=True)]
    all_r, all_d, all_c = all_r[order], all_d[order], all_c[order]
    key = all_r * (int(all_c.max()) + 1 if all_c.numel() else 1) + all_c
    key_sorted, key_order = torch.sort(key, stable=True)
    first = torch.ones_like(key_sorted, dtype=torch.bool)
    first[1:] = key_sorted[1:] != key_sorted[:-1]
    keep = torch.zeros_like(first)
    keep[key_order[first]] = True
    all_r, all_d, all_c = all_r[keep], all_d[keep], all_c[keep]
    counts = torch.bincount(all_r, minlength=n_rows)
    starts = torch.cumsum(counts, dim=0) - counts
    rank = torch.arange(all_r.numel(), device=rows.device) - starts[all_r]
    take = rank < k
    out_d = torch.full_like(best_d, float("inf"))
    out_i = torch.full_like(best_i, -1)
    out_d[all_r[take], rank[take]] = all_d[take]
    out_i[all_r[take], rank[take]] = all_c[take]
    return out_d, out_i


def distinct_topk(d: Tensor, i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row of ``[B, W]`` candidates: the k smallest distances over *distinct* indices.

    An index seen several times keeps its smallest distance; ties are broken by the lower index.
    """
    order = torch.argsort(d, dim=1, stable=True)
    d, i = d.gather(1, order), i.gather(1, order)
    order = torch.argsort(i, dim=1, stable=True)  # by index, then by distance within an index
    d, i = d.gather(1, order), i.gather(1, order)
    repeat = torch.zeros_like(i, dtype=torch.bool)
    repeat[:, 1:] = i[:, 1:] == i[:, :-1]
    d = d.masked_fill(repeat, float("inf"))
    order = torch.argsort(d, dim=1, stable=True)[:, :k]  # rows sorted by index: ties -> lower
    return d.gather(1, order), i.gather(1, order)
