r"""Shared exact search for symmetries whose orbit distance is computed pair by pair.

The caller supplies two functions on index ranges / index lists:

* ``screen(qs, qe, ps, pe) -> (lower, upper)``: ``[qe - qs, pe - ps]`` float64 bounds with
  ``lower <= d_G(y_i, z_j)^2 <= upper`` (a cheap approximation plus/minus its rounding error, or a
  true lower bound and a feasible upper bound);
* ``exact(rows, cols) -> [T]`` float64 orbit distances of the listed pairs.

For each block of queries the k smallest ``upper`` bounds :math:`U_k` are tracked over all point
blocks; a pair can be among the k nearest only if ``lower <= U_k``. Surviving candidates are then
evaluated exactly in increasing order of ``lower`` until the k-th exact distance is below the next
candidate's lower bound (branch and bound), so expensive exact evaluations (SVD, Hungarian) run on
few pairs. The result is exact whenever the bounds are valid. Memory is bounded by the block sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Screen = Callable[[int, int, int, int], tuple[Tensor, Tensor]]
Exact = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def bounded_search(
    n: int,
    m: int,
    k: int,
    exclude_self: bool,
    device: torch.device,
    screen: Screen,
    exact: Exact,
    *,
    query_block: int,
    point_block: int,
    first_batch: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k (float64 distances ``[n, k]``, indices ``[n, k]``) from bounds and exact values.

    ``first_batch`` is the number of candidates per row evaluated in the first round (default: all
    survivors, right for tight bounds); later rounds double it.
    """
    out_d = torch.empty(n, k, dtype=torch.float64, device=device)
    out_i = torch.empty(n, k, dtype=torch.long, device=device)
    for qs in range(0, n, query_block):
        qe = min(qs + query_block, n)
        rows = qe - qs
        kth = torch.full((rows, k), float("inf"), dtype=torch.float64, device=device)
        cand: list[tuple[Tensor, Tensor, Tensor]] = []
        n_cand = 0
        for ps in range(0, m, point_block):
            pe = min(ps + point_block, m)
            lower, upper = screen(qs, qe, ps, pe)
            if exclude_self:
                lo, hi = max(qs, ps), min(qe, pe)
                if lo < hi:
                    diag = torch.arange(lo, hi, device=device)
                    lower[diag - qs, diag - ps] = float("inf")
                    upper[diag - qs, diag - ps] = float("inf")
            merged = torch.cat([kth, upper], dim=1)
            kth = merged.topk(k, dim=1, largest=False).values
            keep = lower <= kth[:, -1:]
            r, c = keep.nonzero(as_tuple=True)
            cand.append((r, c + ps, lower[r, c]))
            n_cand += r.numel()
            if n_cand > 64 * rows * k:  # prune with the tighter bound seen so far
                cand = [_prune(cand, kth[:, -1])]
                n_cand = cand[0][0].numel()
        r, c, lb = _prune(cand, kth[:, -1])
        best_d, best_i = _evaluate(r, c, lb, rows, k, qs, exact, first_batch, device)
        out_d[qs:qe] = best_d
        out_i[qs:qe] = best_i
    return out_d, out_i


def _prune(
    cand: list[tuple[Tensor, Tensor, Tensor]], bound: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r = torch.cat([x[0] for x in cand])
    c = torch.cat([x[1] for x in cand])
    lb = torch.cat([x[2] for x in cand])
    keep = lb <= bound[r]
    return r[keep], c[keep], lb[keep]


def _evaluate(
    r: Tensor,
    c: Tensor,
    lb: Tensor,
    rows: int,
    k: int,
    offset: int,
    exact: Exact,
    first_batch: int | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Branch and bound over the candidates of one query block, in increasing lower bound."""
    # Sort by (row, lower bound, column).
    order = torch.argsort(c, stable=True)
    order = order[torch.argsort(lb[order], stable=True)]
    order = order[torch.argsort(r[order], stable=True)]
    r, c, lb = r[order], c[order], lb[order]
    counts = torch.bincount(r, minlength=rows)
    starts = torch.cumsum(counts, dim=0) - counts
    rank = torch.arange(r.numel(), device=device) - starts[r]
    best_d = torch.full((rows, k), float("inf"), dtype=torch.float64, device=device)
    best_i = torch.full((rows, k), -1, dtype=torch.long, device=device)
    done_upto = torch.zeros(rows, dtype=torch.long, device=device)  # candidates evaluated per row
    active = counts > 0
    batch = int(counts.max()) if first_batch is None or r.numel() == 0 else max(first_batch, k)
    while bool(active.any()):
        lo = done_upto[r]
        sel = active[r] & (rank >= lo) & (rank < lo + batch)
        idx = sel.nonzero(as_tuple=True)[0]
        dists = exact(r[idx] + offset, c[idx])
        best_d, best_i = merge_topk(best_d, best_i, r[idx], dists, c[idx])
        done_upto = torch.where(active, done_upto + batch, done_upto).minimum(counts)
        remaining = done_upto < counts
        next_lb = torch.full((rows,), float("inf"), dtype=torch.float64, device=device)
        has = remaining.nonzero(as_tuple=True)[0]
        next_lb[has] = lb[starts[has] + done_upto[has]]
        active = remaining & ~(best_d[:, -1] < next_lb)
        batch *= 2
    return best_d, best_i


def merge_topk(
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
