r"""Streaming authenticity (Alaa et al. 2022) as a ``torchmetrics.Metric``.

The training set's 1-NN distances are computed once at construction; each sample is authentic or
not on its own (:mod:`gapcallback.functional.authentic`), so the states are two int64 sums, the
samples seen and the authentic ones, reduced across processes by ``sum``. Memory ``O(n D)`` for
the training set, blocks for the searches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gapcallback.functional.authentic import authentic_samples, train_sq_radii
from gapcallback.functional.knn_balls import fraction
from gapcallback.metrics.feature_metric import FeatureMetric, Transform
from gapcallback.utils.checks import compute_dtype

__all__ = ["Authenticity"]


class Authenticity(FeatureMetric):
    r"""Fraction of a stream of samples that are authentic with respect to a training set.

    .. math:: \text{authentic}(z) = \Big[\lVert z - x_{i^*}\rVert >
        \min_{l \ne i^*} \lVert x_{i^*} - x_l\rVert\Big], \qquad i^* = \arg\min_i \lVert z - x_i\rVert

    (higher is better; a copy of a training point is never authentic; ties count as unauthentic:
    :mod:`gapcallback.functional.authentic`). Equal to :func:`gapcallback.functional.authenticity`
    on all samples at once, in one process or across processes.

    Args:
        train: ``[n, *dims]`` the model's training set (a floating ``torch.Tensor``), ``n >= 2``
            after ``transform``; kept as a non-persistent buffer, with its 1-NN distances
            computed once.
        transform: optional feature map applied without gradients to ``train`` once and to every
            batch of samples; not moved by ``.to()`` nor saved.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        TypeError: non-tensor or non-float inputs, a non-callable ``transform``.
        ValueError: empty, NaN/Inf or mis-shaped inputs, fewer than 2 training points, samples on
            another device.

    Example:
        >>> import torch
        >>> from gapcallback.metrics import Authenticity
        >>> train = torch.randn(100, 3, generator=torch.Generator().manual_seed(0))
        >>> metric = Authenticity(train)
        >>> metric.update(train[:25])  # copies: not authentic
        >>> metric.update(train[25:50] + 100.0)  # far from everything: authentic
        >>> metric.compute()
        tensor(0.5000)
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    n_samples: Tensor
    n_authentic: Tensor

    def __init__(self, train: Tensor, *, transform: Transform | None = None, **kwargs: Any) -> None:
        super().__init__(train, k=1, name="train", sample_name="samples", transform=transform,
                         **kwargs)  # fmt: skip
        self.add_state("n_samples", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("n_authentic", default=torch.tensor(0), dist_reduce_fx="sum")

    def fixed_radii(self, points: Tensor) -> Tensor:
        """``[n]`` squared distance of each training point to its nearest other one (once)."""
        return train_sq_radii(points)

    def update(self, samples: Tensor) -> None:
        """Add a batch of samples ``[B, *dims]``: count the authentic ones."""
        samples = self.batch(samples)
        authentic = authentic_samples(samples, self.points, self.radii())
        self.n_authentic += authentic.sum().to(self.n_authentic)
        self.n_samples += samples.shape[0]

    def compute(self) -> Tensor:
        """The authentic fraction of every sample seen (0-dim tensor in the dtype of ``train``:
        float32, or float64)."""
        self.check_seen(self.n_samples)
        return fraction(self.n_authentic, self.n_samples, compute_dtype(self.points))
