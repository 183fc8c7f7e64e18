r"""Streaming representation gap as a ``torchmetrics.Metric``.

State: one running minimum of squared distance per reference point, reduced across processes by an
elementwise ``min`` (no list/cat states; memory ``O(len(reference))`` whatever the number of
samples). :meth:`compute` returns :math:`\frac1m \sum_i (\min_j \lVert y_i - z_j\rVert^2)^{p/2}`.

The state holds the exact squared distances in float64 (float32 on a device without float64, such
as MPS), so that float32 data at tiny scales is not flushed to zero between updates; the gap follows
the range rule of :func:`gapcallback.functional.representation_gap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric

from gapcallback.functional.gap import gap_value
from gapcallback.functional.nearest_neighbours import exact_knn
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
        reference: ``[m, D]`` (or ``[m, *dims]``) held-out data points, a floating
            ``torch.Tensor`` (convert numpy arrays with ``torch.as_tensor``); stored as a
            non-persistent buffer, so it follows ``.to(device)``. Kept across :meth:`reset`.
        p: loss exponent (default 2).
        symmetry: optional :class:`gapcallback.symmetry.Symmetry` for orbit distances.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``...).

    Attributes:
        nearest_sq_dists: ``[m]`` running minimum squared distance per reference point (``inf``
            until a sample has been seen), exact: float64 (float32 on devices without float64).

    Raises:
        TypeError: a ``reference`` or ``samples`` that is not a floating ``torch.Tensor`` (numpy
            arrays and lists: convert with ``torch.as_tensor(x, dtype=torch.float32)``), a bad
            ``p`` or ``symmetry``.
        ValueError: empty, NaN/Inf, ``meta`` or mis-shaped inputs, samples on another device.

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
        if symmetry is not None:
            from gapcallback.symmetry.base import Symmetry

            if not isinstance(symmetry, Symmetry):
                raise TypeError(
                    "`symmetry` must be a gapcallback.symmetry object (FiniteGroup, CyclicShifts, "
                    f"RigidMotions, Permutations) or None, got {type(symmetry).__name__}."
                )
            symmetry.check_shape(reference, "reference")
        self.symmetry = symmetry
        #: dtype of the gap :meth:`compute` returns (the reference's: float32 or float64).
        self.gap_dtype = compute_dtype(reference)
        state_dtype = reference.dtype if reference.device.type == "mps" else torch.float64
        self.register_buffer("reference", reference.detach().clone(), persistent=False)
        self.add_state(
            "nearest_sq_dists",
            default=torch.full((reference.shape[0],), float("inf"), dtype=state_dtype),
            dist_reduce_fx="min",
        )

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # The float64 state cannot move to a device without float64 (MPS): keep it in float32
        # there, the precision of that device's exact distances.
        return super()._apply(_Float64Fallback(fn), *args, **kwargs)

    def update(self, samples: Tensor) -> None:
        """Lower each reference point's running minimum with a batch of samples ``[B, *dims]``.

        ``samples`` must be a floating ``torch.Tensor`` on the metric's device (numpy arrays and
        lists: convert with ``torch.as_tensor``), with the reference's per-point shape.
        """
        samples = check_point_set(samples, "samples", finite=self.symmetry is not None)
        if samples.device != self.reference.device:
            raise ValueError(
                f"`samples` are on {samples.device} but the metric (and its `reference`) is on "
                f"{self.reference.device}; move the metric with `metric.to({str(samples.device)!r})`"
                " or the samples with `samples.to(metric.device)`."
            )
        nearest = exact_knn(
            self.reference, samples, 1, symmetry=self.symmetry, names=("reference", "samples")
        ).sq_dists[:, 0]
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
        return gap_value(self.nearest_sq_dists, self.p, self.gap_dtype, ("reference", "samples"))

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


class _Float64Fallback:
    """Wraps a tensor function of ``Module._apply``: a float64 tensor that cannot move where ``fn``
    sends it (a device without float64) is moved as float32 instead. ``str`` is ``fn``'s, which
    torchmetrics inspects to recognise dtype conversions."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __str__(self) -> str:
        return str(self.fn)

    def __call__(self, t: Tensor) -> Tensor:
        try:
            return self.fn(t)
        except (TypeError, RuntimeError):
            if not isinstance(t, Tensor) or t.dtype != torch.float64:
                raise
            return self.fn(t.float())
