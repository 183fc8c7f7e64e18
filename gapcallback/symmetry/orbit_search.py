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
:mod:`gapcallback.symmetry.central_split`: :math:`|G| / 2^r` coset images per query, each screened
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

from gapcallback.search import (
    DEFAULT_QUERY_BLOCK,
    PENDING_PER_ROW,
    KNNResult,
    RowBlock,
    blocked_search,
    distinct_topk,
    exact_search,
)
from gapcallback.symmetry.central_split import central_split, split_orbit_knn
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
    *,
    query_block: int = DEFAULT_QUERY_BLOCK,
    point_block: int | None = None,
    pending_per_row: int = PENDING_PER_ROW,
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
            length :math:`D` each (:mod:`gapcallback.symmetry.central_split`) instead of
            :math:`|G|` images; the result is the same.
        query_block: queries per chunk of the split search.
        point_block, pending_per_row: blocks and candidate cap of the split search
            (:func:`~gapcallback.symmetry.central_split.split_orbit_knn`); tests shrink them to
            exercise the flushes.

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
        d, i = split_orbit_knn(
            queries.reshape(n, dim), x, k_search, split, query_block,
            point_block=point_block, pending_per_row=pending_per_row,
        )  # fmt: skip
        if exclude_self:
            own = torch.arange(n, device=i.device)[:, None]
            d = d.masked_fill(i == own, float("inf"))
        return KNNResult(*distinct_topk(d, i, k))
    chunk = max(1, min(n, STACK_BUDGET // max(1, order * dim)))
    out_d: list[Tensor] = []
    out_i: list[Tensor] = []
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        stacked = images(queries[s:e])  # [G', B, *shape]
        n_img = stacked.shape[0]
        res = exact_search(stacked.reshape(n_img * (e - s), dim), x, k_search)
        d = res.sq_dists.reshape(n_img, e - s, k_search).permute(1, 0, 2).reshape(e - s, -1)
        i = res.indices.reshape(n_img, e - s, k_search).permute(1, 0, 2).reshape(e - s, -1)
        if exclude_self:
            own = torch.arange(s, e, device=i.device)[:, None]
            d = d.masked_fill(i == own, float("inf"))
        d, i = distinct_topk(d, i, k)
        out_d.append(d)
        out_i.append(i)
    return KNNResult(torch.cat(out_d), torch.cat(out_i))


class _BoundsProduct:
    """A pair-by-pair ``screen`` as a :class:`~gapcallback.search.Product` of bounds."""

    def __init__(self, screen: Screen) -> None:
        self.screen = screen

    def rows(self, start: int, end: int) -> RowBlock:
        return RowBlock((start, end), None)

    def block(self, rows: RowBlock, start: int, end: int) -> tuple[Tensor, Tensor]:
        return self.screen(*rows.operands, start, end)


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
    """Exact top-k (float64 distances ``[n, k]``, indices ``[n, k]``) from bounds and exact values,
    by branch and bound on :func:`gapcallback.search.blocked_search` (module docstring).

    ``first_batch`` is the number of candidates per row evaluated in the first round (default: all
    survivors, right for tight bounds); later rounds double it.
    """
    best = blocked_search(
        _BoundsProduct(screen), exact, n, m, k,
        row_blocks=[(s, min(s + query_block, n)) for s in range(0, n, query_block)],
        col_block=point_block, dtype=torch.float64, device=device, evaluate="by_lower_bound",
        exclude_diagonal=exclude_self, distinct=True, first_batch=first_batch,
    )  # fmt: skip
    return best.dists, best.indices
