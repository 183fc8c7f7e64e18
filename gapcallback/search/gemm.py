r"""The plain product: a blocked GEMM screen of squared Euclidean distances.

For queries :math:`x_i` and points :math:`y_j`, :math:`d_{ij} = \lVert x_i - y_j\rVert^2`. The
expansion :math:`\lVert x\rVert^2 + \lVert y\rVert^2 - 2\langle x, y\rangle` turns the search into
a matrix product, but in floating point it is catastrophically inaccurate exactly where
memorization happens (near-duplicates far from the origin) and never gives exact zeros, so here it
only *pre-selects* candidates:

1. both sets are centred on the mean of ``points`` (shrinks the norms, hence the error), and scaled
   by a power of two when the centred magnitudes are extreme (:mod:`.ranges`);
2. for each block of queries and block of points, :math:`a_{ij} = \lVert y_j\rVert^2 - 2\langle
   x_i, y_j\rangle` is formed by one GEMM of the augmented rows :math:`[x_i, 1]` and
   :math:`[-2 y_j, \lVert y_j\rVert^2]` into a reused buffer (the per-row constant
   :math:`\lVert x_i\rVert^2` is omitted);
3. every entry within :math:`2\tau_i` of the running k-th smallest :math:`a_{i\cdot}` is a candidate,
   where :math:`\tau_i = (2D + 16)\,\varepsilon\,(\lVert x_i\rVert^2 + \max_j \lVert y_j\rVert^2)`
   bounds the rounding error of one entry: the standard forward bound of a length-(D+1) dot
   product and of the computed norm give :math:`(1.5D + 1)\,\varepsilon\,(\lVert x_i\rVert^2 +
   \lVert y_j\rVert^2)` (:math:`\varepsilon = 2u`; :math:`(2D + 2)\,\varepsilon` for the symmetric
   operands of a set searched within itself), and the rest covers the rounding of the centred
   inputs (float64 inputs are screened in float32);
4. the candidates' distances are recomputed by direct difference in float64 (:mod:`.recheck`) and
   the k smallest kept, ties broken by the lower index.

Because every true neighbour is provably a candidate, the result is exact. A set searched within
itself (``queries is points``, leave-one-out) uses the symmetric operands
:math:`[x - c, 1, \lVert x - c\rVert^2]` and :math:`[-2 (x - c), \lVert x - c\rVert^2, 1]`, whose
product is the full expanded distance, symmetric in :math:`i, j`: half the GEMM work.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from gapcallback.search.driver import RowBlock, blocked_search
from gapcallback.search.ranges import (
    DistanceRangeError,
    centred_magnitude,
    exact_dtype,
    ldexp,
    screen_exponent,
)
from gapcallback.search.recheck import direct_sq_dists
from gapcallback.utils.checks import check_finite, compute_dtype
from gapcallback.utils.precision import full_precision

__all__ = [
    "DEFAULT_POINT_BLOCK",
    "DEFAULT_QUERY_BLOCK",
    "GemmOperands",
    "GemmProduct",
    "gemm_knn",
    "gemm_operands",
    "same_tensor",
]

DEFAULT_QUERY_BLOCK = 1024
DEFAULT_POINT_BLOCK = 2048


class GemmOperands(NamedTuple):
    r"""Screening operands of centred data (``c`` the centre), in the screen dtype.

    Attributes:
        queries: ``[N, D + 1]`` :math:`[q - c, 1]` (``[N, D + 2]``: :math:`[q - c, 1, \lVert q -
            c\rVert^2]` when symmetric).
        points: ``[M, D + 1]`` :math:`[-2 (x - c), \lVert x - c\rVert^2]` (``[M, D + 2]``: with a
            final column of ones when symmetric).
        query_norms: ``[N]`` :math:`\lVert q - c\rVert^2`.
        point_norms: ``[M]`` :math:`\lVert x - c\rVert^2`.
    """

    queries: Tensor
    points: Tensor
    query_norms: Tensor
    point_norms: Tensor


def gemm_operands(
    q: Tensor, x: Tensor, centre: Tensor, dtype: torch.dtype, symmetric: bool = False
) -> GemmOperands:
    r"""The augmented GEMM operands of :class:`GemmOperands`: their product is
    :math:`a_{ij} = \lVert x_j\rVert^2 - 2\langle q_i, x_j\rangle` in one GEMM, with no separate
    pass adding the norms (the scaling by -2 is exact); with ``symmetric`` (``q`` is ``x``) the
    full expanded distance, symmetric in ``i, j``."""
    n, dim = q.shape
    extra = 2 if symmetric else 1
    q_aug = torch.empty(n, dim + extra, dtype=dtype, device=q.device)
    x_aug = torch.empty(x.shape[0], dim + extra, dtype=dtype, device=x.device)
    torch.sub(q, centre, out=q_aug[:, :dim])
    q_aug[:, dim] = 1.0
    torch.sub(x, centre, out=x_aug[:, :dim])
    q_norms = squared_norms(q_aug[:, :dim])
    x_norms = squared_norms(x_aug[:, :dim])
    x_aug[:, :dim].mul_(-2.0)
    x_aug[:, dim] = x_norms
    if symmetric:
        q_aug[:, dim + 1] = q_norms
        x_aug[:, dim + 1] = 1.0
    return GemmOperands(q_aug, x_aug, q_norms, x_norms)


NORM_CHUNK_ELEMENTS = 1 << 18
"""Values squared at a time by :func:`squared_norms` (1 MiB in float32)."""


def squared_norms(rows: Tensor) -> Tensor:
    """``[N]``: :math:`\\sum_t r_{it}^2` of ``rows`` ``[N, D]``, as ``rows.square().sum(dim=1)``
    (the same bits: each row is reduced alone) but a chunk of rows at a time, so the squares never
    take an ``[N, D]`` temporary: a fresh buffer of that size costs more in page faults (one per
    4 KiB page, 6000 for 8000 x 784) than the arithmetic."""
    if rows.device.type != "cpu":  # no page faults to spare; one kernel
        return rows.square().sum(dim=1)
    out = torch.empty(rows.shape[0], dtype=rows.dtype, device=rows.device)
    chunk = max(1, NORM_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for s in range(0, rows.shape[0], chunk):
        torch.sum(rows[s : s + chunk].square(), dim=1, out=out[s : s + chunk])
    return out


class GemmProduct:
    """The GEMM screen as a :class:`~gapcallback.search.driver.Product`.

    Args:
        operands: from :func:`gemm_operands`.
        slack: ``[N]`` rounding bound of each query row's screened values.
        buffer_size: elements of the one block buffer every product is written into.
    """

    def __init__(self, operands: GemmOperands, slack: Tensor, buffer_size: int) -> None:
        self.operands = operands
        self.slack = slack
        self.buffer = torch.empty(
            buffer_size, dtype=operands.queries.dtype, device=operands.queries.device
        )

    def rows(self, start: int, end: int) -> RowBlock:
        return RowBlock(self.operands.queries[start:end], self.slack[start:end])

    def block(self, rows: RowBlock, start: int, end: int) -> Tensor:
        out = self.buffer[: rows.operands.shape[0] * (end - start)]
        out = out.view(rows.operands.shape[0], end - start)
        torch.mm(rows.operands, self.operands.points[start:end].T, out=out)
        return out


def same_tensor(queries: Tensor, points: Tensor) -> bool:
    """Whether ``queries`` and ``points`` are the same tensor (views of the same memory)."""
    return (
        queries.data_ptr() == points.data_ptr()
        and queries.shape == points.shape
        and queries.stride() == points.stride()
        and queries.dtype == points.dtype
    )


def _all_finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _no_scaling_needed(ops: GemmOperands, dim: int) -> bool:
    r"""Whether the centred magnitudes provably lie in ``2^[-30, 30)`` (no screen scaling).

    The largest entry :math:`t` of the centred data satisfies :math:`\sqrt{\nu / D} \le t \le
    \sqrt{\nu}` for the largest squared norm :math:`\nu`; a factor 2 on each side covers the
    rounding of the computed norms (relative error below :math:`D\,\varepsilon`)."""
    top = float(torch.maximum(ops.query_norms.max(), ops.point_norms.max()))
    if not math.isfinite(top):
        return False
    return 4.0 * 2.0**-62 * dim <= top <= 0.25 * 2.0**60


@torch.no_grad()
def gemm_knn(
    queries: Tensor,
    points: Tensor,
    k: int,
    exclude_self: bool = False,
    query_block: int = DEFAULT_QUERY_BLOCK,
    point_block: int = DEFAULT_POINT_BLOCK,
    *,
    names: tuple[str, str] = ("queries", "points"),
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours by the GEMM screen (module docstring).

    Args:
        queries: ``[N, D]`` validated floating tensor; points ``[M, D]``, same device.
        k: neighbours, ``<= M`` (``M - 1`` with ``exclude_self``).
        exclude_self: leave-one-out of a set within itself (same ``N``); when ``queries`` is
            ``points``, each product block serves both directions.
        query_block, point_block: rows per block.
        names: the user's names of the two sets, for a non-finite input's error.

    Returns:
        ``(sq_dists [N, k], indices [N, k])``: exact squared distances in float64 (float32 on
        MPS), ascending, ties by lower index.

    Raises:
        ValueError: NaN/Inf in an input; :class:`~gapcallback.search.DistanceRangeError` when
            the squared distances overflow.
    """
    dtype = compute_dtype(queries, points)
    exact = exact_dtype(points.device, dtype)
    n, dim = queries.shape
    m = points.shape[0]
    with full_precision(points.device.type):
        q = queries.to(dtype)
        x = points.to(dtype)
        same = exclude_self and same_tensor(queries, points)
        # The centre only moves the screen's origin (any centre gives the same exact result;
        # the slack bounds the rounding of the centred values): the mean in the data's own
        # dtype, ~10x cheaper than accumulating in float64 (24 ms at 8000 x 784).
        centre = x.mean(dim=0)
        # float64 inputs are screened in float32 (twice the GEMM speed) when that is finite; the
        # rounding of the inputs to float32 is inside the slack below, and the re-check is float64.
        screen = torch.float32 if dtype == torch.float64 else dtype
        # Operands of the unscaled data first: their norms bound the centred magnitudes, and
        # when the bounds prove them inside 2^[-30, 30] the power-of-two scaling (see
        # gapcallback.search.ranges) is 0 without a pass over the data to measure them.
        ops = gemm_operands(q, x, centre, screen, same)
        if not _no_scaling_needed(ops, dim):
            # Extreme (or non-finite) magnitudes: measure them, and screen on data scaled by a
            # power of two (exact); the re-check always uses the raw inputs.
            exponent = screen_exponent(centred_magnitude(x, centre), centred_magnitude(q, centre))
            if exponent:
                xs = ldexp(x, exponent)
                qs_ = xs if same else ldexp(q, exponent)
                ops = gemm_operands(qs_, xs, ldexp(centre, exponent), screen, same)
            else:
                xs, qs_ = x, q
            if screen != dtype and not _all_finite(ops.query_norms, ops.point_norms):
                screen = dtype
                ops = gemm_operands(qs_, xs, ldexp(centre, exponent), screen, same)
        # NaN/Inf in an input shows up in the norms: one cheap test instead of a full pass.
        if not _all_finite(ops.query_norms, ops.point_norms):
            check_finite(queries, names[0])
            check_finite(points, names[1])
            raise DistanceRangeError("overflow", dtype, float("inf"))
        eps = torch.finfo(screen).eps
        # Twice a bound on the rounding error of one entry (module docstring), per query row.
        slack = 2.0 * (2 * dim + 16) * eps * (ops.query_norms + ops.point_norms.max())

        def recheck(rows: Tensor, cols: Tensor) -> Tensor:
            return direct_sq_dists(q, x, rows, cols, exact)

        if same:
            block = max(1, int(math.sqrt(query_block * point_block)))
            product = GemmProduct(ops, slack, min(block, n) ** 2)
            row_blocks = [(s, min(s + block, n)) for s in range(0, n, block)]
            best = blocked_search(
                product, recheck, n, m, k, row_blocks=row_blocks, col_block=block,
                dtype=exact, device=points.device, symmetric=True, exclude_diagonal=True,
            )  # fmt: skip
        else:
            product = GemmProduct(ops, slack, min(query_block, n) * min(point_block, m))
            row_blocks = [(s, min(s + query_block, n)) for s in range(0, n, query_block)]
            best = blocked_search(
                product, recheck, n, m, k, row_blocks=row_blocks, col_block=point_block,
                dtype=exact, device=points.device, exclude_diagonal=exclude_self,
            )  # fmt: skip
    return best.dists, best.indices
