r"""Simulated reference families of known intrinsic dimension, and their neighbour statistics.

The default ``"calibrated"`` estimator of :mod:`gapcallback.functional.dimension` compares two
statistics of the k nearest neighbours of the data with the same statistics on these references
(:mod:`gapcallback.functional.dimension_calibration` does the comparison;
:mod:`gapcallback.functional.calibration_table` ships the simulations for ``k = 10, seed = 0``).
This module is what both of them read: the families, the grid of dimensions, the statistics and
their seeded simulation. It imports neither of them.

Statistics (:func:`geometry_stats`, per point, over its k nearest other points)
    * the Levina-Bickel sum :math:`s_i = \sum_{j<k} \log(T_{k,i} / T_{j,i})` (the raw MLE of a set
      is :math:`\hat m = (k - 1) / \bar s`);
    * the mean cosine :math:`c_i = (\lVert\sum_j u_j\rVert^2 - k)/(k(k-1))` between the directions
      :math:`u_j = (x_j - x_i)/\lVert x_j - x_i\rVert` to the neighbours.

Families (:data:`REFERENCE_FAMILIES`, :func:`reference_sample`)
    the sphere :math:`S^d \subset \mathbb R^{d+1}`, the flat torus :math:`(S^1)^d \subset
    \mathbb R^{2d}`, the cube :math:`[0,1]^d` and the standard Gaussian :math:`N(0, I_d)`.

Simulation (:func:`simulate_reference_stats`)
    ``r = min(6, ceil(5000 / n))`` samples of ``n`` points drawn from one ``torch.Generator``
    seeded with ``(1_000_003 seed + 7919 d + 31 n + k + 104_729 index(family)) mod 2^62``; the
    pooled raw MLE and the mean cosine over the samples. Deterministic for given arguments.

Cache
    :func:`reference_stats` is :func:`simulate_reference_stats` memoised per process by
    ``functools.lru_cache(maxsize=REFERENCE_CACHE_SIZE)`` (:data:`REFERENCE_CACHE_SIZE` = 4096
    entries of two floats, least recently used evicted first). ``reference_stats.cache_info()``
    reports it (``misses`` counts the simulations run), ``reference_stats.cache_clear()`` empties
    it. The cache holds only results of a deterministic function, so what it holds never changes an
    estimate, only how long it takes. This is the module's only state.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from gapcallback.functional.nearest_neighbours import KNNResult, exact_knn

__all__ = [
    "CALIBRATION_DIMS",
    "MAX_CALIBRATION_DIM",
    "MAX_REFERENCE_POINTS",
    "MAX_SIMULATION_REPEATS",
    "MIN_SIMULATED_POINTS",
    "REFERENCE_CACHE_SIZE",
    "REFERENCE_FAMILIES",
    "dimension_grid",
    "geometry_stats",
    "reference_sample",
    "reference_stats",
    "simulate_reference_stats",
]

REFERENCE_FAMILIES = ("sphere", "torus", "cube", "gaussian")
"""Simulated families the default ``"calibrated"`` estimator is calibrated against."""

MAX_REFERENCE_POINTS = 4000
"""Largest reference size: the calibration splits a larger set into equal chunks of at most this
many points, each compared with references of the chunk size."""

MIN_SIMULATED_POINTS = 5000
"""Points simulated per family, dimension and size at least (samples of ``n`` points repeated)."""

MAX_SIMULATION_REPEATS = 6
"""Most samples of ``n`` points one simulation draws."""

MAX_CALIBRATION_DIM = 512
"""Largest dimension of the grid :data:`CALIBRATION_DIMS`."""

REFERENCE_CACHE_SIZE = 4096
"""Entries kept by the memo of :func:`reference_stats` (two floats each)."""

_COS_BLOCK_ELEMENTS = 1 << 22  # elements per block of the neighbour-direction tensor [B, k, D]


def dimension_grid(top: int) -> tuple[int, ...]:
    """The calibration grid: every dimension up to 12, then steps of about 15% (rounded), the last
    one clamped to ``top``."""
    dims = [1]
    while dims[-1] < top:
        dim = dims[-1]
        dims.append(dim + 1 if dim < 12 else min(top, max(dim + 1, round(dim * 1.15))))
    return tuple(dims)


CALIBRATION_DIMS = dimension_grid(MAX_CALIBRATION_DIM)
"""The fixed grid of simulated dimensions (39 values, 1 to 512), whatever the ambient dimension."""


def geometry_stats(
    points: Tensor, k: int, neighbours: KNNResult | None = None
) -> tuple[Tensor, Tensor]:
    r"""Per-point statistics of the k nearest other points, float64 on the CPU.

    Args:
        points: ``[N, D]`` distinct points (``N > k``).
        k: neighbours (>= 2).
        neighbours: a precomputed leave-one-out search of ``points`` within itself (``[N, k]``);
            searched here when absent or of another shape.

    Returns:
        ``s`` (``[N]``, :math:`\sum_{j<k} \log(T_{k,i} / T_{j,i})`, the Levina-Bickel sum) and
        ``c`` (``[N]``, the mean cosine between the directions :math:`u_{j} = (x_j - x_i) / \lVert
        x_j - x_i\rVert` to the k neighbours over all pairs :math:`j \ne l`, computed as
        :math:`(\lVert \sum_j u_j\rVert^2 - k) / (k (k - 1))`).
    """
    n, dim = points.shape
    res = neighbours
    if res is None or res.indices.shape != (n, k):
        res = exact_knn(points, points, k, exclude_self=True, names=("x", "x"))
    log_r = 0.5 * res.sq_dists.to(device="cpu", dtype=torch.float64).log()
    s = (log_r[:, k - 1 : k] - log_r[:, : k - 1]).sum(dim=1)
    c = torch.empty(n, dtype=torch.float64)
    block = max(1, _COS_BLOCK_ELEMENTS // (k * dim))
    for start in range(0, n, block):
        stop = min(n, start + block)
        # float64 (where the device has it): low-precision inputs (bf16) and tiny or huge scales
        # would otherwise round, flush or overflow the directions.
        wide = torch.float32 if points.device.type == "mps" else torch.float64
        v = points[res.indices[start:stop]].to(wide) - points[start:stop, None, :].to(wide)
        u = v / v.norm(dim=2, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        c[start:stop] = ((u.sum(dim=1).square().sum(dim=1) - k) / (k * (k - 1))).to(
            device="cpu", dtype=torch.float64
        )
    return s, c


def reference_sample(family: str, dim: int, n: int, gen: torch.Generator) -> Tensor:
    """``[n, D]`` float64 uniform sample of a reference family of intrinsic dimension ``dim``,
    drawn from ``gen``."""
    if family == "sphere":  # S^dim in R^(dim + 1): curvature, no boundary
        z = torch.randn(n, dim + 1, generator=gen, dtype=torch.float64)
        return z / z.norm(dim=1, keepdim=True)
    if family == "torus":  # flat (S^1)^dim in R^(2 dim): periodic, chord metric, no boundary
        t = (2.0 * math.pi) * torch.rand(n, dim, generator=gen, dtype=torch.float64)
        return torch.cat([t.cos(), t.sin()], dim=1)
    if family == "cube":  # [0, 1]^dim: flat, with boundary
        return torch.rand(n, dim, generator=gen, dtype=torch.float64)
    return torch.randn(n, dim, generator=gen, dtype=torch.float64)  # gaussian: density gradient


def simulate_reference_stats(
    family: str, dim: int, n: int, k: int, seed: int
) -> tuple[float, float]:
    """Pooled raw MLE and mean neighbour cosine of ``family`` in dimension ``dim``: ``n`` points,
    seeded by ``(family, dim, n, k, seed)``, repeated until at least :data:`MIN_SIMULATED_POINTS`
    points were simulated (at most :data:`MAX_SIMULATION_REPEATS` samples). Not memoised: the
    simulation behind the shipped table (:mod:`gapcallback.functional.calibration_table`); the
    estimator calls the memoised :func:`reference_stats`.
    """
    repeats = min(MAX_SIMULATION_REPEATS, max(1, math.ceil(MIN_SIMULATED_POINTS / n)))
    key = 1_000_003 * seed + 7919 * dim + 31 * n + k + 104_729 * REFERENCE_FAMILIES.index(family)
    gen = torch.Generator().manual_seed(key % (1 << 62))
    s_total = c_total = 0.0
    for _ in range(repeats):
        s, c = geometry_stats(reference_sample(family, dim, n, gen), k)
        s_total += float(s.mean())
        c_total += float(c.mean())
    return (k - 1) / (s_total / repeats), c_total / repeats


@functools.lru_cache(maxsize=REFERENCE_CACHE_SIZE)
def reference_stats(family: str, dim: int, n: int, k: int, seed: int) -> tuple[float, float]:
    """:func:`simulate_reference_stats`, memoised for the process (see the module's Cache section:
    at most :data:`REFERENCE_CACHE_SIZE` entries; ``reference_stats.cache_info()`` and
    ``reference_stats.cache_clear()``). What the estimator simulates where the shipped table does
    not hold the references."""
    return simulate_reference_stats(family, dim, n, k, seed)
