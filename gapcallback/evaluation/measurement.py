r"""One evaluation's measurements of model samples, streamed in blocks, then reduced.

:class:`SampleMeasurement` is the local half of an evaluation, shared by
:class:`~gapcallback.GapCallback` (samples drawn during training) and
:func:`~gapcallback.evaluate` (samples given): each block of samples lowers the gap metric's
per-reference minima, is tested for memorization against the training set, enters the
dimension reservoir and (optionally) the value-range statistics. :meth:`SampleMeasurement.finish`
runs the collectives, in the same order on every process, and returns the reduced
:class:`MeasuredSamples` that :func:`~gapcallback.evaluation.values.measured_values` turns into
the logged keys.

Every state is exact under any split of the samples into blocks or processes: the gap keeps
per-reference minima (``min`` over processes), the memorization count is a sum, the dimension
reservoir keeps the points with the smallest hash keys (:func:`reservoir_keys`). So the callback,
``evaluate`` in one process and ``evaluate`` under ``torchrun`` give the same values.

A failure of the gap itself raises; a failure of an optional part (the memorization test, the
dimension) is recorded in :attr:`SampleMeasurement.failed` and that part is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from gapcallback.evaluation.prepared import PreparedReference
from gapcallback.evaluation.sample_metrics import SampleMetrics
from gapcallback.evaluation.values import (
    ReducedCounts,
    merge_failures,
    pack_counts,
    unpack_counts,
)
from gapcallback.functional.memorized import memorization
from gapcallback.metrics.intrinsic_dimension import IntrinsicDimension
from gapcallback.metrics.representation_gap import RepresentationGap
from gapcallback.symmetry.base import Symmetry
from gapcallback.utils.value_range import FeatureStats

__all__ = ["MEASURE_BLOCK_VALUES", "MeasuredSamples", "SampleMeasurement", "describe_error"]

MEASURE_BLOCK_VALUES = 1 << 22
"""Samples are measured in blocks of up to this many values (16 MB in float32): each search runs
once per block rather than once per sampler call or file batch."""

SumOverProcesses = Callable[[Tensor], Tensor]


def describe_error(err: BaseException) -> str:
    """``"TypeName: message"``, the form failed parts are recorded in."""
    return f"{type(err).__name__}: {err}"


class MeasuredSamples(NamedTuple):
    """The reduced measurements of one evaluation (identical on every process).

    Attributes:
        observed: the gap of the references to the samples.
        counts: memorized and drawn samples over all processes (``None`` without a training
            set of at least 2 points).
        sample_dimension: intrinsic dimension of the samples (``None`` if disabled or failed).
        failed: optional parts that failed on some process -> reason.
        sample_metrics: the ``knn/*`` values asked for (:mod:`.sample_metrics`).
    """

    observed: float
    counts: ReducedCounts | None
    sample_dimension: float | None
    failed: dict[str, str]
    sample_metrics: dict[str, float] = {}  # noqa: RUF012 - a NamedTuple default, never mutated


class SampleMeasurement:
    """The local states of one evaluation over blocks of samples ``[B, *dims]``.

    Args:
        gap: the gap metric on the references (reset here; kept by the caller across
            evaluations so the references stay on their device).
        train: training points on the samples' device (``None``, or fewer than 2 points: no
            memorization test).
        symmetry: orbit distances for the memorization test (the gap metric has its own).
        memorization_ratio: threshold of the memorization test :math:`d_1 < r\\, d_2`.
        dimension: the dimension metric (``None``: no ``id/samples``); reset here.
        stats: value-range statistics to accumulate the samples into (``None``: none).
        sample_metrics: the k-NN family's Metrics to feed (``None``: none); reset here.

    Attributes:
        memorized: memorized samples seen here.
        drawn: samples seen here.
        failed: optional parts that failed here -> reason.
    """

    def __init__(
        self,
        gap: RepresentationGap,
        *,
        train: Tensor | None = None,
        symmetry: Symmetry | None = None,
        memorization_ratio: float = 1.0 / 3.0,
        dimension: IntrinsicDimension | None = None,
        stats: FeatureStats | None = None,
        sample_metrics: SampleMetrics | None = None,
    ) -> None:
        gap.reset()
        if dimension is not None:
            dimension.reset()
        if sample_metrics is not None:
            sample_metrics.reset()
        self.sample_metrics = sample_metrics
        self.gap = gap
        self.train = train if train is not None and train.shape[0] >= 2 else None
        self.symmetry = symmetry
        self.memorization_ratio = memorization_ratio
        self.dimension = dimension
        self.stats = stats
        self.memorized = 0
        self.drawn = 0
        self.failed: dict[str, str] = {}

    @classmethod
    def of(
        cls,
        prepared: PreparedReference,
        *,
        device: torch.device | str = "cpu",
        memorization_ratio: float = 1.0 / 3.0,
        dimension_method: str | None = "calibrated",
        dimension_points: int = 2000,
        seed: int = 0,
        stats: bool = False,
        reference_rows: slice | None = None,
        metrics: tuple[str, ...] = (),
    ) -> SampleMeasurement:
        """A fresh measurement against a :class:`PreparedReference`, on ``device``.

        ``reference_rows`` measures the gap of those reference rows only, with the metric's
        minima kept local (for callers that shard the references and gather the minima
        themselves); by default the gap is of every reference, reduced over processes by the
        metric's ``compute``. ``metrics``: names of the k-NN family to measure too.
        """
        reference = prepared.reference
        if reference_rows is not None:
            reference = reference[reference_rows]
        gap = RepresentationGap(
            reference,
            p=prepared.p,
            symmetry=prepared.symmetry,  # type: ignore[arg-type]
            sync_on_compute=reference_rows is None,
        ).to(device)
        dimension = None
        if dimension_method is not None:
            dimension = IntrinsicDimension(
                method=dimension_method, max_points=dimension_points, seed=seed
            ).to(device)
        train = None if prepared.train is None else prepared.train.to(device)
        return cls(
            gap,
            train=train,
            symmetry=prepared.symmetry,
            memorization_ratio=memorization_ratio,
            dimension=dimension,
            stats=FeatureStats() if stats else None,
            sample_metrics=(
                SampleMetrics(metrics, prepared.reference, prepared.train, device)
                if metrics
                else None
            ),
        )

    @property
    def has_train(self) -> bool:
        return self.train is not None

    def update(self, samples: Tensor) -> None:
        """Stream one block of samples into every state.

        Raises whatever the gap's own update raises (bad samples); the optional parts record
        their failure in :attr:`failed` and are skipped from then on.
        """
        self.update_gap(samples)
        self.update_others(samples)

    def update_gap(self, samples: Tensor) -> None:
        """Lower the gap's per-reference minima with ``samples`` (raises on bad samples)."""
        self.gap.update(samples)

    def update_others(self, samples: Tensor) -> None:
        """Count ``samples`` and stream them into the memorization test, the dimension
        reservoir and the statistics (failures recorded, not raised)."""
        self.drawn += int(samples.shape[0])
        if self.stats is not None:
            self.stats.update(samples)
        if self.sample_metrics is not None:
            self.sample_metrics.update(samples, self.failed)
        if self.dimension is not None and "id/samples" not in self.failed:
            try:
                self.dimension.update(samples)
            except Exception as err:
                self.failed["id/samples"] = describe_error(err)
        if self.train is None or "gap/memorized_fraction" in self.failed:
            return
        try:
            result = memorization(
                samples, self.train, ratio=self.memorization_ratio, symmetry=self.symmetry
            )
        except Exception as err:
            self.failed["gap/memorized_fraction"] = describe_error(err)
            return
        self.memorized += int(result.memorized.sum())

    def finish(
        self,
        sum_over_processes: SumOverProcesses,
        observe: Callable[[RepresentationGap], float] | None = None,
    ) -> MeasuredSamples:
        """Run the collectives (the same on every process, in the same order) and return the
        reduced measurements; no arithmetic on the values beyond the reductions.

        Args:
            sum_over_processes: sums a tensor over processes (the identity in one process;
                ``trainer.strategy.reduce(t, reduce_op="sum")`` in a Lightning run).
            observe: the gap from the metric (default ``float(gap.compute())``, which reduces
                the minima over processes itself).
        """
        observed = float(self.gap.compute()) if observe is None else float(observe(self.gap))
        device = self.gap.reference.device
        packed = pack_counts(self.memorized, self.drawn, self.failed, device=device)
        counts = unpack_counts(sum_over_processes(packed))
        failed = merge_failures(self.failed, counts)
        sample_dimension = None
        if self.dimension is not None and "id/samples" not in failed:
            try:
                sample_dimension = float(self.dimension.compute())
            except (ValueError, RuntimeError) as err:
                failed["id/samples"] = describe_error(err)
        extra = {} if self.sample_metrics is None else self.sample_metrics.compute(failed)
        return MeasuredSamples(
            observed=observed,
            counts=counts if self.has_train else None,
            sample_dimension=sample_dimension,
            failed=failed,
            sample_metrics=extra,
        )
