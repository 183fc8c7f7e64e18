r"""Streaming representation gap as a ``torchmetrics.Metric``.

State: one running minimum of squared distance per reference point, reduced across processes by an
elementwise ``min`` (no list/cat states; memory ``O(len(reference))`` whatever the number of
samples). :meth:`compute` returns :math:`\frac1m \sum_i (\min_j \lVert y_i - z_j\rVert^2)^{p/2}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric

from gapcallback.functional.knn import knn
from gapcallback.functional.representation_gap import gap_from_sq_dists
from gapcallback.utils.checks import check_exponent, check_point_set, compute_dtype

if TYPE_CHECKING:
    from gapcallback.symmetry.base import Symmetry

__all__ = ["RepresentationGap"]


class RepresentationGap(Metric):
    r"""Representation gap of a stream of model samples against fixed reference points.

    .. math:: R = \frac{1}{m} \sum_{i=1}^{m} \min_{j} \lVert y_i - z_j \rVert^p

    Each :meth:`update` takes a batch of samples ``[B, D]`` (or ``[B, *dims]``) and lowers the
    per-reference running minima; the result is identical to
    :func:`gapcallback.functional.representation_gap` on all samples at once, in one process or
    across processes (DDP: the minima are reduced with ``min``).

    Args:
        reference: ``[m, D]`` (or ``[m, *dims]``) held-out data points; stored as a non-persistent
            buffer, so it follows ``.to(device)``. Kept across :meth:`reset`.
        p: loss exponent (default 2).
        symmetry: optional :class:`gapcallback.symmetry.Symmetry` for orbit distances.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``...).

    Attributes:
        nearest_sq_dists: ``[m]`` running minimum squared distance per reference point (``inf``
            until a sample has been seen).

    Example:
        >>> import torch
        >>> from gapcallback import RepresentationGap
        >>> metric = RepresentationGap(torch.zeros(4, 3))
        >>> metric.update(torch.ones(10, 3))
        >>> metric.update(torch.zeros(1, 3))
        >>> metric.compute()
        tensor(0.)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    plot_lower_bound = 0.0

    nearest_sq_dists: Tensor
    reference: Tensor

    def __init__(
        self,
        reference: Tensor,
        *,
        p: float = 2.0,
        symmetry: Symmetry | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        reference = check_point_set(reference, "reference")
        self.p = check_exponent(p)
        self.symmetry = symmetry
        dtype = compute_dtype(reference)
        self.register_buffer("reference", reference.detach().clone(), persistent=False)
        self.add_state(
            "nearest_sq_dists",
            default=torch.full((reference.shape[0],), float("inf"), dtype=dtype),
            dist_reduce_fx="min",
        )

    def update(self, samples: Tensor) -> None:
        """Lower each reference point's running minimum with a batch of samples ``[B, *dims]``."""
        if samples.device != self.reference.device:
            raise ValueError(
                f"`samples` are on {samples.device} but the metric's reference is on "
                f"{self.reference.device}; move the metric with `.to({samples.device})` or the "
                "samples with `.to(metric.device)`."
            )
        nearest = knn(self.reference, samples, 1, symmetry=self.symmetry).sq_dists[:, 0]
        self.nearest_sq_dists = torch.minimum(
            self.nearest_sq_dists, nearest.to(self.nearest_sq_dists.dtype)
        )

    def compute(self) -> Tensor:
        """The gap over all samples seen (0-dim tensor); raises if no sample was seen."""
        if bool(torch.isinf(self.nearest_sq_dists).any()):
            raise RuntimeError(
                "RepresentationGap.compute() was called before any samples were seen (on any "
                "process); call `update(samples)` first."
            )
        return gap_from_sq_dists(self.nearest_sq_dists, self.p)

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Plot a single value or a sequence of values (e.g. one per epoch); needs matplotlib.

        Args:
            val: a value or a list of values returned by :meth:`compute`/:meth:`forward`; if
                ``None``, the current :meth:`compute` value.
            ax: a matplotlib axis to draw into; a new figure if ``None``.

        Returns:
            ``(figure, axis)``.
        """
        return self._plot(val, ax)
