r"""The one blocked screen-and-recheck loop every exact search runs on.

A search is a *product* (how to screen a block of rows against a block of columns) and an *exact
re-check* (the true distance of listed pairs). The driver walks the blocks, keeps per row a running
bound of the k-th smallest screened value, collects the pairs that may beat it (:mod:`.screen`),
re-checks the survivors exactly and merges them into one :class:`~gapcallback.search.topk.TopK`.
Memory is bounded by the blocks and by a cap on pending candidates per row: never ``N x M``.

Products (:class:`Product`):

* ``rows(start, end) -> RowBlock``: the operands of a block of rows, and ``slack`` ``[rows]``, the
  rounding bound of each row's screened values (``None``: the product returns bounds);
* ``block(row_block, start, end)``: ``[rows, end - start]`` screened values (with ``slack``), or a
  pair ``(lower, upper)`` of bounds on the true distances.

Exact re-checks: ``exact(rows, cols) -> [T]`` distances of pairs (global row and column indices).

Modes:

* ``evaluate="all"``: every surviving candidate is re-checked (cheap exact step: a difference);
* ``evaluate="by_lower_bound"``: branch and bound, for expensive exact steps (an SVD, an
  assignment): candidates are evaluated in increasing lower bound, in doubling batches, until the
  k-th exact distance is below the next lower bound (not with ``symmetric``: a row's candidates
  must arrive by increasing column).
* ``symmetric=True``: rows and columns are the same set and ``block(I, J)`` is symmetric, so only
  blocks ``J >= I`` are formed and each serves the rows of ``I`` and, read by columns, those of
  ``J`` (half the products).
* ``exclude_diagonal=True``: row ``i`` never pairs with column ``i`` (leave-one-out).

The result is exact whenever the screen's bounds are valid: every true neighbour is a candidate,
and the merge sorts by (row, distance, column), so the output does not depend on the blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from gapcallback.search.screen import Candidates, bound_candidates, surviving, tile_candidates
from gapcallback.search.topk import TopK

__all__ = ["PENDING_PER_ROW", "Exact", "Product", "RowBlock", "blocked_search"]

PENDING_PER_ROW = 64
"""Candidates buffered per row before a re-check (or, for bounds, a pruning pass)."""

Exact = Callable[[Tensor, Tensor], Tensor]
"""``exact(rows [T], cols [T]) -> [T]`` exact distances of the listed pairs."""


class RowBlock(NamedTuple):
    """Operands of one block of rows.

    Attributes:
        operands: whatever the product's ``block`` needs for these rows.
        slack: ``[rows]`` rounding bound of the screened values, or ``None`` for a bounds product.
    """

    operands: Any
    slack: Tensor | None


class Product(Protocol):
    """The screen of a search: see the module docstring."""

    def rows(self, start: int, end: int) -> RowBlock: ...

    def block(self, rows: RowBlock, start: int, end: int) -> Tensor | tuple[Tensor, Tensor]: ...


@torch.no_grad()
def blocked_search(
    product: Product,
    exact: Exact,
    n_rows: int,
    n_cols: int,
    k: int,
    *,
    row_blocks: Iterable[tuple[int, int]],
    col_block: int,
    dtype: torch.dtype,
    device: torch.device,
    evaluate: Literal["all", "by_lower_bound"] = "all",
    symmetric: bool = False,
    exclude_diagonal: bool = False,
    distinct: bool = False,
    first_batch: int | None = None,
    pending_per_row: int = PENDING_PER_ROW,
    slack: Tensor | None = None,
) -> TopK:
    """Exact top-k of every row among ``n_cols`` columns.

    Args:
        product: the screen (module docstring).
        exact: the exact re-check.
        n_rows, n_cols: sizes; ``k <= n_cols`` neighbours per row.
        row_blocks: ``(start, end)`` row ranges, in the order they are processed (with
            ``symmetric``, the blocks ``J`` are the same ranges, from ``I`` on).
        col_block: columns per block (with ``symmetric``: the row blocks' size).
        dtype: dtype of the exact distances (float64; float32 on MPS).
        device: device of the result.
        evaluate: ``"all"`` or ``"by_lower_bound"`` (module docstring).
        symmetric: one product per pair of blocks ``J >= I`` (module docstring).
        exclude_diagonal: never pair row ``i`` with column ``i``.
        distinct: merge a column met twice for one row into one entry (:class:`TopK`).
        first_batch: candidates per row evaluated in the first branch-and-bound round (default:
            all survivors); later rounds double it.
        pending_per_row: cap on buffered candidates per row.
        slack: with ``symmetric`` and a product of screened values, ``[n_rows]`` every row's
            slack (a block read by columns needs its columns' slack before their rows are
            formed).

    Returns:
        The :class:`TopK` ``[n_rows, k]`` of exact distances and column indices.
    """
    bounded = evaluate == "by_lower_bound"
    if bounded and symmetric:
        raise ValueError("evaluate='by_lower_bound' needs symmetric=False (module docstring)")
    best = TopK(n_rows, k, dtype, device, distinct=distinct)
    cap_per_row = pending_per_row * (k if bounded else 1)
    row_blocks = list(row_blocks)
    running: Tensor | None = None  # [hi - lo, k] running bounds of the pending span's rows
    pending: list[Candidates] = []
    n_pending = 0
    lo, hi = 0, n_rows

    def flush(final: bool) -> None:
        nonlocal pending, n_pending
        if not pending or running is None:
            pending, n_pending = [], 0
            return
        bound = running.amax(dim=1) + (slacks if slacks is not None else 0.0)
        rows, cols, keys = surviving(pending, bound, lo)  # rows global
        if bounded and not final:  # prune only: exact steps are expensive
            pending, n_pending = [(rows, cols, keys)], rows.numel()
            return
        pending, n_pending = [], 0
        if bounded:
            _branch_and_bound(best, exact, rows - lo, cols, keys, lo, hi, first_batch)
        else:
            best.push(rows, exact(rows, cols), cols, span=(lo, hi))

    slacks: Tensor | None = slack if symmetric else None
    for rs, re in row_blocks:
        row_op = product.rows(rs, re)
        if not symmetric:
            lo, hi = rs, re
            running = None
            slacks = row_op.slack
        elif slacks is None and row_op.slack is not None:
            raise ValueError("a symmetric search of screened values needs every row's `slack`")
        col_ranges = (
            [(s, e) for s, e in row_blocks if s >= rs]
            if symmetric
            else [(cs, min(cs + col_block, n_cols)) for cs in range(0, n_cols, col_block)]
        )
        for cs, ce in col_ranges:
            screened = product.block(row_op, cs, ce)
            lower, upper = screened if isinstance(screened, tuple) else (screened, None)
            if exclude_diagonal:
                d_lo, d_hi = max(rs, cs), min(re, ce)
                if d_lo < d_hi:
                    diag = torch.arange(d_lo, d_hi, device=lower.device)
                    lower[diag - rs, diag - cs] = float("inf")
                    if upper is not None:
                        upper[diag - rs, diag - cs] = float("inf")
            if running is None:
                running = torch.full((hi - lo, k), float("inf"), dtype=lower.dtype, device=device)
            if upper is not None:
                running[rs - lo : re - lo], r, c, v = bound_candidates(
                    lower, upper, running[rs - lo : re - lo]
                )
            else:
                running[rs - lo : re - lo], r, c, v = tile_candidates(
                    lower, running[rs - lo : re - lo], row_op.slack
                )
            if r.numel():
                pending.append((r + rs, c + cs, v))
                n_pending += r.numel()
            if symmetric and cs > rs:
                col_slack = slacks[cs:ce] if slacks is not None else None
                running[cs - lo : ce - lo], r, c, v = tile_candidates(
                    lower, running[cs - lo : ce - lo], col_slack, transposed=True
                )
                pending.append((r + cs, c + rs, v))
                n_pending += r.numel()
            if n_pending > cap_per_row * (hi - lo):  # bound memory on degenerate data
                flush(final=False)
        if not symmetric:
            flush(final=True)
    if symmetric:
        flush(final=True)
    return best


def _branch_and_bound(
    best: TopK,
    exact: Exact,
    r: Tensor,
    c: Tensor,
    lb: Tensor,
    lo: int,
    hi: int,
    first_batch: int | None,
) -> None:
    """Evaluate the candidates ``(r, c, lb)`` (rows local to ``[lo, hi)``) in increasing lower
    bound, merging into ``best``, until each row's k-th exact distance is below its next bound."""
    rows = hi - lo
    device = r.device
    k = best.dists.shape[1]
    # Sort by (row, lower bound, column): each row's candidates arrive by increasing column (the
    # blocks' columns increase and a block's candidates are row-major), so two stable sorts do.
    order = torch.argsort(lb, stable=True)
    order = order.index_select(0, torch.argsort(r.index_select(0, order), stable=True))
    r, c, lb = r.index_select(0, order), c.index_select(0, order), lb.index_select(0, order)
    counts = torch.bincount(r, minlength=rows)
    starts = torch.cumsum(counts, dim=0) - counts
    rank = torch.arange(r.numel(), device=device) - starts[r]
    done_upto = torch.zeros(rows, dtype=torch.long, device=device)  # candidates evaluated per row
    active = counts > 0
    batch = int(counts.max()) if first_batch is None or r.numel() == 0 else max(first_batch, k)
    while bool(active.any()):
        lo_rank = done_upto[r]
        sel = active[r] & (rank >= lo_rank) & (rank < lo_rank + batch)
        idx = sel.nonzero().squeeze(1)
        rows_at, cols_at = r.index_select(0, idx) + lo, c.index_select(0, idx)
        best.push(rows_at, exact(rows_at, cols_at), cols_at, span=(lo, hi))
        done_upto = torch.where(active, done_upto + batch, done_upto).minimum(counts)
        remaining = done_upto < counts
        next_lb = torch.full((rows,), float("inf"), dtype=torch.float64, device=device)
        has = remaining.nonzero(as_tuple=True)[0]
        next_lb[has] = lb[starts[has] + done_upto[has]]
        active = remaining & ~(best.dists[lo:hi, -1] < next_lb)
        batch *= 2
