r"""Exact k-nearest-neighbour search: blocked GEMM pre-selection, exact re-check of the winners.

For queries :math:`x_i` and points :math:`y_j` the squared Euclidean distance is

.. math:: d_{ij} = \lVert x_i - y_j \rVert^2 .

The expansion :math:`\lVert x\rVert^2 + \lVert y\rVert^2 - 2\langle x, y\rangle` turns the search into a
matrix product, but in floating point it is catastrophically inaccurate exactly where memorization
happens (near-duplicates far from the origin), and it never gives exact zeros. Here it only
*pre-selects* candidates:

1. both sets are centred on the mean of ``points`` (shrinks the norms, hence the error);
2. for each block of queries and block of points, :math:`a_{ij} = \lVert y_j\rVert^2 - 2\langle x_i,
   y_j\rangle` is formed by one GEMM of the augmented rows :math:`[x_i, 1]` and
   :math:`[-2 y_j, \lVert y_j\rVert^2]` into a reused buffer (the per-row constant
   :math:`\lVert x_i\rVert^2` is omitted);
3. every entry within :math:`2\tau_i` of the running k-th smallest :math:`a_{i\cdot}` is a candidate,
   where :math:`\tau_i = (2D + 16)\,\varepsilon\,(\lVert x_i\rVert^2 + \max_j \lVert y_j\rVert^2)`
   bounds the rounding error of one entry: the standard forward bound of a length-(D+1) dot
   product and of the computed norm give :math:`(1.5D + 1)\,\varepsilon\,(\lVert x_i\rVert^2 +
   \lVert y_j\rVert^2)` (:math:`\varepsilon = 2u`; :math:`(2D + 2)\,\varepsilon` for the symmetric
   operands of a set searched within itself), and the rest covers the rounding of the centred
   inputs (float64 inputs are screened in float32);
4. the candidates' distances are recomputed by direct difference in float64 (float32 where the device
   has no float64) and the k smallest kept, ties broken by the lower index.

Because every true neighbour is provably a candidate, the result is exact: duplicates give exactly
``0`` and near-duplicates are as accurate as the direct difference. Memory is bounded by the block
sizes, never ``N x M``. Matmuls run in IEEE fp32/fp64 with autocast disabled, whatever the user's
``float32_matmul_precision``.

Range. The screen works on centred data scaled by a power of two (exact) whenever the centred
magnitudes leave :math:`[2^{-30}, 2^{30}]`, so that its products neither overflow nor fall into
the subnormal range where rounding errors are absolute and the slack above no longer bounds them:
data at any scale that the exact re-check can represent is searched exactly. The result is cast
to the output dtype by one rule shared by every search (plain or with ``symmetry=``,
:func:`output_sq_dists`): a squared distance too large for it is a ``ValueError`` (rescale the data
or pass float64), and where a non-zero squared distance is below its smallest normal number
(float32: :math:`1.2 \cdot 10^{-38}`, i.e. fp32 data at scales below about :math:`10^{-19}`), which
the cast would flush to zero or store with reduced precision, the exact float64 distances are
returned instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from gapcallback.utils.checks import (
    check_finite,
    check_point_set,
    check_positive_int,
    check_same_device,
    check_same_features,
    compute_dtype,
)
from gapcallback.utils.precision import full_precision

if TYPE_CHECKING:
    from gapcallback.symmetry.base import Symmetry

__all__ = ["KNNResult", "knn", "output_sq_dists"]

_DEFAULT_QUERY_BLOCK = 1024
_DEFAULT_POINT_BLOCK = 2048
_TILE = 64  # columns per tile whose minimum screens for candidates
_PENDING_PER_ROW = 64  # candidates buffered per query row before an exact re-check
_RECHECK_ELEMENTS = 1 << 22  # elements per chunk of the exact re-check (32 MiB in float64)
_SCREEN_EXPONENT = 30  # screen operands are rescaled when centred magnitudes leave 2^[-30, 30]


class KNNResult(NamedTuple):
    """Result of :func:`knn`.

    Attributes:
        sq_dists: ``[N, k]`` squared distances, ascending along the last dimension; float32, or
            float64 when an input is float64 or when float32 would flush a non-zero squared
            distance to zero (see :func:`output_sq_dists`).
        indices: ``[N, k]`` int64 indices into ``points`` (ties: lower index first).
    """

    sq_dists: Tensor
    indices: Tensor


class DistanceRangeError(ValueError):
    """Squared distances that a floating dtype cannot hold, raised inside a search.

    The public entry points catch it and raise a ``ValueError`` naming the user's own arguments
    (:meth:`message`); raised from a :class:`~gapcallback.symmetry.Symmetry`'s ``knn`` called
    directly, its message names ``queries`` and ``points``.

    Attributes:
        kind: ``"overflow"`` or ``"underflow"``.
        dtype: the dtype that cannot hold the values.
        value: the offending squared distance (largest for an overflow, smallest for an underflow).
    """

    def __init__(self, kind: str, dtype: torch.dtype, value: float) -> None:
        self.kind = kind
        self.dtype = dtype
        self.value = value
        super().__init__(self.message(("queries", "points")))

    def message(self, names: Sequence[str]) -> str:
        """The error message, naming the user's arguments ``names`` (one or two)."""
        return range_message(self.kind, self.dtype, self.value, names)


def range_message(kind: str, dtype: torch.dtype, value: float, names: Sequence[str]) -> str:
    """Message of a squared distance (or gap) ``value`` outside the range of ``dtype``."""
    a, b = (names[0], names[-1]) if names else ("queries", "points")
    who = f"points of `{a}`" if a == b else f"`{a}` and `{b}`"
    info = torch.finfo(dtype)
    if kind == "overflow":
        shown = "are" if not math.isfinite(value) else f"reach {value:.3g},"
        fix = "rescale the data (e.g. divide it by its standard deviation)"
        if dtype != torch.float64:
            fix += " or pass float64 tensors"
        return (
            f"squared distances between {who} {shown} too large for {dtype} (largest "
            f"{info.max:.3g}): the data's scale is out of range; {fix}."
        )
    return (
        f"squared distances between {who} go down to {value:.3g}, below the smallest normal "
        f"{dtype} number ({info.tiny:.3g}), so they cannot be represented; rescale the data (e.g. "
        "multiply it by 2**500)."
    )


def output_sq_dists(values: Tensor, dtype: torch.dtype) -> Tensor:
    r"""Cast exact squared distances (float64) to the output ``dtype``: the rule of every search.

    * a value too large for ``dtype`` (or non-finite: beyond float64 itself) raises
      :class:`DistanceRangeError` (a ``ValueError``): the distances cannot be returned in ``dtype``,
      rescale the data or pass float64 tensors;
    * if some non-zero value is below the smallest normal number of ``dtype`` (float32:
      :math:`1.2 \cdot 10^{-38}`), the cast would flush it to zero (or keep only a few bits), and a
      distance of zero means a duplicate: ``values`` are returned unchanged, in float64;
    * otherwise ``values.to(dtype)``.

    Exact zeros (duplicates) stay exactly zero. ``values`` already in ``dtype`` are only checked.
    """
    if values.numel() == 0:
        return values.to(dtype)
    info = torch.finfo(dtype)
    top = float(values.max())
    if not top <= info.max:  # also NaN
        over = values.dtype if not math.isfinite(top) else dtype
        raise DistanceRangeError("overflow", over, top)
    if values.dtype == dtype:
        return values
    small = (values > 0) & (values < info.tiny)
    if bool(small.any()):
        return values
    return values.to(dtype)


def knn(
    queries: Tensor,
    points: Tensor,
    k: int = 1,
    *,
    exclude_self: bool = False,
    symmetry: Symmetry | None = None,
    block_size: tuple[int, int] | None = None,
) -> KNNResult:
    r"""Exact k nearest neighbours of each query among ``points``, in squared Euclidean distance.

    Args:
        queries: ``[N, D]`` or ``[N, *dims]`` (trailing dimensions are flattened to ``D``).
        points: ``[M, D]`` or ``[M, *dims]`` with the same per-point shape as ``queries``.
        k: number of neighbours, ``1 <= k <= M`` (``M - 1`` with ``exclude_self``).
        exclude_self: leave-one-out search of a set within itself: ``queries`` and ``points`` are
            the same set (same ``N``) and point ``i`` is never returned as a neighbour of query
            ``i``. Duplicates of a point still count (at distance exactly 0). When ``queries``
            is ``points`` (the same tensor), each product block serves both directions: half the
            GEMM work.
        symmetry: a :class:`gapcallback.symmetry.Symmetry`; the distance becomes the orbit
            distance :math:`\min_{g \in G} \lVert x - g\,y \rVert^2`.
        block_size: ``(query_block, point_block)`` rows per block; peak extra memory is about
            ``12 * query_block * point_block`` bytes. Default ``(1024, 2048)`` (about 25 MB).

    Returns:
        :class:`KNNResult` ``(sq_dists [N, k], indices [N, k])``. ``sq_dists`` is float32, or
        float64 when an input is float64; also float64 when a non-zero squared distance is below
        float32's smallest normal number (fp32 data at scales below about ``1e-19``), which float32
        would flush to zero (see :func:`output_sq_dists`).

    Raises:
        TypeError: non-tensor (numpy arrays, lists: convert with ``torch.as_tensor``), integer,
            bool or complex inputs.
        ValueError: empty sets, NaN/Inf, mismatched feature sizes, different devices, ``meta``
            tensors, ``k`` larger than the number of candidate points, or squared distances too
            large for the output dtype (float32 data beyond about ``1e19``: rescale, or pass
            float64).

    Example:
        >>> import torch
        >>> from gapcallback.functional import knn
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
        >>> knn(torch.tensor([[3.0, 4.0]]), x, k=2)
        KNNResult(sq_dists=tensor([[ 0., 25.]]), indices=tensor([[1, 0]]))
    """
    names = ("queries", "points")
    res = exact_knn(
        queries,
        points,
        k,
        exclude_self=exclude_self,
        symmetry=symmetry,
        block_size=block_size,
        names=names,
    )
    dtype = compute_dtype(queries, points)
    try:
        return KNNResult(output_sq_dists(res.sq_dists, dtype), res.indices)
    except DistanceRangeError as err:
        raise ValueError(err.message(names)) from None


def exact_knn(
    queries: Tensor,
    points: Tensor,
    k: int = 1,
    *,
    exclude_self: bool = False,
    symmetry: Symmetry | None = None,
    block_size: tuple[int, int] | None = None,
    names: tuple[str, str] = ("queries", "points"),
) -> KNNResult:
    """:func:`knn` with the exact squared distances (float64; float32 on MPS), before the output cast.

    For the library's public functions built on the search: ``names`` are the user-facing names
    of ``queries`` and ``points`` (``("reference", "samples")`` for the gap), used in every error
    message; each caller then casts its own outputs (:func:`output_sq_dists`).
    """
    name_q, name_p = names
    # Finiteness is checked inside the plain search, from the norms it computes anyway.
    queries = check_point_set(queries, name_q, finite=symmetry is not None)
    points = check_point_set(points, name_p, finite=symmetry is not None)
    check_same_device(queries, points, name_q, name_p)
    check_same_features(queries, points, name_q, name_p)
    k = check_positive_int(k, "k")
    if not isinstance(exclude_self, bool):
        raise TypeError(f"`exclude_self` must be a bool (True or False), got {exclude_self!r}.")
    available = points.shape[0] - (1 if exclude_self else 0)
    if exclude_self and queries.shape[0] != points.shape[0]:
        raise ValueError(
            f"`exclude_self=True` searches a set within itself, so `{name_q}` and `{name_p}` must be"
            f" the same set; got {queries.shape[0]} and {points.shape[0]} points. Call "
            "`knn(x, x, k, exclude_self=True)`."
        )
    if k > available:
        extra = " other" if exclude_self else ""
        raise ValueError(
            f"`k`={k} neighbours requested but `{name_p}` has only {available}{extra} points; use "
            f"k <= {available} or pass more points."
        )
    query_block, point_block = _block_sizes(block_size)
    if symmetry is not None:
        from gapcallback.symmetry.base import Symmetry

        if not isinstance(symmetry, Symmetry):
            raise TypeError(
                "`symmetry` must be a gapcallback.symmetry object (FiniteGroup, CyclicShifts, "
                f"RigidMotions, Permutations) or None, got {type(symmetry).__name__}."
            )
        symmetry.check_shape(queries, name_q)
        symmetry.check_shape(points, name_p)
    # Distances are not differentiable here (exact re-checks of selected pairs): no autograd graph.
    queries, points = queries.detach(), points.detach()
    try:
        if symmetry is not None:
            res = symmetry.knn(queries, points, k, exclude_self=exclude_self)
            if not bool(torch.isfinite(res.sq_dists).all()):
                raise DistanceRangeError("overflow", res.sq_dists.dtype, float("inf"))
            return res
        return _knn_exact(
            queries.reshape(queries.shape[0], -1),
            points.reshape(points.shape[0], -1),
            k,
            exclude_self,
            query_block,
            point_block,
            names=names,
        )
    except DistanceRangeError as err:
        raise ValueError(err.message(names)) from None


def _block_sizes(block_size: tuple[int, int] | None) -> tuple[int, int]:
    if block_size is None:
        return _DEFAULT_QUERY_BLOCK, _DEFAULT_POINT_BLOCK
    if (
        not isinstance(block_size, (tuple, list))
        or len(block_size) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block_size)
    ):
        raise ValueError(
            f"`block_size` must be a pair of positive ints (query_block, point_block), got {block_size!r}."
        )
    return int(block_size[0]), int(block_size[1])


def _exact_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    return dtype if device.type == "mps" else torch.float64


@torch.no_grad()
def _knn_exact(
    queries: Tensor,
    points: Tensor,
    k: int,
    exclude_self: bool,
    query_block: int,
    point_block: int,
    *,
    names: tuple[str, str] = ("queries", "points"),
) -> KNNResult:
    """Core of :func:`knn` on validated, flattened ``[N, D]`` / ``[M, D]`` inputs.

    Returns the exact squared distances in float64 (float32 on MPS), before the output cast.
    """
    dtype = compute_dtype(queries, points)
    exact_dtype = _exact_dtype(points.device, dtype)
    n, dim = queries.shape
    m = points.shape[0]
    with full_precision(points.device.type):
        q = queries.to(dtype)
        x = points.to(dtype)
        same = exclude_self and _same_set(queries, points)
        centre = (x.sum(dim=0, dtype=exact_dtype) / m).to(dtype)
        # Screen operands from data scaled by a power of two when the centred magnitudes are
        # extreme (exact; module docstring); the re-check always uses the raw inputs.
        exponent = screen_exponent(centred_magnitude(x, centre), centred_magnitude(q, centre))
        if exponent:
            xs = ldexp(x, exponent)
            qs_ = xs if same else ldexp(q, exponent)
            centre_s = ldexp(centre, exponent)
        else:
            xs, qs_, centre_s = x, q, centre
        # float64 inputs are screened in float32 (twice the GEMM speed) when that is finite; the
        # rounding of the inputs to float32 is inside the slack below, and the re-check is float64.
        screen = torch.float32 if dtype == torch.float64 else dtype
        q_aug, x_aug, q_norms, x_norms = _gemm_operands(qs_, xs, centre_s, screen, same)
        if screen != dtype and not _all_finite(q_norms, x_norms):
            screen = dtype
            q_aug, x_aug, q_norms, x_norms = _gemm_operands(qs_, xs, centre_s, screen, same)
        # NaN/Inf in an input shows up in the norms: one cheap test instead of a full pass.
        if not _all_finite(q_norms, x_norms):
            check_finite(queries, names[0])
            check_finite(points, names[1])
            raise DistanceRangeError("overflow", dtype, float("inf"))
        eps = torch.finfo(screen).eps
        # Twice a bound on the rounding error of one entry (see the module docstring), per query row.
        slack = 2.0 * (2 * dim + 16) * eps * (q_norms + x_norms.max())

        if same:
            block = max(1, int(math.sqrt(query_block * point_block)))
            best_d, best_i = _self_search(x, q_aug, x_aug, slack, k, block, exact_dtype)
            return KNNResult(best_d, best_i)
        out_d = torch.empty(n, k, dtype=exact_dtype, device=points.device)
        out_i = torch.empty(n, k, dtype=torch.long, device=points.device)
        # One block buffer reused for every product (no allocation per block).
        buffer = torch.empty(
            min(query_block, n) * min(point_block, m), dtype=screen, device=points.device
        )
        for qs in range(0, n, query_block):
            qe = min(qs + query_block, n)
            rows = qe - qs
            best_d = torch.full((rows, k), float("inf"), dtype=exact_dtype, device=points.device)
            best_i = torch.full((rows, k), -1, dtype=torch.long, device=points.device)
            running = torch.full((rows, k), float("inf"), dtype=screen, device=points.device)
            pending: list[tuple[Tensor, Tensor, Tensor]] = []
            n_pending = 0
            for ps in range(0, m, point_block):
                pe = min(ps + point_block, m)
                approx = buffer[: rows * (pe - ps)].view(rows, pe - ps)
                torch.mm(q_aug[qs:qe], x_aug[ps:pe].T, out=approx)
                if exclude_self:
                    lo, hi = max(qs, ps), min(qe, pe)
                    if lo < hi:
                        diag = torch.arange(lo, hi, device=points.device)
                        approx[diag - qs, diag - ps] = float("inf")
                running, cand_r, cand_c, cand_v = _block_candidates(approx, running, slack[qs:qe])
                if cand_r.numel() == 0:
                    continue
                pending.append((cand_r, cand_c + ps, cand_v))
                n_pending += cand_r.numel()
                if n_pending > _PENDING_PER_ROW * rows:  # bound memory on degenerate data
                    bound = running.amax(dim=1) + slack[qs:qe]
                    best_d, best_i = _recheck(q[qs:qe], x, pending, bound, best_d, best_i)
                    pending, n_pending = [], 0
            bound = running.amax(dim=1) + slack[qs:qe]
            best_d, best_i = _recheck(q[qs:qe], x, pending, bound, best_d, best_i)
            out_d[qs:qe] = best_d
            out_i[qs:qe] = best_i
    return KNNResult(out_d, out_i)


def _same_set(queries: Tensor, points: Tensor) -> bool:
    """Whether ``queries`` and ``points`` are the same tensor (views of the same memory)."""
    return (
        queries.data_ptr() == points.data_ptr()
        and queries.shape == points.shape
        and queries.stride() == points.stride()
        and queries.dtype == points.dtype
    )


def centred_magnitude(x: Tensor, centre: Tensor) -> float:
    """``max |x - centre|`` over all entries of ``x`` ``[N, D]`` (one pass, no ``[N, D]`` copy)."""
    lo, hi = torch.aminmax(x, dim=0)
    return float(torch.maximum(hi - centre, centre - lo).amax())


def screen_exponent(*magnitudes: float) -> int:
    """Power of two ``s`` bringing the largest of ``magnitudes`` near 1, or 0 when it is within
    ``2^[-30, 30]`` (or zero, or not finite: left to the finiteness checks)."""
    top = max(magnitudes)
    if not (top > 0.0 and math.isfinite(top)):
        return 0
    e = math.frexp(top)[1]  # top = f * 2**e with 0.5 <= f < 1
    if -_SCREEN_EXPONENT <= e <= _SCREEN_EXPONENT:
        return 0
    return max(-1000, min(1000, -e))


def ldexp(x: Tensor, exponent: int) -> Tensor:
    """``x * 2**exponent``, exact unless it under/overflows, in steps the dtype can represent."""
    while exponent:
        step = max(-100, min(100, exponent))
        x = x * (2.0**step)
        exponent -= step
    return x


def _self_search(
    x: Tensor,
    q_aug: Tensor,
    x_aug: Tensor,
    slack: Tensor,
    k: int,
    block: int,
    exact_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    r"""Leave-one-out search of a set within itself, computing each product block once.

    The symmetric operands of :func:`_gemm_operands` give the full expanded distance
    :math:`P_{ij} = \lVert x_i\rVert^2 + \lVert x_j\rVert^2 - 2\langle x_i, x_j\rangle = P_{ji}`, so
    for row block ``I`` and column block ``J > I`` one product serves the rows of ``I`` and,
    read by columns, the rows of ``J``: only the upper triangle of blocks is multiplied (half the
    GEMM work).

    Returns ``(best_d [N, k] in exact_dtype, best_i [N, k])``.
    """
    n = x.shape[0]
    device = x.device
    running = torch.full((n, k), float("inf"), dtype=q_aug.dtype, device=device)
    best_d = torch.full((n, k), float("inf"), dtype=exact_dtype, device=device)
    best_i = torch.full((n, k), -1, dtype=torch.long, device=device)
    buffer = torch.empty(min(block, n) ** 2, dtype=q_aug.dtype, device=device)
    pending: list[tuple[Tensor, Tensor, Tensor]] = []
    n_pending = 0
    for s in range(0, n, block):
        e = min(s + block, n)
        for t in range(s, n, block):
            u = min(t + block, n)
            prod = buffer[: (e - s) * (u - t)].view(e - s, u - t)
            torch.mm(q_aug[s:e], x_aug[t:u].T, out=prod)
            if t == s:
                diag = torch.arange(e - s, device=device)
                prod[diag, diag] = float("inf")
            running[s:e], rows, cols, vals = _block_candidates(prod, running[s:e], slack[s:e])
            pending.append((rows + s, cols + t, vals))
            n_pending += rows.numel()
            if t > s:
                running[t:u], rows, cols, vals = _block_candidates(
                    prod, running[t:u], slack[t:u], transposed=True
                )
                pending.append((rows + t, cols + s, vals))
                n_pending += rows.numel()
            if n_pending > _PENDING_PER_ROW * n:  # bound memory on degenerate data
                bound = running.amax(dim=1) + slack
                best_d, best_i = _recheck(x, x, pending, bound, best_d, best_i)
                pending, n_pending = [], 0
    return _recheck(x, x, pending, running.amax(dim=1) + slack, best_d, best_i)


def _gemm_operands(
    q: Tensor, x: Tensor, centre: Tensor, dtype: torch.dtype, symmetric: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Screening operands of centred data, in ``dtype`` (``c = centre``):
    ``[q - c, 1]`` ``[N, D+1]`` and ``[-2 (x - c), ||x - c||^2]`` ``[M, D+1]``.

    Their product is :math:`a_{ij} = \lVert x_j\rVert^2 - 2\langle q_i, x_j\rangle` in one GEMM, with
    no separate pass adding the norms (the scaling by -2 is exact). Also returns the squared norms
    ``[N]``, ``[M]`` of the centred ``q`` and ``x`` in ``dtype``.

    ``symmetric=True`` (``q`` is ``x``) appends one more column each, ``||q - c||^2`` and ``1``: the
    product is then the full expanded distance, symmetric in ``i, j``.
    """
    n, dim = q.shape
    extra = 2 if symmetric else 1
    q_aug = torch.empty(n, dim + extra, dtype=dtype, device=q.device)
    x_aug = torch.empty(x.shape[0], dim + extra, dtype=dtype, device=x.device)
    torch.sub(q, centre, out=q_aug[:, :dim])
    q_aug[:, dim] = 1.0
    torch.sub(x, centre, out=x_aug[:, :dim])
    q_norms = q_aug[:, :dim].square().sum(dim=1)
    x_norms = x_aug[:, :dim].square().sum(dim=1)
    x_aug[:, :dim].mul_(-2.0)
    x_aug[:, dim] = x_norms
    if symmetric:
        q_aug[:, dim + 1] = q_norms
        x_aug[:, dim + 1] = 1.0
    return q_aug, x_aug, q_norms, x_norms


def _all_finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _block_candidates(
    approx: Tensor, running: Tensor, slack: Tensor, transposed: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Candidates of one block of expanded distances.

    The block is ``approx`` ``[rows, width]``, or with ``transposed=True`` its columns,
    ``approx.T`` ``[width, rows]`` (never materialised: the other half of a symmetric
    self-search reads the same product).

    ``running`` ``[rows, k]`` holds upper bounds of the k smallest entries seen so far (minima of
    distinct tiles of ``_TILE`` columns, so the k-th is >= the true k-th smallest entry; the exact
    entries when k is large relative to the number of tiles). An entry
    is a candidate when it is within ``slack`` of the k-th bound. Only tiles whose minimum passes
    are inspected, so the block is read once (the tile minima) plus a few tiles per row.

    Returns the updated ``running``, and the flat ``(row, column)`` indices and expanded values of
    the block's candidates (values let a later, tighter bound drop candidates before the re-check).
    """
    rows, width = approx.shape[::-1] if transposed else approx.shape
    n_full = width // _TILE
    full_tiles = (
        approx[: n_full * _TILE].view(n_full, _TILE, rows)
        if transposed
        else approx[:, : n_full * _TILE].view(rows, n_full, _TILE)
    )
    parts = []
    if n_full:
        parts.append(full_tiles.amin(dim=1).T if transposed else full_tiles.amin(dim=2))
    if width > n_full * _TILE:
        rest = approx[n_full * _TILE :].T if transposed else approx[:, n_full * _TILE :]
        parts.append(rest.amin(dim=1, keepdim=True))
    tile_min = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    k = running.shape[1]
    if k == 1:
        running = torch.minimum(running, tile_min.amin(dim=1, keepdim=True))
    elif 4 * k <= tile_min.shape[1]:
        # Few neighbours relative to the tiles: the k-th smallest tile minimum is a tight bound.
        running = _k_smallest(torch.cat([running, tile_min], dim=1), k)
    else:
        # Many neighbours: tile minima would give a loose bound; take the block's exact top-k.
        block_best = _k_smallest(approx.T if transposed else approx, min(k, width))
        running = _k_smallest(torch.cat([running, block_best], dim=1), k)
    # Finite, so that masked entries (+inf: a point's own index) are never candidates.
    threshold = (running.amax(dim=1) + slack).clamp_max(torch.finfo(approx.dtype).max)
    hit_r, hit_t = (tile_min <= threshold[:, None]).nonzero(as_tuple=True)
    cand_r, cand_c, cand_v = [], [], []
    if n_full:
        # Whole tiles are gathered as rows of 64 (contiguous unless transposed).
        full = hit_t < n_full
        fr, ft = hit_r[full], hit_t[full]
        values = full_tiles[ft, :, fr] if transposed else full_tiles[fr, ft]
        kr, kc = (values <= threshold[fr, None]).nonzero(as_tuple=True)
        cand_r.append(fr[kr])
        cand_c.append(ft[kr] * _TILE + kc)
        cand_v.append(values[kr, kc])
    if width > n_full * _TILE:
        pr = hit_r[hit_t == n_full]
        values = approx[n_full * _TILE :, pr].T if transposed else approx[pr, n_full * _TILE :]
        kr, kc = (values <= threshold[pr, None]).nonzero(as_tuple=True)
        cand_r.append(pr[kr])
        cand_c.append(n_full * _TILE + kc)
        cand_v.append(values[kr, kc])
    if len(cand_r) == 1:
        return running, cand_r[0], cand_c[0], cand_v[0]
    return running, torch.cat(cand_r), torch.cat(cand_c), torch.cat(cand_v)


def _k_smallest(values: Tensor, k: int) -> Tensor:
    """``[rows, k]`` ascending k smallest entries of each row of ``values`` ``[rows, width]``.

    Small k (the common case) takes k row minima, masking each winner: much cheaper on CPU than
    a per-row partial sort for the short, many rows of a block's tile minima.
    """
    if k > 8:
        return values.topk(k, dim=1, largest=False).values
    work = values.clone()
    out = torch.empty(values.shape[0], k, dtype=values.dtype, device=values.device)
    for j in range(k):
        best, where = work.min(dim=1, keepdim=True)
        out[:, j : j + 1] = best
        if j + 1 < k:
            work.scatter_(1, where, float("inf"))
    return out


def _recheck(
    q: Tensor,
    x: Tensor,
    pending: list[tuple[Tensor, Tensor, Tensor]],
    bound: Tensor,
    best_d: Tensor,
    best_i: Tensor,
) -> tuple[Tensor, Tensor]:
    """Exact distances of the pending ``(row, col, value)`` candidates, merged into the top-k.

    Candidates whose expanded value exceeds the current per-row ``bound`` (running k-th bound plus
    slack, tighter than when they were found) cannot be neighbours and are dropped first.
    """
    if not pending:
        return best_d, best_i
    rows, cols = _surviving(pending, bound)
    dists = _direct_sq_dists(q, x, rows, cols, best_d.dtype)
    return _merge_topk(best_d, best_i, rows, dists, cols, best_d.shape[1])


def _surviving(
    pending: list[tuple[Tensor, Tensor, Tensor]], bound: Tensor
) -> tuple[Tensor, Tensor]:
    """``(rows, cols)`` of the pending ``(row, col, value)`` candidates with ``value <= bound[row]``."""
    rows = torch.cat([c[0] for c in pending])
    cols = torch.cat([c[1] for c in pending])
    keep = torch.cat([c[2] for c in pending]) <= bound[rows]
    return rows[keep], cols[keep]


def _direct_sq_dists(
    q: Tensor, x: Tensor, q_idx: Tensor, x_idx: Tensor, exact_dtype: torch.dtype
) -> Tensor:
    """``||q[q_idx] - x[x_idx]||^2`` by direct difference in ``exact_dtype``, in bounded chunks."""
    out = torch.empty(q_idx.shape[0], dtype=exact_dtype, device=q.device)
    chunk = max(1, _RECHECK_ELEMENTS // max(1, q.shape[1]))
    for s in range(0, q_idx.shape[0], chunk):
        e = min(s + chunk, q_idx.shape[0])
        diff = q[q_idx[s:e]].to(exact_dtype) - x[x_idx[s:e]].to(exact_dtype)
        out[s:e] = diff.square().sum(dim=1)
        if q.dtype == exact_dtype:  # no wider dtype: the squares can underflow
            check_underflow(out[s:e], diff)
    return out


def check_underflow(sq: Tensor, diff: Tensor) -> None:
    """Raise :class:`DistanceRangeError` when a squared distance ``sq`` ``[T]`` (or ``[T, G]``) of
    differences ``diff`` ``[T, D]`` (``[T, G, D]``) lost a non-zero difference to underflow."""
    tiny = torch.finfo(sq.dtype).tiny
    small = sq < tiny
    if bool(small.any()) and bool((diff[small] != 0).any()):
        raise DistanceRangeError(
            "underflow", sq.dtype, float(sq[small & (diff != 0).any(-1)].min())
        )


def _merge_topk(
    best_d: Tensor, best_i: Tensor, rows: Tensor, dists: Tensor, cols: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """Merge flat candidates ``(rows, dists, cols)`` into the per-row top-k ``best_d``/``best_i``.

    Sorting by (row, distance, index) makes the result independent of block sizes.
    """
    if rows.numel() == 0:
        return best_d, best_i
    n_rows = best_d.shape[0]
    base_rows = torch.arange(n_rows, device=rows.device).repeat_interleave(k)
    all_r = torch.cat([base_rows, rows])
    all_d = torch.cat([best_d.reshape(-1), dists])
    all_c = torch.cat([best_i.reshape(-1), cols])
    # Unused slots (index -1, distance inf) must sort after any real candidate.
    all_c_key = torch.where(all_c < 0, torch.iinfo(torch.long).max, all_c)
    order = torch.argsort(all_c_key, stable=True)
    order = order[torch.argsort(all_d[order], stable=True)]
    order = order[torch.argsort(all_r[order], stable=True)]
    counts = torch.bincount(all_r, minlength=n_rows)
    starts = torch.cumsum(counts, dim=0) - counts
    take = order[starts[:, None] + torch.arange(k, device=rows.device)[None, :]]
    return all_d[take], all_c[take]
