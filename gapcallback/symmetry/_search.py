r"""Shared exact searches for the symmetries.

Finite groups (:func:`stacked_orbit_knn`)
-----------------------------------------
For a finite group :math:`G` of isometries, :math:`\min_g \lVert y - g z\rVert =
\min_g \lVert g^{-1} y - z\rVert = \min_g \lVert g y - z\rVert`, so the orbit kNN is one plain
exact search (:func:`gapcallback.functional.nearest_neighbours._knn_exact`: blocked GEMM screen, exact re-check by
direct difference) of the stacked query orbit :math:`[\,g_1 Q; \dots; g_{|G|} Q\,]` against the
untouched points, followed by a minimum over :math:`g` per point index. The GEMM work is exactly
:math:`|G|` times the plain search's; the centring, norms and re-check of the points are shared by all
group elements, and the queries are processed in chunks so the stacked orbit stays within a fixed
memory budget (never :math:`N \times M \times |G|`). Groups of coordinate permutations with central
involutions (``permutations=``) take the cheaper split search of
:mod:`gapcallback.symmetry._central_split`: :math:`|G| / 2^r` coset images per query, each screened
against all :math:`2^r` images of the involution subgroup by one GEMM of length :math:`D`.

Pair-by-pair bounds (:func:`bounded_search`)
--------------------------------------------
For groups whose orbit distance is computed pair by pair, the caller supplies two functions on
index ranges / index lists:

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

from gapcallback.functional.nearest_neighbours import (
    _DEFAULT_POINT_BLOCK,
    _DEFAULT_QUERY_BLOCK,
    KNNResult,
    _knn_exact,
)
from gapcallback.symmetry._central_split import central_split, split_orbit_knn
from gapcallback.utils.checks import compute_dtype

#: Elements of one stacked chunk of query images ``[|G| * B, D]`` (32 MiB in float32).
STACK_BUDGET = 1 << 23

Screen = Callable[[int, int, int, int], tuple[Tensor, Tensor]]
Exact = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def stacked_orbit_knn(
    queries: Tensor,
    points: Tensor,
    k: int,
    exclude_self: bool,
    images: Callable[[Tensor], Tensor],
    order: int,
    permutations: Tensor | None = None,
) -> KNNResult:
    r"""Exact orbit kNN of a finite *group* by one plain search of the stacked query orbit.

    Args:
        queries: ``[N, *shape]``.
        points: ``[M, *shape]``.
        k: neighbours per query (distinct points, not distinct group elements).
        exclude_self: leave-one-out (``queries`` is ``points``): the orbit of point ``i`` is never a
            neighbour of query ``i``.
        images: maps a chunk ``[B, *shape]`` to its orbit ``[G', B, *shape]`` (``G' <= order``;
            elements acting as the identity on the chunk may be left out). The elements must form a
            group (closed under composition and inverses), so that transforming the queries
            instead of the points gives the same orbit distance.
        order: :math:`|G|`, to size the chunks.
        permutations: optional ``[|G|, D]`` long, the group as permutations of the flattened
            coordinates (``(g z)_t = z[permutations[g, t]]``). When the group has central
            involutions, the search screens :math:`|G| / 2^r` coset images per query with one GEMM of
            length :math:`D` each (:mod:`gapcallback.symmetry._central_split`) instead of
            :math:`|G|` images; the result is the same.

    Returns:
        :class:`KNNResult` with exact squared orbit distances ``[N, k]`` (float64; float32 on MPS;
        ascending, ties: lower index). The caller casts them (``functional.nearest_neighbours.output_sq_dists``).

    Exactness: if point :math:`j` is among the k nearest in orbit distance, attained at :math:`g^*`,
    every point ranked before :math:`j` for the query :math:`g^* y` is also ranked before it in orbit
    distance, so :math:`j` is among the k nearest of :math:`g^* y` (``k + 1`` with ``exclude_self``,
    where the query's own index is dropped afterwards) with its exact distance.
    """
    if compute_dtype(queries, points) == torch.float64:
        # One dtype for the orbit and the points: transform float32 queries in float64 too.
        queries, points = queries.double(), points.double()
    n = queries.shape[0]
    m = points.shape[0]
    dim = points[0].numel()
    x = points.reshape(m, dim)
    k_search = min(m, k + 1) if exclude_self else k
    split = central_split(permutations) if permutations is not None else None
    if split is not None:
        d, i = split_orbit_knn(queries.reshape(n, dim), x, k_search, split, _DEFAULT_QUERY_BLOCK)
        if exclude_self:
            own = torch.arange(n, device=i.device)[:, None]
            d = d.masked_fill(i == own, float("inf"))
        return KNNResult(*_distinct_topk(d, i, k))
    chunk = max(1, min(n, STACK_BUDGET // max(1, order * dim)))
    out_d: list[Tensor] = []
    out_i: list[Tensor] = []
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        stacked = images(queries[s:e])  # [G', B, *shape]
        n_img = stacked.shape[0]
        res = _knn_exact(
            stacked.reshape(n_img * (e - s), dim),
            x,
            k_search,
            False,
            _DEFAULT_QUERY_BLOCK,
            _DEFAULT_POINT_BLOCK,
        )
        d = res.sq_dists.reshape(n_img, e - s, k_search).permute(1, 0, 2).reshape(e - s, -1)
        i = res.indices.reshape(n_img, e - s, k_search).permute(1, 0, 2).reshape(e - s, -1)
        if exclude_self:
            own = torch.arange(s, e, device=i.device)[:, None]
            d = d.masked_fill(i == own, float("inf"))
        d, i = _distinct_topk(d, i, k)
        out_d.append(d)
        out_i.append(i)
    return KNNResult(torch.cat(out_d), torch.cat(out_i))


def _distinct_topk(d: Tensor, i: Tensor, k: int) -> tuple[Tensor, Tensor]:
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
