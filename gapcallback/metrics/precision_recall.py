r"""Streaming improved precision and recall (Kynkäänniemi et al. 2019) as a ``torchmetrics.Metric``.

States (the formulas: :mod:`gapcallback.functional.precision_and_recall`):

* ``n_fake``, ``n_precise``: int64 sums, the fakes seen and those inside the real manifold. The
  real radii are fixed (computed once at construction), so precision streams exactly: each
  :meth:`~PrecisionRecall.update` adds its batch's count; DDP reduces by ``sum``.
* ``fake_points``: the fake features themselves (``cat``). Recall is the fraction of real points
  inside the *fake* manifold, whose radii are k-NN distances among **all** fakes: a later fake can
  shrink an earlier fake's ball, so no bounded summary of the fakes seen so far decides recall
  exactly. The metric keeps the fakes (at most ``max_fake`` per process, a clear error beyond)
  and computes recall once in :meth:`~PrecisionRecall.compute`, on the fakes of every process
  (DDP: gathered by ``cat``; recall depends on the set of fakes only, not on their order, so the
  value equals one process's). Memory ``O(M D)`` for the fakes, ``O(N D)`` for the reals, blocks
  for the searches: never ``N x M``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from gapcallback.functional.knn_balls import fraction
from gapcallback.functional.precision_and_recall import (
    PrecisionRecallResult,
    precision_count,
    recall_value,
)
from gapcallback.metrics.feature_metric import FeatureMetric, Transform
from gapcallback.utils.checks import check_optional_int, compute_dtype

__all__ = ["PrecisionRecall"]


class PrecisionRecall(FeatureMetric):
    r"""Precision and recall of a stream of fakes against fixed real points, on k-NN manifolds.

    .. math:: \text{precision} = \frac1M \sum_j \big[y_j \in \mathcal M(X)\big], \qquad
        \text{recall} = \frac1N \sum_i \big[x_i \in \mathcal M(Y)\big]

    (closed balls of k-NN radii; :mod:`gapcallback.functional.precision_and_recall`). Equal to
    :func:`gapcallback.functional.precision_recall` on all fakes at once, in one process or across
    processes (module docstring: how each state streams and reduces).

    Args:
        real: ``[N, *dims]`` real points (a floating ``torch.Tensor``), ``N >= k + 1`` after
            ``transform``; kept as a non-persistent buffer (follows ``.to(device)``), with its
            k-NN radii computed once.
        k: neighbourhood size (Kynkäänniemi et al.: 3).
        transform: optional feature map (e.g. an image encoder) applied without gradients to
            ``real`` once and to every batch of fakes; not moved by ``.to()`` nor saved.
        max_fake: most fake points kept per process for recall (memory ``max_fake * D`` values);
            ``None``: no limit.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        TypeError: non-tensor or non-float inputs, a non-callable ``transform``, bad ``k`` or
            ``max_fake`` types.
        ValueError: empty, NaN/Inf or mis-shaped inputs, ``k`` too large for ``real``, fakes on
            another device, more than ``max_fake`` fakes; in :meth:`compute`, fewer than
            ``k + 1`` fakes (recall needs their k-NN radii).

    Example:
        >>> import torch
        >>> from gapcallback.metrics import PrecisionRecall
        >>> real = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
        >>> metric = PrecisionRecall(real, k=3)
        >>> for batch in real.split(100):
        ...     metric.update(batch)
        >>> metric.compute()
        PrecisionRecallResult(precision=tensor(1.), recall=tensor(1.))
    """

    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    n_fake: Tensor
    n_precise: Tensor
    fake_points: list[Tensor]

    def __init__(
        self,
        real: Tensor,
        k: int = 3,
        *,
        transform: Transform | None = None,
        max_fake: int | None = 100_000,
        **kwargs: Any,
    ) -> None:
        self.max_fake = check_optional_int(max_fake, "max_fake")
        super().__init__(real, k=k, name="real", sample_name="fake", transform=transform, **kwargs)
        self.add_state("n_fake", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("n_precise", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("fake_points", default=[], dist_reduce_fx="cat")

    def update(self, fake: Tensor) -> None:
        """Add a batch of fakes ``[B, *dims]``: count those inside the real manifold, keep them
        for recall."""
        fake = self.batch(fake)
        kept = sum(int(f.shape[0]) for f in self.fake_points)
        if self.max_fake is not None and kept + fake.shape[0] > self.max_fake:
            raise ValueError(
                f"PrecisionRecall keeps the fakes for recall (the fakes' k-NN radii depend on every "
                f"fake): {kept} are kept and this batch of {fake.shape[0]} would exceed "
                f"`max_fake`={self.max_fake}; pass a larger `max_fake` (memory: fakes x "
                f"{fake.shape[1]} values) or None, or reset() the metric."
            )
        self.n_precise += precision_count(fake, self.points, self.radii()).to(self.n_precise)
        self.n_fake += fake.shape[0]
        self.fake_points.append(fake.detach().clone())

    def compute(self) -> PrecisionRecallResult:
        """``(precision, recall)`` over every fake seen (0-dim tensors in the dtype of ``real``:
        float32, or float64)."""
        self.check_seen(self.n_fake)
        fakes = dim_zero_cat(self.fake_points)
        dtype = compute_dtype(self.points)
        precision = fraction(self.n_precise, self.n_fake, dtype)
        recall = recall_value(self.points, fakes, self.k).to(dtype)
        return PrecisionRecallResult(precision, recall)
