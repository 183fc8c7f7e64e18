r"""The common base of the k-NN family's Metrics: a fixed point set against streamed samples.

:class:`FeatureMetric` holds one fixed set (the real points of
:class:`~gapcallback.metrics.PrecisionRecall` and :class:`~gapcallback.metrics.DensityCoverage`,
the training set of :class:`~gapcallback.metrics.Authenticity`), in a feature space given by an
optional ``transform``, with its exact squared k-NN radii, computed once at construction and kept
(:func:`gapcallback.functional.knn_balls.knn_sq_radii`). Batches of samples go through the same
``transform`` and the same checks before a subclass turns them into states.

The fixed set is a non-persistent buffer (it follows ``.to(device)``, it is not saved in the
``state_dict``); the radii are float64 and follow it lazily, cast to the exact dtype of its device
(float32 on MPS, which has no float64). The states of every subclass are integer counts or flags
and their reduction (``sum``/``max``/``cat``), so no float64 state has to move between devices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from gapcallback.functional.knn_balls import knn_sq_radii
from gapcallback.search import exact_dtype
from gapcallback.utils.checks import check_point_set, check_positive_int, check_same_features

__all__ = ["FeatureMetric", "Transform"]

Transform = Callable[[Tensor], Tensor]
"""A map from a batch of points ``[B, *dims]`` to their features ``[B, *feature_dims]``."""


class FeatureMetric(Metric):
    """Base of the k-NN family's Metrics (module docstring); not used directly.

    Args:
        points: the fixed set ``[N, *dims]``, before ``transform``.
        k: neighbourhood size of the kept radii.
        name: the user's name of ``points`` (``"real"``, ``"train"``), in every error message.
        sample_name: the user's name of the streamed batches (``"fake"``, ``"samples"``).
        transform: optional feature map applied (without gradients) to ``points`` once and to
            every batch; not part of the metric's state (not moved by ``.to()``, not saved).
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    is_differentiable = False
    full_state_update = False

    points: Tensor
    transform: Transform | None

    def __init__(
        self,
        points: Tensor,
        *,
        k: int,
        name: str,
        sample_name: str,
        transform: Transform | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if transform is not None and not callable(transform):
            raise TypeError(
                f"`transform` must be a callable mapping a batch of points to features (e.g. a "
                f"torch.nn.Module) or None, got {type(transform).__name__}."
            )
        # Not registered as a submodule: a feature network is not the metric's state.
        object.__setattr__(self, "transform", transform)
        self.point_name = name
        self.sample_name = sample_name
        self.k = check_positive_int(k, "k")
        points = self.features(points, name)
        self.register_buffer("points", points.detach().reshape(points.shape[0], -1).clone(),
                             persistent=False)  # fmt: skip
        self.point_shape = tuple(points.shape[1:])
        self._radii = self.fixed_radii(self.points)

    def fixed_radii(self, points: Tensor) -> Tensor:
        """``[N]`` exact squared k-NN radii of the fixed set (computed once, at construction)."""
        return knn_sq_radii(points, self.k, name=self.described(self.point_name))

    def described(self, name: str) -> str:
        """How error messages name a set: ``transform(fake)`` when a transform is applied."""
        return f"transform({name})" if self.transform is not None else name

    def features(self, x: Tensor, name: str) -> Tensor:
        """``x`` through the transform (no gradients), validated: a floating, finite, non-empty
        tensor ``[B, *feature_dims]`` with one row per input point."""
        if self.transform is None:
            return check_point_set(x, name)
        rows = len(x) if isinstance(x, Tensor) else None
        with torch.no_grad():
            out = self.transform(x)
        out = check_point_set(out, self.described(name))
        if rows is not None and out.shape[0] != rows:
            raise ValueError(
                f"`transform` must keep one row per point: `{name}` has {rows} points but "
                f"`transform({name})` has shape {tuple(out.shape)}."
            )
        return out

    def batch(self, samples: Tensor) -> Tensor:
        """A streamed batch as ``[B, D]`` features: transformed, validated, on the metric's device,
        with the fixed set's per-point shape."""
        name = self.sample_name
        x = self.features(samples, name)
        if x.device != self.points.device:
            raise ValueError(
                f"`{self.described(name)}` is on {x.device} but the metric (and its "
                f"`{self.point_name}`) is on {self.points.device}; move the metric with "
                f"`metric.to({str(x.device)!r})` or the batch with `{name}.to(metric.device)`."
            )
        reference = self.points.view(self.points.shape[0], *self.point_shape)
        check_same_features(reference, x, self.described(self.point_name), self.described(name))
        return x.reshape(x.shape[0], -1)

    def radii(self) -> Tensor:
        """``[N]`` exact squared k-NN radii of the fixed set, on its current device."""
        device = self.points.device
        if self._radii.device != device:
            self._radii = self._radii.to(exact_dtype(device, self._radii.dtype)).to(device)
        return self._radii

    def check_seen(self, n_samples: Tensor) -> None:
        """Raise if no sample was seen (on any process) before :meth:`compute`."""
        if int(n_samples) == 0:
            raise RuntimeError(
                f"{type(self).__name__}.compute() was called before any `{self.sample_name}` were "
                f"seen (on any process); call `update({self.sample_name})` first."
            )

    def plot(self, val: Any = None, ax: Any = None) -> tuple[Any, Any]:
        """Plot a value or a sequence of values of :meth:`compute`; needs matplotlib.

        Args:
            val: a result of :meth:`compute`/:meth:`forward` (a named tuple of 0-dim tensors, or
                a 0-dim tensor), or a list of them; if ``None``, the current :meth:`compute`.
            ax: a matplotlib axis to draw into; a new figure if ``None``.

        Returns:
            ``(figure, axis)``.
        """
        val = self.compute() if val is None else val
        return self._plot(_plottable(val), ax)


def _plottable(val: Any) -> Any:
    """Named tuples of values as the dicts torchmetrics plots (one line per field)."""
    if hasattr(val, "_asdict"):
        return dict(val._asdict())
    if isinstance(val, Sequence) and val and hasattr(val[0], "_asdict"):
        return [dict(v._asdict()) for v in val]
    return val
