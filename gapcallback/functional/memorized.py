r"""Memorization test for generated samples (Gu et al. 2023).

A sample :math:`z` is *memorized* when its nearest training point is much closer than the second
nearest: :math:`d_1(z) < \text{ratio} \cdot d_2(z)` (``ratio = 1/3``), or when it coincides with a
training point (:math:`d_1 = 0 < d_2`). A sample at distance 0 from two training points
(:math:`d_1 = d_2 = 0`: a duplicated training point) is not counted, since the ratio
:math:`d_1 / d_2` is undefined there; deduplicate the training set
(:func:`gapcallback.functional.deduplicate`) to count copies of duplicated points.

The test is decided on the exact float64 distances, so it does not depend on the inputs' dtype:
float32 data at tiny scales (where the squared distances underflow float32) is judged correctly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

from gapcallback.functional.nearest_neighbours import DistanceRangeError, exact_knn, output_sq_dists
from gapcallback.utils.checks import check_number, check_point_set, compute_dtype

if TYPE_CHECKING:
    from gapcallback.symmetry.base import Symmetry

__all__ = ["MemorizationResult", "check_memorization_ratio", "memorization"]


def check_memorization_ratio(value: object, name: str = "memorization_ratio") -> float:
    """The memorization test's threshold as a float in (0, 1], or an error naming ``name``."""
    ratio = check_number(value, name, minimum=0.0, maximum=1.0)
    if not ratio:
        raise ValueError(
            f"`{name}` must be in (0, 1] (a sample is a copy when d1 < ratio * d2; Gu et al. use "
            f"1/3), got {value}."
        )
    return ratio


class MemorizationResult(NamedTuple):
    """Result of :func:`memorization`.

    Attributes:
        fraction: 0-dim tensor, fraction of samples that are memorized (the inputs' dtype: float32,
            or float64 for a float64 input).
        nearest_distances: ``[M]`` Euclidean distance of each sample to its nearest training point
            (same dtype, or float64 where float32 would flush a non-zero distance to zero).
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

    .. math:: \text{memorized}(z) = \big[d_1(z) < \text{ratio}\; d_2(z)\big] \lor
        \big[d_1(z) = 0 < d_2(z)\big]

    with :math:`d_1, d_2` the distances from :math:`z` to its nearest and second-nearest training
    points (exact, float64).

    Args:
        samples: ``[M, D]`` (or ``[M, *dims]``) generated samples.
        train: ``[n, D]`` training set, ``n >= 2``.
        ratio: threshold on ``d1 / d2``, in ``(0, 1]``; Gu et al. use 1/3.
        symmetry: optional :class:`gapcallback.symmetry.Symmetry` for orbit distances.

    Returns:
        :class:`MemorizationResult` ``(fraction, nearest_distances [M], memorized [M])``.

    Raises:
        TypeError: non-tensor inputs (numpy arrays, lists: convert with ``torch.as_tensor``),
            non-float dtypes, a non-numeric ``ratio``.
        ValueError: ``ratio`` outside ``(0, 1]``, fewer than 2 training points, empty sets,
            NaN/Inf, mismatched shapes or devices, ``meta`` tensors.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(
            f"`ratio` must be a number in (0, 1] (Gu et al. use 1/3), got {ratio!r} "
            f"({type(ratio).__name__})."
        )
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"`ratio` must be in (0, 1] (Gu et al. use 1/3), got {ratio}.")
    train = check_point_set(train, "train", finite=symmetry is not None)
    if train.shape[0] < 2:
        raise ValueError(
            "`train` needs at least 2 points to compare nearest and second-nearest distances, got "
            f"{train.shape[0]}."
        )
    names = ("samples", "train")
    sq = exact_knn(samples, train, 2, symmetry=symmetry, names=names).sq_dists
    d1, d2 = sq[:, 0].sqrt(), sq[:, 1].sqrt()
    memorized = (d1 < float(ratio) * d2) | ((d1 == 0) & (d2 > 0))
    dtype = compute_dtype(samples, train)
    fraction = memorized.to(sq.dtype).mean().to(dtype)
    try:
        nearest = output_sq_dists(d1, dtype)
    except DistanceRangeError as err:  # distances beyond float32 (data near its largest values)
        raise ValueError(err.message(names)) from None
    return MemorizationResult(fraction, nearest, memorized)
