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
from gapcallback.utils.memory import empty_buffer, reused_buffer
from gapcallback.utils.precision import full_precision

__all__ = [
    "DEFAULT_POINT_BLOCK",
    "DEFAULT_QUERY_BLOCK",
    "NARROW_BLOCKS",
    "NARROW_BLOCKS_UP_TO_DIM",
    "CentredRows",
    "GemmOperands",
    "GemmProduct",
    "centred_squared_norms",
    "default_blocks",
    "gemm_knn",
    "gemm_operands",
    "same_tensor",
]

DEFAULT_QUERY_BLOCK = 2048
DEFAULT_POINT_BLOCK = 4096
"""Rows per block of the plain search above :data:`NARROW_BLOCKS_UP_TO_DIM` (a 32 MB float32
block). Wide point blocks leave fewer column blocks per row block, so fewer running bounds are
still loose when a block is screened (at N = M = 8000, D = 784 the whole search went from
1.16-1.2x to 1.14x the bare blocked GEMM of its blocks, whose own speed barely depends on them;
``benchmarks/gemm_floor.py``)."""

NARROW_BLOCKS = (1024, 2048)
NARROW_BLOCKS_UP_TO_DIM = 64
"""Up to this dimension the plain search uses :data:`NARROW_BLOCKS` (an 8 MB block): there the
product is cheap beside writing and reading its block, which a smaller block keeps in cache
(N = M = 20000, D = 64: 0.85x the time of 2048 x 4096 blocks; D = 32: 0.95x; from D = 96 the wide
blocks are faster: 0.96x at D = 96, 0.89x at D = 256; medians of 7 alternating runs)."""


def default_blocks(dim: int) -> tuple[int, int]:
    """``(query_block, point_block)`` of the plain search of ``dim``-dimensional points."""
    if dim <= NARROW_BLOCKS_UP_TO_DIM:
        return NARROW_BLOCKS
    return DEFAULT_QUERY_BLOCK, DEFAULT_POINT_BLOCK


class CentredRows:
    r"""The screen's query rows :math:`[q_i - c, 1]` (symmetric: :math:`[q_i - c, 1, \lVert q_i -
    c\rVert^2]`) in the screen dtype, built a block of rows at a time into one reused buffer.

    Never ``[N, D + 1]`` at once: a fresh buffer of that size costs more in page faults (one per
    4 KiB page) than its arithmetic, and a block is used once, right after it is built.

    Args:
        q: ``[N, D]`` queries (data dtype); ``centre`` ``[D]``.
        dtype: the screen dtype.
        norms: ``[N]`` :math:`\lVert q_i - c\rVert^2`, the last column of symmetric operands
            (``None``: not symmetric).
        max_rows: the largest block :meth:`rows` is asked for (the buffer's rows).
    """

    def __init__(
        self, q: Tensor, centre: Tensor, dtype: torch.dtype, norms: Tensor | None, max_rows: int
    ) -> None:
        self.q, self.centre, self.norms = q, centre, norms
        n, dim = q.shape
        self.buffer = empty_buffer(
            (min(max_rows, n), dim + (1 if norms is None else 2)), dtype, q.device
        )
        self.buffer[:, dim] = 1.0

    def rows(self, start: int, end: int) -> Tensor:
        """``[end - start, D + 1]`` (or ``D + 2``) rows ``start:end``, valid until the next call."""
        dim = self.q.shape[1]
        out = self.buffer[: end - start]
        torch.sub(self.q[start:end], self.centre, out=out[:, :dim])
        if self.norms is not None:
            out[:, dim + 1] = self.norms[start:end]
        return out


class GemmOperands(NamedTuple):
    r"""Screening operands of centred data (``c`` the centre), in the screen dtype.

    Attributes:
        queries: :class:`CentredRows`: blocks of :math:`[q - c, 1]` (:math:`[q - c, 1, \lVert q -
            c\rVert^2]` when symmetric), ``[rows, D + 1]`` (``[rows, D + 2]``).
        points: ``[M, D + 1]`` :math:`[-2 (x - c), \lVert x - c\rVert^2]` (``[M, D + 2]``: with a
            final column of ones when symmetric).
        query_norms: ``[N]`` :math:`\lVert q - c\rVert^2`.
        point_norms: ``[M]`` :math:`\lVert x - c\rVert^2`.
    """

    queries: CentredRows
    points: Tensor
    query_norms: Tensor
    point_norms: Tensor


def gemm_operands(
    q: Tensor,
    x: Tensor,
    centre: Tensor,
    dtype: torch.dtype,
    symmetric: bool = False,
    *,
    query_block: int = DEFAULT_QUERY_BLOCK,
) -> GemmOperands:
    r"""The augmented GEMM operands of :class:`GemmOperands`: their product is
    :math:`a_{ij} = \lVert x_j\rVert^2 - 2\langle q_i, x_j\rangle` in one GEMM, with no separate
    pass adding the norms (the scaling by -2 is exact); with ``symmetric`` (``q`` is ``x``) the
    full expanded distance, symmetric in ``i, j``. The query rows are built ``query_block`` at a
    time (:class:`CentredRows`).

    The points' rows are formed in one pass as :math:`2c - 2x`, which rounds to exactly
    :math:`-2\,\mathrm{fl}(x - c)` (rounding commutes with the power-of-two scaling), and their
    squared norms are a quarter of those rows' (exactly: every square and partial sum is scaled
    by 4)."""
    dim = q.shape[1]
    extra = 2 if symmetric else 1
    x_aug = empty_buffer((x.shape[0], dim + extra), dtype, x.device)
    x_norms = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    two_c = centre * 2.0
    for s, e in _row_chunks(x):  # each chunk's norms while it is in cache
        torch.add(two_c, x[s:e], alpha=-2.0, out=x_aug[s:e, :dim])
        torch.sum(x_aug[s:e, :dim].square(), dim=1, out=x_norms[s:e])
    x_norms.mul_(0.25)
    q_norms = x_norms if q is x else centred_squared_norms(q, centre, dtype)
    x_aug[:, dim] = x_norms
    if symmetric:
        x_aug[:, dim + 1] = 1.0
    queries = CentredRows(q, centre, dtype, q_norms if symmetric else None, query_block)
    return GemmOperands(queries, x_aug, q_norms, x_norms)


CENTRE_ROWS = 1024
"""Points (evenly spaced) whose mean is the screen's centre: near the data, as the error bound
wants, for a fraction of a pass over it."""

NORM_CHUNK_ELEMENTS = 1 << 18
"""Values squared at a time on CPU (1 MiB in float32): the squares never take an ``[N, D]``
temporary, which costs more in page faults (one per 4 KiB page, 6000 for 8000 x 784) than the
arithmetic, and each chunk is reduced while it is in cache."""


def _row_chunks(rows: Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` chunks of the rows of ``rows`` ``[N, D]``: of :data:`NORM_CHUNK_ELEMENTS`
    values on CPU, one chunk elsewhere (no page faults to spare; one kernel each)."""
    n, dim = rows.shape
    if rows.device.type != "cpu":
        return [(0, n)]
    chunk = max(1, NORM_CHUNK_ELEMENTS // max(1, dim))
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def centred_squared_norms(rows: Tensor, centre: Tensor, dtype: torch.dtype) -> Tensor:
    """``[N]``: :math:`\\lVert r_i - c\\rVert^2` of ``rows`` ``[N, D]`` as the screen sees them:
    the centred rows rounded to ``dtype``, squared and summed in ``dtype`` (each row reduced
    alone: the bits of ``(rows - c).to(dtype).square().sum(1)``), a chunk of rows at a time
    through one reused buffer (the centred rows are never stored)."""
    n, dim = rows.shape
    out = torch.empty(n, dtype=dtype, device=rows.device)
    chunks = _row_chunks(rows)
    work = torch.empty(chunks[0][1] if chunks else 0, dim, dtype=dtype, device=rows.device)
    for s, e in chunks:
        part = work[: e - s]
        torch.sub(rows[s:e], centre, out=part)
        torch.sum(part.square_(), dim=1, out=out[s:e])
    return out


class GemmProduct:
    """The GEMM screen as a :class:`~gapcallback.search.driver.Product`.

    Args:
        operands: from :func:`gemm_operands`.
        slack: ``[N]`` rounding bound of each query row's screened values.
        buffer: ``[S]`` the one block buffer every product is written into (the screen dtype, at
            least as many elements as the largest block), e.g. from
            :func:`~gapcallback.utils.memory.reused_buffer`.
    """

    def __init__(self, operands: GemmOperands, slack: Tensor, buffer: Tensor) -> None:
        self.operands = operands
        self.slack = slack
        self.buffer = buffer

    def rows(self, start: int, end: int) -> RowBlock:
        return RowBlock(self.operands.queries.rows(start, end), self.slack[start:end])

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
    rounding of the computed norms (relative error below :math:`D\,\varepsilon`). False when a
    norm is NaN or infinite (the maximum propagates NaN): True proves every norm finite."""
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
    query_block: int | None = None,
    point_block: int | None = None,
    *,
    names: tuple[str, str] = ("queries", "points"),
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours by the GEMM screen (module docstring).

    Args:
        queries: ``[N, D]`` validated floating tensor; points ``[M, D]``, same device.
        k: neighbours, ``<= M`` (``M - 1`` with ``exclude_self``).
        exclude_self: leave-one-out of a set within itself (same ``N``); when ``queries`` is
            ``points``, each product block serves both directions.
        query_block, point_block: rows per block (default: :func:`default_blocks` of ``D``).
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
    default_query_block, default_point_block = default_blocks(dim)
    query_block = query_block or default_query_block
    point_block = point_block or default_point_block
    with full_precision(points.device.type):
        q = queries.to(dtype)
        x = points.to(dtype)
        same = exclude_self and same_tensor(queries, points)
        # Rows per block: a symmetric self-search multiplies square blocks.
        row_block = max(1, int(math.sqrt(query_block * point_block))) if same else query_block
        # The centre only moves the screen's origin (any centre gives the same exact result;
        # the slack bounds the rounding of the centred values): the mean of at most
        # CENTRE_ROWS evenly spaced points, in the data's own dtype (a pass over all of them
        # costs 4 ms at 8000 x 784; accumulating in float64, 24 ms).
        centre = x[:: max(1, m // CENTRE_ROWS)].mean(dim=0)
        # float64 inputs are screened in float32 (twice the GEMM speed) when that is finite; the
        # rounding of the inputs to float32 is inside the slack below, and the re-check is float64.
        screen = torch.float32 if dtype == torch.float64 else dtype
        # Operands of the unscaled data first: their norms bound the centred magnitudes, and
        # when the bounds prove them inside 2^[-30, 30] the power-of-two scaling (see
        # gapcallback.search.ranges) is 0 without a pass over the data to measure them.
        ops = gemm_operands(q, x, centre, screen, same, query_block=row_block)
        if not _no_scaling_needed(ops, dim):
            # Extreme (or non-finite) magnitudes: measure them, and screen on data scaled by a
            # power of two (exact); the re-check always uses the raw inputs.
            exponent = screen_exponent(centred_magnitude(x, centre), centred_magnitude(q, centre))
            if exponent:
                xs = ldexp(x, exponent)
                qs_ = xs if same else ldexp(q, exponent)
                ops = gemm_operands(
                    qs_, xs, ldexp(centre, exponent), screen, same, query_block=row_block
                )
            else:
                xs, qs_ = x, q
            if screen != dtype and not _all_finite(ops.query_norms, ops.point_norms):
                screen = dtype
                ops = gemm_operands(
                    qs_, xs, ldexp(centre, exponent), screen, same, query_block=row_block
                )
            # NaN/Inf in an input shows up in the norms: one cheap test instead of a full
            # pass (where no scaling is needed the largest norm is finite, and so are all).
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
            row_blocks = [(s, min(s + row_block, n)) for s in range(0, n, row_block)]
            col_block, block_elements = row_block, min(row_block, n) ** 2
        else:
            row_blocks = [(s, min(s + query_block, n)) for s in range(0, n, query_block)]
            col_block, block_elements = point_block, min(query_block, n) * min(point_block, m)
        # The product block is lent for the search and kept for the next one (no page faults).
        with reused_buffer(block_elements, screen, points.device) as buffer:
            best = blocked_search(
                GemmProduct(ops, slack, buffer), recheck, n, m, k, row_blocks=row_blocks,
                col_block=col_block, dtype=exact, device=points.device, symmetric=same,
                exclude_diagonal=exclude_self, slack=slack if same else None,
            )  # fmt: skip
    return best.dists, best.indices
