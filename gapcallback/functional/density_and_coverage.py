r"""Density and coverage of a generative model (Naeem et al. 2020), exact.

With real points :math:`X` (``N``), their k-NN radii :math:`\rho_k(x_i)` (distance to the k-th
nearest other real point) and fake points :math:`Y` (``M``):

.. math:: \text{density} = \frac{1}{kM} \sum_{j=1}^{M} \sum_{i=1}^{N}
    \big[\lVert y_j - x_i\rVert \le \rho_k(x_i)\big], \qquad
    \text{coverage} = \frac1N \sum_{i=1}^{N} \big[\min_j \lVert x_i - y_j\rVert \le \rho_k(x_i)\big].

Density counts how many real balls contain each fake (its expectation is 1 when fakes and reals
are drawn independently from one distribution); coverage is the fraction of real balls that
contain at least one fake. Only real-side radii are used, so both stream over fakes: density is a
sum over fakes, coverage one flag per real point (or-ed over batches). Both come from one pass
over the (fake, real ball) pairs: a real ball is covered iff it contains a fake.

Ties: closed balls (``<=``), as for precision and recall, so a fake equal to a real point is in its
ball even when the radius is 0 (a real point repeated more than ``k`` times); clovaai/prdc's strict
``<`` gives all four values near 0 there (0.002 for points repeated 4 times, k = 3:
``benchmarks/knn_family``). For identical real and fake sets in general position
coverage = 1 and density = (k + 1) / k exactly: each fake lies in its own ball and in the balls of
the k reals of which it is a k-nearest neighbour, the k-th on the sphere; a strict ``<`` would drop
that one and give 1 (in general position only).

Exact distances from the engine; ball membership by
:func:`gapcallback.functional.knn_balls.ball_counts`; memory bounded by blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gapcallback.functional.knn_balls import (
    ball_counts,
    check_point_sets,
    fraction,
    knn_sq_radii,
)
from gapcallback.utils.checks import check_positive_int, compute_dtype

__all__ = [
    "DensityCoverageCounts",
    "DensityCoverageResult",
    "coverage_value",
    "density_coverage",
    "density_coverage_counts",
    "density_value",
]


class DensityCoverageResult(NamedTuple):
    """Result of :func:`density_coverage`: 0-dim tensors (float32, or float64 when an input is
    float64); ``density >= 0`` (can exceed 1), ``coverage`` in ``[0, 1]``."""

    density: Tensor
    coverage: Tensor


def density_coverage(real: Tensor, fake: Tensor, k: int = 5) -> DensityCoverageResult:
    r"""Density and coverage of ``fake`` against ``real`` (module docstring).

    Args:
        real: ``[N, D]`` (or ``[N, *dims]``, flattened) real features, ``N >= k + 1``.
        fake: ``[M, D]`` generated features of the same per-point shape (any ``M >= 1``).
        k: neighbourhood size of the real radii (Naeem et al.: 5).

    Returns:
        :class:`DensityCoverageResult` ``(density, coverage)``.

    Raises:
        TypeError: non-tensor, non-float inputs; a non-int ``k``.
        ValueError: empty sets, NaN/Inf, mismatched shapes or devices, ``k < 1`` or
            ``k > N - 1``.

    Example:
        >>> import torch
        >>> from gapcallback.functional import density_coverage
        >>> real = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
        >>> density_coverage(real, real.clone(), k=5)  # density (k + 1) / k: module docstring
        DensityCoverageResult(density=tensor(1.2000), coverage=tensor(1.))
    """
    k = check_positive_int(k, "k")
    real, fake = check_point_sets(real, fake, ("real", "fake"))
    radii = knn_sq_radii(real, k, name="real")
    dtype = compute_dtype(real, fake)
    incidences, covered = density_coverage_counts(fake, real, radii)
    density = density_value(incidences, fake.shape[0], k, dtype)
    return DensityCoverageResult(density, coverage_value(covered, dtype))


class DensityCoverageCounts(NamedTuple):
    r"""The sufficient statistics of a batch of fakes (:func:`density_coverage_counts`).

    Attributes:
        incidences: 0-dim int64, :math:`\sum_j \#\{i : \lVert y_j - x_i\rVert \le \rho_k(x_i)\}`;
            over batches (and processes) a sum.
        covered: ``[N]`` bool, whether real ball ``i`` contains one of the fakes; over batches
            (and processes) an elementwise ``or``.
    """

    incidences: Tensor
    covered: Tensor


def density_coverage_counts(
    fake: Tensor, real: Tensor, real_sq_radii: Tensor
) -> DensityCoverageCounts:
    r"""Both statistics of a batch of fakes from one pass of
    :func:`~gapcallback.functional.knn_balls.ball_counts` (fakes as queries, real balls), given the
    real points' squared k-NN radii: a real ball is covered iff it contains a fake, i.e. iff its
    nearest fake is within its radius, so coverage needs no search of its own."""
    counts = ball_counts(fake, real, real_sq_radii, names=("fake", "real"))
    return DensityCoverageCounts(counts.per_query.sum(), counts.per_centre > 0)


def density_value(count: Tensor, n_fake: Tensor | int, k: int, dtype: torch.dtype) -> Tensor:
    """0-dim density ``count / (k * n_fake)`` from the incidences summed over all fakes."""
    return fraction(count, torch.as_tensor(n_fake).double() * k, dtype)


def coverage_value(covered: Tensor, dtype: torch.dtype) -> Tensor:
    """0-dim coverage: the fraction of real balls ``covered`` (``[N]`` bool)."""
    return fraction(covered.sum(), covered.shape[0], dtype)
