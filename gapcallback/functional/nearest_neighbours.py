r"""Exact k-nearest-neighbour search: the public entry, its validation and its dispatch.

The engine lives in :mod:`gapcallback.search` (one blocked screen-and-recheck driver, the GEMM and
KD-tree backends, one top-k accumulator); a ``symmetry=`` search is the group's own
:meth:`~gapcallback.symmetry.Symmetry.knn`, built on the same package. Here: the checks that give
every bad input a ``ValueError``/``TypeError`` naming the user's argument, and the cast of the exact
(float64) distances to the output dtype by the rule every search shares
(:func:`gapcallback.search.output_sq_dists`).

Exactness: the GEMM expansion :math:`\lVert x\rVert^2 + \lVert y\rVert^2 - 2\langle x, y\rangle`
only *pre-selects* candidates, with a provable rounding bound, and the winners' distances are
recomputed by direct difference in float64: duplicates give exactly ``0`` and near-duplicates are
as accurate as the subtraction (:mod:`gapcallback.search.gemm`). Memory is bounded by the block
sizes, never ``N x M``. Matmuls run in IEEE fp32/fp64 with autocast disabled, whatever the user's
``float32_matmul_precision``.

Range. Data at any scale that the exact re-check can represent is searched exactly (the screen
rescales by a power of two where needed). A squared distance too large for the output dtype is a
``ValueError`` (rescale the data or pass float64); where a non-zero squared distance is below the
output dtype's smallest normal number (float32: :math:`1.2 \cdot 10^{-38}`, i.e. fp32 data at
scales below about :math:`10^{-19}`), the exact float64 distances are returned instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gapcallback.search import (
    BACKENDS,
    Backend,
    DistanceRangeError,
    KNNResult,
    exact_search,
    output_sq_dists,
)
from gapcallback.utils.checks import (
    check_choice,
    check_point_set,
    check_positive_int,
    check_same_device,
    check_same_features,
    compute_dtype,
)

if TYPE_CHECKING:
    from gapcallback.symmetry.base import Symmetry

__all__ = ["DistanceRangeError", "KNNResult", "exact_knn", "knn", "output_sq_dists"]


def knn(
    queries: Tensor,
    points: Tensor,
    k: int = 1,
    *,
    exclude_self: bool = False,
    symmetry: Symmetry | None = None,
    block_size: tuple[int, int] | None = None,
    backend: Backend = "auto",
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
        block_size: ``(query_block, point_block)`` rows per block of the GEMM backend; peak
            extra memory is about ``4 * query_block * point_block`` bytes (one float32 block)
            plus a float32 copy of ``points``. Default ``(2048, 4096)`` (a 32 MB block) above
            D = 64 and ``(1024, 2048)`` (8 MB; about 22 MB in all at N = M = 30000, D = 64) up
            to it (:func:`gapcallback.search.default_blocks`). Not with ``symmetry=`` (each
            group sizes its blocks by a memory budget) nor ``backend="kdtree"``.
        backend: ``"auto"`` (default: scipy's KD-tree on CPU in low dimension, where a measured
            cost model says it is faster; the blocked GEMM screen otherwise), ``"gemm"`` or
            ``"kdtree"`` (CPU only). Every backend returns the same values bit for bit; the choice
            only changes the time. Plain searches only (``symmetry=None``).

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
        backend=backend,
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
    backend: Backend = "auto",
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
    blocks = _block_sizes(block_size)
    backend = check_choice(backend, "backend", BACKENDS)  # type: ignore[assignment]
    if symmetry is not None and (block_size is not None or backend != "auto"):
        given = "`block_size`" if block_size is not None else f"`backend`={backend!r}"
        raise ValueError(
            f"{given} applies to the plain search only; a `symmetry=` search sizes its own blocks "
            "and runs its own screen. Drop it, or search without `symmetry`."
        )
    if backend == "kdtree" and block_size is not None:
        raise ValueError(
            "`block_size` sets the GEMM backend's blocks; `backend='kdtree'` has none. Drop one."
        )
    if backend == "kdtree" and points.device.type != "cpu":
        raise ValueError(
            f"`backend='kdtree'` runs on CPU tensors only, but `{name_p}` is on {points.device}; "
            "use backend='auto' or 'gemm'."
        )
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
        return exact_search(
            queries.reshape(queries.shape[0], -1),
            points.reshape(points.shape[0], -1),
            k,
            exclude_self=exclude_self,
            block_size=blocks,
            backend=backend,
            names=names,
        )
    except DistanceRangeError as err:
        raise ValueError(err.message(names)) from None


def _block_sizes(block_size: tuple[int, int] | None) -> tuple[int, int] | None:
    if block_size is None:
        return None
    if (
        not isinstance(block_size, (tuple, list))
        or len(block_size) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block_size)
    ):
        raise ValueError(
            f"`block_size` must be a pair of positive ints (query_block, point_block), got {block_size!r}."
        )
    return int(block_size[0]), int(block_size[1])
