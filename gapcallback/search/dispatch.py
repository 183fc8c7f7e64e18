r"""The plain exact search: one entry, two backends, chosen by a measured cost model.

* the GEMM screen with exact re-check (:mod:`.gemm`): any device, any dimension;
* scipy's cKDTree with the same exact re-check (:mod:`.kdtree`): CPU, low dimension, where a
  tree visits a few leaves per query instead of multiplying every pair.

Both return the same values bit for bit (exact squared distances recomputed by the same direct
difference, ascending, ties by lower index), so the choice (:func:`choose_backend`) only changes
the time.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from gapcallback.search.gemm import gemm_knn
from gapcallback.search.kdtree import (
    kdtree_knn,
    needs_intrinsic_probe,
    prefer_kdtree,
    probe_intrinsic_dimension,
)
from gapcallback.search.ranges import centred_magnitude, exact_dtype, screen_exponent
from gapcallback.search.topk import KNNResult
from gapcallback.utils.checks import check_finite, compute_dtype

__all__ = ["BACKENDS", "Backend", "choose_backend", "exact_search"]

Backend = Literal["auto", "gemm", "kdtree"]
BACKENDS: tuple[str, ...] = ("auto", "gemm", "kdtree")


def choose_backend(
    queries: Tensor, points: Tensor, k: int, *, intrinsic_dim: float | None = None
) -> Literal["gemm", "kdtree"]:
    """The backend :func:`exact_search` runs with ``backend="auto"`` on these ``[N, D]``/``[M, D]``
    inputs: the KD-tree on CPU where the cost model (:func:`~gapcallback.search.kdtree.
    prefer_kdtree`) says it is faster (for ambient dimensions where only a low intrinsic dimension
    makes the tree faster, one cheap probe estimates it: :func:`~gapcallback.search.kdtree.
    probe_intrinsic_dimension`) and the data's centred magnitudes lie within ``2^[-30, 30]``
    (where no squared distance can leave float64's normal range), the GEMM screen otherwise."""
    n, dim = queries.shape
    m = points.shape[0]
    if exact_dtype(points.device, compute_dtype(queries, points)) != torch.float64:
        return "gemm"
    if intrinsic_dim is None and needs_intrinsic_probe(n, m, dim, k, points.device):
        intrinsic_dim = probe_intrinsic_dimension(points)
    if not prefer_kdtree(n, m, dim, k, device=points.device, intrinsic_dim=intrinsic_dim):
        return "gemm"
    centre = points.mean(dim=0, dtype=torch.float64)
    magnitude = max(centred_magnitude(points.double(), centre), centred_magnitude(
        queries.double(), centre))  # fmt: skip
    if screen_exponent(magnitude) != 0 or magnitude == 0.0:
        return "gemm"
    return "kdtree"


@torch.no_grad()
def exact_search(
    queries: Tensor,
    points: Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    block_size: tuple[int, int] | None = None,
    backend: Backend = "auto",
    names: tuple[str, str] = ("queries", "points"),
) -> KNNResult:
    """Exact k nearest neighbours of validated, flattened ``[N, D]`` queries among ``[M, D]``
    points, in squared Euclidean distance.

    Args:
        queries, points: floating tensors on one device, finite (non-finite inputs raise a
            ``ValueError`` naming ``names``).
        k: ``1 <= k <= M`` (``M - 1`` with ``exclude_self``).
        exclude_self: leave-one-out of a set within itself (same ``N``).
        block_size: ``(query_block, point_block)`` of the GEMM backend.
        backend: ``"auto"`` (:func:`choose_backend`), ``"gemm"`` or ``"kdtree"`` (CPU only).
        names: the user's names of the two sets, for error messages.

    Returns:
        :class:`KNNResult` with exact squared distances in float64 (float32 on MPS), ascending,
        ties by lower index.
    """
    if backend == "auto":
        backend = choose_backend(queries, points, k)
    if backend == "kdtree":
        if points.device.type != "cpu":
            raise ValueError(f"backend='kdtree' runs on CPU tensors only, got {points.device}.")
        check_finite(queries, names[0])
        check_finite(points, names[1])
        return KNNResult(*kdtree_knn(queries, points, k, exclude_self=exclude_self))
    query_block, point_block = block_size or (None, None)  # None: gemm_knn's default_blocks
    return KNNResult(
        *gemm_knn(queries, points, k, exclude_self, query_block, point_block, names=names)
    )
