r"""Streaming intrinsic dimension as a ``torchmetrics.Metric``, over a bounded, seeded reservoir.

Each point gets a pseudo-random 63-bit key computed from its own bytes and the ``seed``
(:func:`reservoir_keys`, a hash: no generator state), and the metric keeps the ``max_points``
points with the smallest keys (a bottom-k sketch). Because a point's key does not depend on the
batch, the order or the process that saw it, the reservoir of a union is the union of the
reservoirs, pruned: the state is a pair of ``cat`` list states (points, keys) and the result
across DDP processes is exactly the single-process result on all the data. :meth:`compute` orders the kept points by key, so it is
also independent of the order of the updates. Its only mutable state is those two list states
and ``last_estimate``: the keys' multipliers are drawn from the seed at each update, not memoised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from gapcallback.functional.dimension import (
    check_dimension_method,
    intrinsic_dimension_estimate,
)
from gapcallback.utils.checks import check_point_set, check_positive_int

__all__ = ["IntrinsicDimension", "reservoir_keys"]

_MASK63 = (1 << 63) - 1


def reservoir_keys(x: Tensor, seed: int = 0) -> Tensor:
    """The reservoir keys of :class:`IntrinsicDimension`: one 63-bit key per row of ``x``.

    A multilinear hash of the float64 bytes of each row with ``D`` odd multipliers drawn from a
    generator seeded with ``seed``, then mixed; a pure function of the row and the seed (not of the
    batch, its order or the process), so the bottom-k reservoir of a union of batches is the
    union of their reservoirs, pruned.

    Args:
        x: ``[B, D]`` points (any floating dtype and device).
        seed: seed of the multipliers (>= 0).

    Returns:
        ``[B]`` int64 keys in ``[0, 2^63)``, on the CPU.
    """
    bits = x.to(torch.float64).view(torch.int64).cpu()
    gen = torch.Generator().manual_seed(seed)
    multipliers = torch.randint(1, 1 << 62, (bits.shape[1],), generator=gen) * 2 + 1
    h = bits ^ (bits >> 31)
    h = (h * multipliers).sum(dim=1)  # wraps modulo 2^64: a multilinear hash
    for shift, mult in ((33, 0x62A9D9ED799705F5), (28, 0x4BE98134A5976FD3)):
        h = (h ^ (h >> shift)) * mult
    h = h ^ (h >> 32)
    return (h & _MASK63).to(torch.int64)


class IntrinsicDimension(Metric):
    r"""Intrinsic dimension of a stream of points (activations, samples, data batches).

    :meth:`update` adds a batch ``[B, D]`` (or ``[B, *dims]``) to a reservoir of at most
    ``max_points`` points chosen by hash keys (:func:`reservoir_keys`: uniform over distinct
    points, seeded, identical in one process or across DDP processes); :meth:`compute` runs
    :func:`gapcallback.functional.dimension.intrinsic_dimension_estimate` on it. When
    ``max_points`` covers every point seen, the value equals the functional one on those points
    (up to their order, which does not matter for the deterministic methods).

    Args:
        method: estimator name (default ``"calibrated"``), see
            :data:`gapcallback.functional.dimension.METHODS`.
        max_points: reservoir size (memory ``max_points * D`` values).
        seed: seed of the reservoir keys.
        **options: estimator options (``k``, ``dup_tol``, ``fit`` ...; the names each method
            takes are in :data:`~gapcallback.functional.dimension.METHOD_OPTIONS`);
            options named like :class:`torchmetrics.Metric` keyword arguments
            (``sync_on_compute``, ``process_group``, ``dist_sync_fn`` ...) go to the base class.

    Raises:
        ValueError: an unknown ``method`` (the error names the closest valid one), an option value
            out of range, ``max_points < 3`` or ``seed < 0``.
        TypeError: an option ``method`` does not take (listing those it does), or an argument of
            the wrong type.

    Attributes:
        last_estimate: the :class:`DimensionEstimate` of the last :meth:`compute` (with ``std``).

    Example:
        >>> import torch
        >>> from gapcallback.metrics.intrinsic_dimension import IntrinsicDimension
        >>> metric = IntrinsicDimension(max_points=2000)
        >>> g = torch.Generator().manual_seed(0)
        >>> basis = torch.randn(3, 8, generator=g)
        >>> for _ in range(4):
        ...     metric.update(torch.rand(500, 3, generator=g) @ basis)
        >>> round(float(metric.compute()))
        3
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0

    _METRIC_KWARGS = (
        "compute_on_cpu",
        "dist_sync_on_step",
        "process_group",
        "dist_sync_fn",
        "distributed_available_fn",
        "sync_on_compute",
        "compute_with_cache",
    )

    def __init__(
        self,
        method: str = "calibrated",
        max_points: int = 10000,
        seed: int = 0,
        **options: Any,
    ) -> None:
        metric_kwargs = {k: options.pop(k) for k in self._METRIC_KWARGS if k in options}
        super().__init__(**metric_kwargs)
        # Everything that does not depend on the data fails here, not at the first compute().
        self.options = check_dimension_method(method, options)
        self.method = method
        self.max_points = check_positive_int(max_points, "max_points", minimum=3)
        self.seed = check_positive_int(seed, "seed", minimum=0)
        self.last_estimate: Any = None
        self.add_state("points", default=[], dist_reduce_fx="cat")
        self.add_state("keys", default=[], dist_reduce_fx="cat")

    def update(self, x: Tensor) -> None:
        """Add a batch of points ``[B, D]`` (or ``[B, *dims]``) to the reservoir."""
        x = check_point_set(x, "x")
        flat = x.detach().reshape(x.shape[0], -1)
        if self.points and self.points[0].shape[1] != flat.shape[1]:
            raise ValueError(
                f"`x` has {flat.shape[1]} features per point but earlier batches had "
                f"{self.points[0].shape[1]}; every batch must describe points of the same space."
            )
        keys = reservoir_keys(flat, self.seed).to(flat.device)
        points, keys = self._prune(torch.cat([*self.points, flat]), torch.cat([*self.keys, keys]))
        self.points = [points]
        self.keys = [keys]

    def _prune(self, points: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the ``max_points`` smallest keys, ordered by key (ties: by position)."""
        order = torch.sort(keys, stable=True).indices[: self.max_points]
        return points[order], keys[order]

    def compute(self) -> Tensor:
        """The estimate on the reservoir (0-dim tensor); its uncertainty is in ``last_estimate``."""
        if isinstance(self.points, list) and not self.points:
            raise RuntimeError(
                "IntrinsicDimension.compute() was called before any points were seen (on any "
                "process); call `update(x)` first."
            )
        points, _ = self._prune(dim_zero_cat(self.points), dim_zero_cat(self.keys))
        self.last_estimate = intrinsic_dimension_estimate(points, self.method, **dict(self.options))
        return self.last_estimate.dimension

    def plot(self, val: Tensor | Sequence[Tensor] | None = None, ax: Any = None) -> tuple[Any, Any]:
        """Plot a single value or a sequence of values (e.g. one per epoch); needs matplotlib.

        Args:
            val: a value or a list of values returned by :meth:`compute`; if ``None``, the
                current :meth:`compute` value.
            ax: a matplotlib axis to draw into; a new figure if ``None``.

        Returns:
            ``(figure, axis)``.
        """
        return self._plot(val, ax)
