r"""Representation gap: mean distance from held-out references to the nearest model sample.

.. math:: R = \frac{1}{m} \sum_{i=1}^{m} \min_{j} \lVert y_i - z_j \rVert^p

(with ``symmetry``: :math:`\min_{j,\,g \in G} \lVert y_i - g z_j \rVert^p`). It is the optimal-transport
cost when every reference may go to its nearest sample, a lower bound on :math:`W_p^p` between data
and model and on the generalization error of any predictor whose outputs are the samples' support.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gapcallback.functional.knn import knn
from gapcallback.utils.checks import check_exponent

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
        every reference point is among the samples.

    Example:
        >>> import torch
        >>> from gapcallback.functional import representation_gap
        >>> representation_gap(torch.zeros(3, 2), torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        tensor(0.)
    """
    p = check_exponent(p)
    nearest = knn(reference, samples, 1, symmetry=symmetry).sq_dists[:, 0]
    return gap_from_sq_dists(nearest, p)


def gap_from_sq_dists(nearest_sq_dists: Tensor, p: float = 2.0) -> Tensor:
    r"""Mean of ``d^p`` from nearest squared distances ``[m]``: :math:`\frac1m\sum_i (d_i^2)^{p/2}`.

    Accumulates in float64 (where the device has it) and returns the input's dtype.
    """
    acc_dtype = nearest_sq_dists.dtype if nearest_sq_dists.device.type == "mps" else torch.float64
    values = nearest_sq_dists.to(acc_dtype)
    if p != 2.0:
        values = values.pow(p / 2.0)
    return values.mean().to(nearest_sq_dists.dtype)
