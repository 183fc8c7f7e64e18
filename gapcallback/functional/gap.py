r"""Representation gap: mean distance from held-out references to the nearest model sample.

.. math:: R = \frac{1}{m} \sum_{i=1}^{m} \min_{j} \lVert y_i - z_j \rVert^p

(with ``symmetry``: :math:`\min_{j,\,g \in G} \lVert y_i - g z_j \rVert^p`). It is the optimal-transport
cost when every reference may go to its nearest sample, a lower bound on :math:`W_p^p` between data
and model and on the generalization error of any predictor whose outputs are the samples' support.

Range: the nearest squared distances are exact (float64) and the p-th powers are averaged in
float64. The gap is returned in the inputs' dtype unless that dtype cannot hold it: a gap too large
for it (p-th powers of large distances, e.g. ``p=4`` on float32 data beyond about ``1e9``) is a
``ValueError`` (rescale the data, or pass float64), and a non-zero gap below its smallest normal
number (float32 data at scales below about ``1e-19``) is returned in float64 instead of being
flushed to zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gapcallback.functional.nearest_neighbours import exact_knn
from gapcallback.utils.checks import check_exponent, compute_dtype

if TYPE_CHECKING:
    from gapcallback.symmetry.base import Symmetry

__all__ = ["gap_from_sq_dists", "representation_gap"]


def representation_gap(
    reference: Tensor,
    samples: Tensor,
    *,
    p: float = 2.0,
    symmetry: Symmetry | None = None,
) -> Tensor:
    r"""Representation gap :math:`R = \frac1m \sum_i \min_j \lVert y_i - z_j \rVert^p`.

    Args:
        reference: ``[m, D]`` (or ``[m, *dims]``) held-out data points :math:`y_i`.
        samples: ``[M, D]`` (or ``[M, *dims]``) model samples :math:`z_j`.
        p: loss exponent, ``l(y, z) = ||y - z||^p`` (default 2: mean squared distance).
        symmetry: optional :class:`gapcallback.symmetry.Symmetry` for orbit distances.

    Returns:
        0-dim tensor (float32, float64 for float64 inputs), accumulated in float64. Exactly 0 when
        every reference point is among the samples. Float64 also when the gap is non-zero but
        below float32's smallest normal number (float32 would flush it to zero).

    Raises:
        TypeError: non-tensor inputs (numpy arrays, lists: convert with ``torch.as_tensor``),
            integer, bool or complex dtypes, a non-numeric ``p``.
        ValueError: empty sets, NaN/Inf, mismatched shapes or devices, ``meta`` tensors,
            ``p <= 0``, or a gap (or squared distances) too large for the dtype.

    Example:
        >>> import torch
        >>> from gapcallback.functional import representation_gap
        >>> representation_gap(torch.zeros(3, 2), torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        tensor(0.)
    """
    p = check_exponent(p)
    names = ("reference", "samples")
    nearest = exact_knn(reference, samples, 1, symmetry=symmetry, names=names).sq_dists[:, 0]
    return gap_value(nearest, p, compute_dtype(reference, samples), names)


def gap_from_sq_dists(nearest_sq_dists: Tensor, p: float = 2.0) -> Tensor:
    r"""Mean of ``d^p`` from nearest squared distances ``[m]``: :math:`\frac1m\sum_i (d_i^2)^{p/2}`.

    Accumulates in float64 (where the device has it) and returns the input's dtype, or float64
    when the input's dtype would flush a non-zero mean to zero; a mean too large for the dtype
    raises ``ValueError``.
    """
    p = check_exponent(p)
    if not isinstance(nearest_sq_dists, Tensor) or not nearest_sq_dists.is_floating_point():
        raise TypeError(
            "`nearest_sq_dists` must be a floating torch.Tensor of squared distances, got "
            f"{type(nearest_sq_dists).__name__}."
        )
    return gap_value(nearest_sq_dists, p, nearest_sq_dists.dtype, ("nearest_sq_dists",))


def gap_value(
    nearest_sq_dists: Tensor, p: float, dtype: torch.dtype, names: Sequence[str]
) -> Tensor:
    r"""The gap :math:`\frac1m\sum_i (d_i^2)^{p/2}` of exact squared distances, in ``dtype``.

    Computed in float64 (float32 on MPS). Range rule (module docstring): too large for ``dtype``
    (or for float64 itself) is a ``ValueError`` naming ``names`` and ``p``; a non-zero gap that
    float64 flushes to zero is a ``ValueError`` too; a non-zero gap below the smallest normal
    number of ``dtype`` is returned in float64.
    """
    acc_dtype = nearest_sq_dists.dtype if nearest_sq_dists.device.type == "mps" else torch.float64
    values = nearest_sq_dists.to(acc_dtype)
    powered = values if p == 2.0 else values.pow(p / 2.0)
    gap = powered.mean()
    value = float(gap)
    power = "" if p == 2.0 else f" with `p`={p:g}"
    if not value <= torch.finfo(dtype).max:  # also inf and NaN
        over = dtype if math.isfinite(value) else acc_dtype
        shown = "is" if not math.isfinite(value) else f"is {value:.3g},"
        also = " or pass float64 tensors" if over != torch.float64 else ""
        smaller_p = ", use a smaller `p`" if p > 2.0 else ""
        raise ValueError(
            f"the gap (mean ||y - z||^p{power}) of {_who(names)} {shown} too large for {over} "
            f"(largest {torch.finfo(over).max:.3g}): the data's scale is out of range; rescale "
            f"the data (the gap scales as s^p){smaller_p}{also}."
        )
    if value < torch.finfo(acc_dtype).tiny and bool((values > 0).any()):
        raise ValueError(
            f"the gap (mean ||y - z||^p{power}) of {_who(names)} is non-zero but below the "
            f"smallest normal {acc_dtype} number ({torch.finfo(acc_dtype).tiny:.3g}); rescale the "
            "data (the gap scales as s^p) or use a smaller `p`."
        )
    if 0.0 < value < torch.finfo(dtype).tiny:
        return gap  # float64: the output dtype would flush it to zero
    return gap.to(dtype)


def _who(names: Sequence[str]) -> str:
    return " and ".join(f"`{n}`" for n in dict.fromkeys(names))
