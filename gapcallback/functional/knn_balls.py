r"""k-NN balls, shared by precision/recall, density/coverage and authenticity: exact and blocked.

Every metric of this family asks, for some query points :math:`q_i` and ball centres :math:`c_j`
with radii :math:`\rho_j`, which balls contain which queries:

.. math:: q_i \in B(c_j, \rho_j) \iff \lVert q_i - c_j\rVert^2 \le \rho_j^2

(closed balls: a query exactly on a sphere is inside; the pairs exactly on a sphere of positive
radius are also counted apart, for density and coverage, whose balls are open with their centre:
:mod:`gapcallback.functional.density_and_coverage`). The radii are k-nearest-neighbour radii
of the centres among their own set (:func:`knn_sq_radii`, the engine's exact leave-one-out search);
:func:`ball_counts` counts, for every query, the balls that contain it.

Method of :func:`ball_counts` (exact, memory bounded by the blocks, never ``N x M``):

1. both sets are centred on the mean of the centres (and scaled by an exact power of two when the
   centred magnitudes are extreme, as the engine's GEMM screen does);
2. for each block of queries and block of centres one GEMM of the augmented rows
   :math:`[q_i, 1, \lVert q_i\rVert^2]` and :math:`[-2 c_j, \lVert c_j\rVert^2, 1]` gives the
   expanded squared distances :math:`e_{ij}` (the engine's symmetric operands), whose rounding
   error is below :math:`\sigma_{ij} = 2 (2D + 16)\,\varepsilon\,(\lVert q_i\rVert^2 +
   \lVert c_j\rVert^2) + (D + 2)\,\text{tiny}`, more than twice the forward bound of the
   length-(D+2) dot product, the computed norms and the rounding of the centred inputs (the last
   term: absolute rounding below the screen dtype's normal range, for points far smaller than the
   largest);
3. memberships are sparse (a point lies in about k balls), so each block is read through its
   minima over tiles of 64 entries: along the queries for the centres' balls (a threshold per
   column, :math:`\rho_j^2`), along the centres for the queries' balls (a threshold per row);
   only tiles whose minimum is within the threshold plus the largest :math:`\sigma` of the tile
   are compared entry by entry;
4. a candidate pair with :math:`e_{ij} \le \rho_j^2 - \sigma_{ij}` is inside, one with
   :math:`e_{ij} > \rho_j^2 + \sigma_{ij}` outside, and the few in between are decided on their
   exact squared distance, recomputed by direct difference in float64
   (:func:`gapcallback.search.direct_sq_dists`, the engine's re-check) against the exact radius.

The exact distances are the engine's own (the same direct difference as the radii), so a duplicate
is at distance exactly ``0`` and a point on another's k-th-neighbour sphere is decided by equality
of the same float64 numbers: identical real and fake sets give the papers' values exactly. Peak
extra memory is one ``[query_block, centre_block]`` block of the screen dtype (8 MiB by default)
and its tile minima, plus ``O((N + M) D)`` for the screen operands; the time is about one GEMM
of the two sets, for both directions at once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from gapcallback.functional.nearest_neighbours import DistanceRangeError, exact_knn
from gapcallback.search import (
    TILE,
    centred_magnitude,
    direct_sq_dists,
    exact_dtype,
    gemm_operands,
    ldexp,
    row_tiles,
    screen_exponent,
)
from gapcallback.utils.checks import (
    check_point_set,
    check_positive_int,
    check_same_device,
    check_same_features,
    compute_dtype,
)
from gapcallback.utils.memory import reused_buffer
from gapcallback.utils.precision import full_precision

__all__ = [
    "BALL_BLOCKS",
    "BallCounts",
    "ball_counts",
    "check_point_sets",
    "fraction",
    "knn_sq_radii",
]

#: ``(query_block, centre_block)`` of :func:`ball_counts` (a 8 MB float32 block). Smaller than the
#: plain search's blocks: a ball's radius is fixed, so wide blocks buy no tighter bound here, only
#: memory.
BALL_BLOCKS = (1024, 2048)


class BallCounts(NamedTuple):
    r"""Result of :func:`ball_counts`: int64 counts of (point, ball) incidences.

    Attributes:
        per_query: ``[Nq]`` the centres' (closed) balls containing each query.
        per_centre: ``[Nc]`` the queries inside each centre's (closed) ball.
        in_query_balls: ``[Nc]`` the queries' balls containing each centre (with
            ``query_sq_radii``; else ``None``).
        per_query_on_sphere: ``[Nq]`` of ``per_query``, the balls on whose sphere the query lies
            exactly (:math:`\lVert q_i - c_j\rVert^2 = \rho_j^2 > 0`): subtracted, the counts of
            the open balls with their centres (density and coverage's convention).
        per_centre_on_sphere: ``[Nc]`` of ``per_centre``, the queries exactly on the sphere.
    """

    per_query: Tensor
    per_centre: Tensor
    in_query_balls: Tensor | None
    per_query_on_sphere: Tensor
    per_centre_on_sphere: Tensor


def check_point_sets(a: object, b: object, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    """Validate two point sets of one space (tensors, float, finite, non-empty, same device and
    per-point shape); return them flattened to ``[N, D]`` and ``[M, D]``."""
    name_a, name_b = names
    a = check_point_set(a, name_a)
    b = check_point_set(b, name_b)
    check_same_device(a, b, name_a, name_b)
    check_same_features(a, b, name_a, name_b)
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)


def knn_sq_radii(points: Tensor, k: int, *, name: str) -> Tensor:
    r"""``[N]`` exact squared k-NN radii: :math:`\rho_k(x_i)^2`, the squared distance from each
    point to its k-th nearest *other* point of the same set (float64; float32 on MPS).

    A duplicate counts as a neighbour at distance 0 (a point repeated more than ``k`` times has
    radius 0). ``k`` must be at most ``N - 1``; the error names ``name`` and ``k``.
    """
    k = check_positive_int(k, "k")
    points = check_point_set(points, name)
    res = exact_knn(points, points, k, exclude_self=True, names=(name, name))
    return res.sq_dists[:, k - 1]


@torch.no_grad()
def ball_counts(
    queries: Tensor,
    centres: Tensor,
    sq_radii: Tensor,
    *,
    query_sq_radii: Tensor | None = None,
    names: tuple[str, str] = ("queries", "centres"),
    block_size: tuple[int, int] | None = None,
) -> BallCounts:
    r"""Which closed balls contain which points, counted both ways, in one blocked pass.

    .. math:: \text{per\_query}_i = \#\{j : \lVert q_i - c_j\rVert^2 \le \rho_j^2\}, \qquad
        \text{per\_centre}_j = \#\{i : \lVert q_i - c_j\rVert^2 \le \rho_j^2\}, \qquad
        \text{in\_query\_balls}_j = \#\{i : \lVert q_i - c_j\rVert^2 \le r_i^2\}

    with :math:`\rho_j^2` = ``sq_radii`` and, optionally, :math:`r_i^2` = ``query_sq_radii`` (the
    balls around the queries: recall's test, from the same products). Exact (module docstring).
    The pairs exactly on a centre's sphere are counted apart as well
    (:attr:`BallCounts.per_query_on_sphere`, :attr:`BallCounts.per_centre_on_sphere`), so the
    same pass serves the open-ball convention of density and coverage.

    Args:
        queries: ``[Nq, D]`` (or ``[Nq, *dims]``) points.
        centres: ``[Nc, D]`` points of the same per-point shape and device.
        sq_radii: ``[Nc]`` squared radii of the balls around the centres, exact (e.g. from
            :func:`knn_sq_radii`), finite and non-negative.
        query_sq_radii: ``[Nq]`` squared radii of balls around the queries, or ``None``.
        names: the user's names of the two sets, for error messages.
        block_size: ``(query_block, centre_block)``; default :data:`BALL_BLOCKS`.

    Returns:
        :class:`BallCounts`, int64.
    """
    name_q, name_c = names
    queries, centres = check_point_sets(queries, centres, names)
    n, dim = queries.shape
    m = centres.shape[0]
    for radii_, size, name in ((sq_radii, m, name_c), (query_sq_radii, n, name_q)):
        if radii_ is not None and radii_.shape != (size,):
            raise ValueError(
                f"the radii of `{name}` must have shape [{size}] (one per point), got "
                f"{tuple(radii_.shape)}."
            )
    q_block, c_block = block_size or BALL_BLOCKS
    dtype = compute_dtype(queries, centres)
    exact = exact_dtype(centres.device, dtype)
    # The inputs as the engine re-checks them (fp16/bf16 promoted), so that distances here and in
    # the radii are the same float64 numbers.
    q = queries.to(dtype)
    c = centres.to(dtype)
    device = c.device
    c_radii = sq_radii.to(device=device, dtype=exact)
    q_radii = None if query_sq_radii is None else query_sq_radii.to(device=device, dtype=exact)
    per_query = torch.zeros(n, dtype=torch.long, device=device)
    per_centre = torch.zeros(m, dtype=torch.long, device=device)
    query_on_sphere = torch.zeros(n, dtype=torch.long, device=device)
    centre_on_sphere = torch.zeros(m, dtype=torch.long, device=device)
    in_query_balls = None if q_radii is None else torch.zeros(m, dtype=torch.long, device=device)
    with full_precision(device.type):
        centre = (c.sum(dim=0, dtype=exact) / m).to(dtype)
        screen = torch.float32 if dtype == torch.float64 else dtype
        ops = gemm_operands(
            q, c, centre, screen, symmetric=True, query_block=q_block
        )  # full distances
        exponent = 0
        # The largest centred entry t satisfies sqrt(top / D) <= t <= sqrt(top) (top: the largest
        # squared norm): when both ends need no scaling, neither does t, and no pass measures it.
        # (top = 0 may be an underflow of the screen dtype: measured.)
        top = float(torch.maximum(ops.query_norms.max(), ops.point_norms.max()))
        if not (0.0 < top < math.inf and screen_exponent(math.sqrt(top)) == 0
                and screen_exponent(math.sqrt(top / dim)) == 0):  # fmt: skip
            exponent = screen_exponent(centred_magnitude(c, centre), centred_magnitude(q, centre))
            if exponent:
                ops = gemm_operands(ldexp(q, exponent), ldexp(c, exponent), ldexp(centre, exponent),
                                    screen, symmetric=True, query_block=q_block)  # fmt: skip
        qn, cn = ops.query_norms.to(exact), ops.point_norms.to(exact)
        info = torch.finfo(screen)
        factor = 2.0 * (2 * dim + 16) * info.eps
        # Below the screen dtype's normal range rounding errors are absolute (points far smaller
        # than the largest, which the scaling brings near 1): a floor covers them.
        floor = (dim + 2) * info.tiny
        c_thr = ldexp(c_radii, 2 * exponent) if exponent else c_radii  # exact: a power of 2
        # Screen bounds (the module docstring's sigma, with its largest norm, and the rounding of
        # the bound itself): no entry above them is inside.
        c_bound = (c_thr + factor * (qn.max() + cn + c_thr) + floor).to(screen)
        if q_radii is not None:
            q_thr = ldexp(q_radii, 2 * exponent) if exponent else q_radii
            q_bound = (q_thr + factor * (qn + cn.max() + q_thr) + floor).to(screen)

        def decide(block: Tensor, r: Tensor, col: Tensor, thr: Tensor, radii: Tensor,
                   by_row: bool, q_idx: Tensor, c_idx: Tensor) -> tuple[Tensor, Tensor]:  # fmt: skip
            """Masks of the candidate pairs inside the closed ball (sure by the screen, else
            exactly) and of those exactly on its sphere (radius > 0: always decided exactly, as
            the screen's error bound ``sigma`` is strict)."""
            value = block[r, col].to(exact)
            limit = thr[q_idx] if by_row else thr[c_idx]
            sigma = factor * (qn[q_idx] + cn[c_idx]) + floor
            inside = value <= limit - sigma
            on_sphere = torch.zeros_like(inside)
            unsure = ~inside & (value <= limit + sigma)
            if bool(unsure.any()):
                try:
                    d = direct_sq_dists(q, c, q_idx[unsure], c_idx[unsure], exact)
                except DistanceRangeError as err:
                    raise ValueError(err.message((name_q, name_c))) from None
                radius = radii[q_idx[unsure]] if by_row else radii[c_idx[unsure]]
                inside[unsure] = d <= radius
                on_sphere[unsure] = (d == radius) & (radius > 0)
            return inside, on_sphere

        # The product block is lent for the count and kept for the next one (no page faults).
        with reused_buffer(min(q_block, n) * min(c_block, m), screen, device) as buffer:
            for qs in range(0, n, q_block):
                qe = min(qs + q_block, n)
                rows = ops.queries.rows(qs, qe)
                for cs in range(0, m, c_block):
                    ce = min(cs + c_block, m)
                    block = buffer[: (qe - qs) * (ce - cs)].view(qe - qs, ce - cs)
                    torch.mm(rows, ops.points[cs:ce].T, out=block)
                    # Queries in the centres' balls: a threshold per column.
                    r, col = _entries_at_most(block, c_bound[cs:ce], by_column=True)
                    if r.numel():
                        q_idx, c_idx = r + qs, col + cs
                        hit, edge = decide(block, r, col, c_thr, c_radii, False, q_idx, c_idx)
                        ones = torch.ones_like(q_idx[hit])
                        per_query.index_add_(0, q_idx[hit], ones)
                        per_centre.index_add_(0, c_idx[hit], ones)
                        if bool(edge.any()):
                            ones = torch.ones_like(q_idx[edge])
                            query_on_sphere.index_add_(0, q_idx[edge], ones)
                            centre_on_sphere.index_add_(0, c_idx[edge], ones)
                    if q_radii is None or in_query_balls is None:
                        continue
                    # Centres in the queries' balls: a threshold per row.
                    r, col = _entries_at_most(block, q_bound[qs:qe])
                    if r.numel():
                        q_idx, c_idx = r + qs, col + cs
                        hit, _ = decide(block, r, col, q_thr, q_radii, True, q_idx, c_idx)
                        in_query_balls.index_add_(0, c_idx[hit], torch.ones_like(c_idx[hit]))
    return BallCounts(per_query, per_centre, in_query_balls, query_on_sphere, centre_on_sphere)


def _entries_at_most(
    block: Tensor, bound: Tensor, *, by_column: bool = False
) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` of the entries of ``block`` ``[R, W]`` at most ``bound[row]`` ``[R]``
    (``by_column``: at most ``bound[col]`` ``[W]``).

    Ball memberships are sparse (a point lies in about k balls), so the block is read once through
    its minima over tiles of :data:`~gapcallback.search.TILE` entries along the bound's other axis
    (a vectorised reduction, several times cheaper than an elementwise comparison), and only the
    tiles whose minimum passes are compared entry by entry."""
    rows, width = block.shape
    along = rows if by_column else width
    n_full = along // TILE
    found_r, found_c = [], []
    if n_full and by_column:
        tiles = block[: n_full * TILE].view(n_full, TILE, width)
        hit_t, hit_c = (tiles.amin(dim=1) <= bound[None, :]).nonzero(as_tuple=True)
        kt, kr = (tiles[hit_t, :, hit_c] <= bound[hit_c, None]).nonzero(as_tuple=True)
        found_r.append(hit_t[kt] * TILE + kr)
        found_c.append(hit_c[kt])
    elif n_full:
        tiles = block[:, : n_full * TILE].view(rows, n_full, TILE)
        hit_r, hit_t = (tiles.amin(dim=2) <= bound[:, None]).nonzero(as_tuple=True)
        hit_tiles = row_tiles(block, TILE, hit_r, hit_t)
        kr, kc = (hit_tiles <= bound[hit_r, None]).nonzero(as_tuple=True)
        found_r.append(hit_r[kr])
        found_c.append(hit_t[kr] * TILE + kc)
    if along > n_full * TILE:
        rest = n_full * TILE
        if by_column:
            kr, kc = (block[rest:] <= bound[None, :]).nonzero(as_tuple=True)
            found_r.append(kr + rest)
            found_c.append(kc)
        else:
            kr, kc = (block[:, rest:] <= bound[:, None]).nonzero(as_tuple=True)
            found_r.append(kr)
            found_c.append(kc + rest)
    if len(found_r) == 1:
        return found_r[0], found_c[0]
    return torch.cat(found_r), torch.cat(found_c)


def fraction(count: Tensor | int, total: Tensor | int, dtype: torch.dtype) -> Tensor:
    """0-dim ``count / total`` computed in float64 and returned in ``dtype``."""
    count = torch.as_tensor(count, dtype=torch.float64)
    total = torch.as_tensor(total, dtype=torch.float64, device=count.device)
    return (count / total).to(dtype)
