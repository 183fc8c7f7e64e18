r"""Streaming density and coverage (Naeem et al. 2020) as a ``torchmetrics.Metric``.

Both use only the real points' k-NN radii (computed once at construction), so every state streams
exactly over batches of fakes and reduces without gathering samples (the formulas:
:mod:`gapcallback.functional.density_and_coverage`):

* ``n_fake`` and ``incidences``: int64 sums, the fakes seen and the (fake, real ball) pairs with
  the fake inside the ball; density = incidences / (k * n_fake). DDP: ``sum``.
* ``covered``: ``[N]`` uint8 flags, whether some fake seen lies in real ball ``i``; coverage = their
  mean. DDP: elementwise ``max`` (an ``or``).

Memory ``O(N D)`` for the reals and ``O(N)`` for the states, blocks for the searches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gapcallback.functional.density_and_coverage import (
    DensityCoverageResult,
    coverage_value,
    density_coverage_counts,
    density_value,
)
from gapcallback.metrics.feature_metric import FeatureMetric, Transform
from gapcallback.utils.checks import compute_dtype

__all__ = ["DensityCoverage"]


class DensityCoverage(FeatureMetric):
    r"""Density and coverage of a stream of fakes against fixed real points.

    .. math:: \text{density} = \frac{1}{kM} \sum_{j} \sum_{i} \big[\lVert y_j - x_i\rVert \le
        \rho_k(x_i)\big], \qquad \text{coverage} = \frac1N \sum_{i} \big[\min_j \lVert x_i - y_j
        \rVert \le \rho_k(x_i)\big]

    Equal to :func:`gapcallback.functional.density_coverage` on all fakes at once, in one process
    or across processes (module docstring).

    Args:
        real: ``[N, *dims]`` real points (a floating ``torch.Tensor``), ``N >= k + 1`` after
            ``transform``; kept as a non-persistent buffer, with its k-NN radii computed once.
        k: neighbourhood size (Naeem et al.: 5).
        transform: optional feature map applied without gradients to ``real`` once and to every
            batch of fakes; not moved by ``.to()`` nor saved.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        TypeError: non-tensor or non-float inputs, a non-callable ``transform``, a non-int ``k``.
        ValueError: empty, NaN/Inf or mis-shaped inputs, ``k`` too large for ``real``, fakes on
            another device.

    Example:
        >>> import torch
        >>> from gapcallback.metrics import DensityCoverage
        >>> g = torch.Generator().manual_seed(0)
        >>> real = torch.randn(500, 4, generator=g)
        >>> metric = DensityCoverage(real, k=5)
        >>> metric.update(real[:250] + 10.0)  # far away: in no ball
        >>> metric.update(real.clone())  # copies: each in k balls (its own, k - 1 strictly)
        >>> metric.compute()  # density (500 * 5 / 5) / 750; every ball covered
        DensityCoverageResult(density=tensor(0.6667), coverage=tensor(1.))
    """

    higher_is_better = True
    plot_lower_bound = 0.0

    n_fake: Tensor
    incidences: Tensor
    covered: Tensor

    def __init__(
        self,
        real: Tensor,
        k: int = 5,
        *,
        transform: Transform | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(real, k=k, name="real", sample_name="fake", transform=transform, **kwargs)
        self.add_state("n_fake", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("incidences", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state(
            "covered", default=torch.zeros(self.points.shape[0], dtype=torch.uint8),
            dist_reduce_fx="max",
        )  # fmt: skip

    def update(self, fake: Tensor) -> None:
        """Add a batch of fakes ``[B, *dims]``: their ball incidences and the balls they cover."""
        fake = self.batch(fake)
        incidences, covered = density_coverage_counts(fake, self.points, self.radii())
        self.incidences += incidences.to(self.incidences)
        self.n_fake += fake.shape[0]
        self.covered |= covered.to(self.covered)

    def compute(self) -> DensityCoverageResult:
        """``(density, coverage)`` over every fake seen (0-dim tensors in the dtype of ``real``:
        float32, or float64)."""
        self.check_seen(self.n_fake)
        dtype = compute_dtype(self.points)
        density = density_value(self.incidences, self.n_fake, self.k, dtype)
        return DensityCoverageResult(density, coverage_value(self.covered.bool(), dtype))
