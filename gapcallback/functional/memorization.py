r"""Memorization test for generated samples (Gu et al. 2023).

A sample :math:`z` is *memorized* when its nearest training point is much closer than the second
nearest: :math:`d_1(z) < \text{ratio} \cdot d_2(z)` (``ratio = 1/3``), or when it coincides with a
training point (:math:`d_1 = 0`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

from gapcallback.functional.knn import knn

if TYPE_CHECKING:
    from gapcallback.symmetry.base import Symmetry

__all__ = ["MemorizationResult", "memorization"]


class MemorizationResult(NamedTuple):
    """Result of :func:`memorization`.

    Attributes:
        fraction: 0-dim tensor, fraction of samples that are memorized.
        nearest_distances: ``[M]`` Euclidean distance of each sample to its nearest training point.
        memorized: ``[M]`` bool mask of memorized samples.
    """

    fraction: Tensor
    nearest_distances: Tensor
    memorized: Tensor


def memorization(
    samples: Tensor,
    train: Tensor,
    *,
    ratio: float = 1.0 / 3.0,
    symmetry: Symmetry | None = None,
) -> MemorizationResult:
    r"""Fraction of ``samples`` that copy a training point.

    .. math:: \text{memorized}(z) = \big[d_1(z) < \text{ratio}\; d_2(z)\big] \lor \big[d_1(z) = 0\big]

    with :math:`d_1, d_2` the distances from :math:`z` to its nearest and second-nearest training
    points.

    Args:
        samples: ``[M, D]`` (or ``[M, *dims]``) generated samples.
        train: ``[n, D]`` training set, ``n >= 2``.
        ratio: threshold on ``d1 / d2``, in ``(0, 1]``; Gu et al. use 1/3.
        symmetry: optional :class:`gapcallback.symmetry.Symmetry` for orbit distances.

    Returns:
        :class:`MemorizationResult` ``(fraction, nearest_distances [M], memorized [M])``.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"`ratio` must be a number in (0, 1], got {ratio!r}.")
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"`ratio` must be in (0, 1] (Gu et al. use 1/3), got {ratio}.")
    if isinstance(train, Tensor) and train.ndim >= 1 and train.shape[0] < 2:
        raise ValueError(
            f"`train` needs at least 2 points to compare nearest and second-nearest distances, got "
            f"{train.shape[0]}."
        )
    sq = knn(samples, train, 2, symmetry=symmetry).sq_dists
    d1, d2 = sq[:, 0].sqrt(), sq[:, 1].sqrt()
    memorized = (d1 < float(ratio) * d2) | (d1 == 0)
    return MemorizationResult(memorized.to(d1.dtype).mean(), d1, memorized)
