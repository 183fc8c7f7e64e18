r"""Improved precision and recall of a generative model (Kynkäänniemi et al. 2019), exact.

Each set spans a *k-NN manifold*: the union of closed balls around its points, each with the
distance to the point's k-th nearest other point of the same set as radius,

.. math:: \mathcal M(X) = \bigcup_{x \in X} B\big(x, \rho_k(x)\big), \qquad
    \rho_k(x) = \lVert x - \mathrm{NN}_k(x; X \setminus \{x\})\rVert .

With real points :math:`X` (``N``) and fake (generated) points :math:`Y` (``M``):

.. math:: \text{precision} = \frac1M \sum_j \big[y_j \in \mathcal M(X)\big], \qquad
    \text{recall} = \frac1N \sum_i \big[x_i \in \mathcal M(Y)\big].

Ties: a point *on* a sphere is inside (:math:`\lVert y - x\rVert \le \rho_k(x)`, the papers'
"within the ball"; Kynkäänniemi et al.'s code and torch-fidelity use ``<=``, clovaai/prdc uses
``<``, which drops every point whose radius is 0). Duplicates count as neighbours at distance 0.
So identical real and fake sets give precision = recall = 1.

Exact distances from the engine (radii: :func:`gapcallback.functional.knn`'s leave-one-out
search; ball membership: :func:`gapcallback.functional.knn_balls.ball_counts`, a blocked screen
with an exact re-check, one pass over the (fake, real) pairs for both values), memory bounded by
blocks: never an ``N x M`` matrix.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from gapcallback.functional.density_and_coverage import (
    coverage_value,
    density_value,
    open_ball_counts,
)
from gapcallback.functional.knn_balls import (
    BallCounts,
    ball_counts,
    check_point_sets,
    fraction,
    knn_sq_radii,
)
from gapcallback.utils.checks import check_positive_int, compute_dtype

__all__ = [
    "PRDCResult",
    "PrecisionRecallResult",
    "precision_count",
    "precision_recall",
    "precision_recall_density_coverage",
    "recall_value",
]


class PrecisionRecallResult(NamedTuple):
    """Result of :func:`precision_recall`: 0-dim tensors in ``[0, 1]`` (float32, or float64 when
    an input is float64); unpacks as ``precision, recall = ...``."""

    precision: Tensor
    recall: Tensor


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> PrecisionRecallResult:
    r"""Precision and recall of ``fake`` against ``real`` on k-NN manifolds (module docstring).

    Args:
        real: ``[N, D]`` (or ``[N, *dims]``, flattened) real features, ``N >= k + 1``.
        fake: ``[M, D]`` generated features of the same per-point shape, ``M >= k + 1``.
        k: neighbourhood size of the radii (Kynkäänniemi et al.: 3).

    Returns:
        :class:`PrecisionRecallResult` ``(precision, recall)``.

    Raises:
        TypeError: non-tensor, non-float inputs; a non-int ``k``.
        ValueError: empty sets, NaN/Inf, mismatched shapes or devices, ``k < 1``, or ``k`` larger
            than ``N - 1`` (``real``) or ``M - 1`` (``fake``).

    Example:
        >>> import torch
        >>> from gapcallback.functional import precision_recall
        >>> real = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
        >>> precision_recall(real, real.clone())
        PrecisionRecallResult(precision=tensor(1.), recall=tensor(1.))
    """
    k = check_positive_int(k, "k")
    real, fake = check_point_sets(real, fake, ("real", "fake"))
    counts = _both_ways(real, fake, k)
    dtype = compute_dtype(real, fake)
    return PrecisionRecallResult(
        fraction((counts.per_query > 0).sum(), fake.shape[0], dtype),
        fraction((counts.in_query_balls > 0).sum(), real.shape[0], dtype),
    )


def _both_ways(real: Tensor, fake: Tensor, k: int) -> BallCounts:
    """Both sets' radii and one pass over the (fake, real) pairs testing both balls."""
    real_radii = knn_sq_radii(real, k, name="real")
    fake_radii = knn_sq_radii(fake, k, name="fake")
    counts = ball_counts(fake, real, real_radii, query_sq_radii=fake_radii, names=("fake", "real"))
    assert counts.in_query_balls is not None
    return counts


class PRDCResult(NamedTuple):
    """Result of :func:`precision_recall_density_coverage`: 0-dim tensors (float32, or float64 when
    an input is float64)."""

    precision: Tensor
    recall: Tensor
    density: Tensor
    coverage: Tensor


def precision_recall_density_coverage(real: Tensor, fake: Tensor, k: int = 5) -> PRDCResult:
    r"""The four values with one ``k`` (what clovaai/prdc's ``compute_prdc`` returns), sharing the
    work: each set's radii once and one pass over the (fake, real) pairs, which tests both balls.
    Equal to :func:`precision_recall` and :func:`~gapcallback.functional.density_coverage` with
    the same ``k``; see them for the definitions, ties and errors (``N, M >= k + 1``)."""
    k = check_positive_int(k, "k")
    real, fake = check_point_sets(real, fake, ("real", "fake"))
    counts = _both_ways(real, fake, k)
    dtype = compute_dtype(real, fake)
    n_fake = fake.shape[0]
    assert counts.in_query_balls is not None
    incidences, covered = open_ball_counts(counts)  # density and coverage's open balls
    return PRDCResult(
        fraction((counts.per_query > 0).sum(), n_fake, dtype),
        fraction((counts.in_query_balls > 0).sum(), real.shape[0], dtype),
        density_value(incidences, n_fake, k, dtype),
        coverage_value(covered, dtype),
    )


def precision_count(fake: Tensor, real: Tensor, real_sq_radii: Tensor) -> Tensor:
    r"""0-dim int64: how many of ``fake`` lie in the real manifold, :math:`\sum_j [y_j \in
    \mathcal M(X)]`, given the real points' squared k-NN radii (:func:`knn_sq_radii`). A sum, so
    batches of fakes (and processes) add up."""
    return (ball_counts(fake, real, real_sq_radii, names=("fake", "real")).per_query > 0).sum()


def recall_value(real: Tensor, fake: Tensor, k: int) -> Tensor:
    r"""0-dim: the fraction of ``real`` inside the fake manifold :math:`\mathcal M(Y)` of the whole
    fake set ``fake`` (the fakes' radii depend on every fake, so this needs all of them)."""
    real, fake = check_point_sets(real, fake, ("real", "fake"))
    fake_radii = knn_sq_radii(fake, k, name="fake")
    inside = (ball_counts(real, fake, fake_radii, names=("real", "fake")).per_query > 0).sum()
    return fraction(inside, real.shape[0], compute_dtype(real, fake))
