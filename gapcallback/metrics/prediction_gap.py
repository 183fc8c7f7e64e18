r"""Streaming gap of a prediction task as a ``torchmetrics.Metric``.

:class:`PredictionGap` is :class:`~gapcallback.metrics.RepresentationGap` on the joint vectors
:math:`[x, w\,y]` (:func:`gapcallback.functional.prediction.joint_points`): its state is one running
minimum per reference pair, reduced across processes by ``min``; each :meth:`update` takes a batch
of probe inputs and the model's predictions there.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gapcallback.functional.prediction import check_y_weight, joint_points
from gapcallback.metrics.representation_gap import RepresentationGap

__all__ = ["PredictionGap"]


class PredictionGap(RepresentationGap):
    r"""Gap of a predictor: held-out pairs :math:`(x_i, y_i)` to the model's probe pairs.

    .. math:: R = \frac1m \sum_i \min_j \left(\lVert x_i - x'_j \rVert^2
        + w^2 \lVert y_i - y'_j \rVert^2\right)^{p/2}

    Equal to :func:`gapcallback.functional.prediction_gap` on all probes at once, in one process
    or across processes.

    Args:
        ref_x: ``[m, *x_dims]`` held-out inputs.
        ref_y: ``[m, *y_dims]`` their targets (floating: one-hot for classes).
        y_weight: :math:`w > 0`, the weight of the targets in the distance.
        p: loss exponent.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from gapcallback import PredictionGap
        >>> x = torch.linspace(0, 1, 20).unsqueeze(1)
        >>> metric = PredictionGap(x, 3 * x)
        >>> metric.update(x, 3 * x + 0.1)  # a constant error 0.1: the risk is 0.01
        >>> gap = float(metric.compute())  # the graph passes closer to (x_i, y_i) elsewhere
        >>> round(gap, 4), gap <= 0.1**2
        (0.0063, True)
    """

    def __init__(
        self,
        ref_x: Tensor,
        ref_y: Tensor,
        *,
        y_weight: float = 1.0,
        p: float = 2.0,
        **kwargs: Any,
    ) -> None:
        self.y_weight = check_y_weight(y_weight)
        reference = joint_points(ref_x, ref_y, y_weight=self.y_weight, names=("ref_x", "ref_y"))
        super().__init__(reference, p=p, **kwargs)

    def update(self, probe_x: Tensor, probe_y: Tensor) -> None:  # type: ignore[override]
        """Lower each reference pair's running minimum with probe pairs ``(x'_j, y'_j)``."""
        probe = joint_points(probe_x, probe_y, y_weight=self.y_weight, names=("probe_x", "probe_y"))
        if probe.shape[1] != self.reference.shape[1]:
            raise ValueError(
                f"The probe pairs have {probe.shape[1]} joint features but the reference pairs "
                f"{self.reference.shape[1]}: `probe_x`/`probe_y` must have the shapes of "
                "`ref_x`/`ref_y`."
            )
        super().update(probe)
