r"""Density and coverage of a generative model (Naeem et al. 2020), exact.

With real points :math:`X` (``N``), their k-NN radii :math:`\rho_k(x_i)` (distance to the k-th
nearest other real point) and fake points :math:`Y` (``M``):

.. math:: \text{density} = \frac{1}{kM} \sum_{j=1}^{M} \sum_{i=1}^{N}
    \big[y_j \in B_i\big], \qquad
    \text{coverage} = \frac1N \sum_{i=1}^{N} \big[\exists j : y_j \in B_i\big], \qquad
    B_i = \{y : \lVert y - x_i\rVert < \rho_k(x_i)\} \cup \{x_i\}.

Density counts how many real balls contain each fake (its expectation is 1 when fakes and reals
are drawn independently from one distribution); coverage is the fraction of real balls that
contain at least one fake. Only real-side radii are used, so both stream over fakes: density is a
sum over fakes, coverage one flag per real point (or-ed over batches). Both come from one pass
over the (fake, real ball) pairs: a real ball is covered iff it contains a fake.

Ties. The balls :math:`B_i` are open and contain their centre. Open, because density's
normalisation by :math:`k` counts the real points of a ball: :math:`x_i` and the :math:`k - 1`
neighbours strictly inside, with the k-th on the sphere left out, so the real set scored against
itself (identical real and fake sets) gives density = coverage = 1 exactly, in general position;
closed balls would count the k-th as well and give :math:`(k + 1) / k`. With their centre, because
a ball of radius 0 (a real point repeated more than ``k`` times) still contains the fakes equal to
it: clovaai/prdc's strict ``<`` without that rule gives values near 0 there (0.002 for points
repeated 4 times, k = 3: ``benchmarks/knn_family``). Off the sphere the rule is the papers' (and
prdc's) ``<``, so values equal theirs wherever no fake lies exactly on a sphere. Precision and
recall keep closed balls, the ``<=`` of Kynkaanniemi et al.'s definition
(:mod:`gapcallback.functional.precision_and_recall`); both conventions come from one pass
(:class:`~gapcallback.functional.knn_balls.BallCounts` counts the pairs on a sphere apart).

Exact distances from the engine; ball membership by
:func:`gapcallback.functional.knn_balls.ball_counts`; memory bounded by blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gapcallback.functional.knn_balls import (
    BallCounts,
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
    "open_ball_counts",
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
        >>> density_coverage(real, real.clone(), k=5)  # identical sets: module docstring
        DensityCoverageResult(density=tensor(1.), coverage=tensor(1.))
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
        incidences: 0-dim int64, :math:`\sum_j \#\{i : y_j \in B_i\}` (module docstring);
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
    return open_ball_counts(counts)


def open_ball_counts(counts: BallCounts) -> DensityCoverageCounts:
    """Density's and coverage's statistics from closed-ball counts: the pairs exactly on a
    sphere of positive radius taken out (the balls :math:`B_i` of the module docstring)."""
    inside = counts.per_centre - counts.per_centre_on_sphere
    incidences = counts.per_query.sum() - counts.per_query_on_sphere.sum()
    return DensityCoverageCounts(incidences, inside > 0)


def density_value(count: Tensor, n_fake: Tensor | int, k: int, dtype: torch.dtype) -> Tensor:
    """0-dim density ``count / (k * n_fake)`` from the incidences summed over all fakes."""
    return fraction(count, torch.as_tensor(n_fake).double() * k, dtype)


def coverage_value(covered: Tensor, dtype: torch.dtype) -> Tensor:
    """0-dim coverage: the fraction of real balls ``covered`` (``[N]`` bool)."""
    return fraction(covered.sum(), covered.shape[0], dtype)
