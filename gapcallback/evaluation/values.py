r"""The values a gap evaluation logs, derived from reduced measurements by pure functions.

An evaluation (of :class:`~gapcallback.GapCallback`, :func:`~gapcallback.evaluate` or the
command line) runs in three steps, as Lightning's ``EarlyStopping`` keeps
``_evaluate_stopping_criteria`` apart from ``reduce_boolean_decision``:

1. *local states* on every process (:class:`~gapcallback.evaluation.measurement.SampleMeasurement`):
   the gap metric's running minima, the memorization count, the number of samples drawn, the
   optional parts that failed, the dimension reservoir;
2. *collectives*: those counts travel as one packed tensor (:func:`pack_counts`) summed over
   processes (the metrics reduce their states through their own ``compute``);
3. *pure derivation*: :func:`unpack_counts` and :func:`merge_failures` read the summed tensor back
   and :func:`gap_values` does the arithmetic (:func:`measured_values` from a prepared reference
   and the reduced measurements); the same inputs give the same keys wherever they are computed,
   so the callback, ``evaluate`` and the command line cannot drift.

With observed gap :math:`R`, the law :math:`R_n = J n^{-p/d}` and ``n_train`` training points:

* ``gap/predicted`` :math:`= J\, n_\text{train}^{-p/d}`;
* ``gap/ratio`` :math:`= R / \text{predicted}` (:math:`R / R_\text{mem}` without a law);
* ``gap/memorized_fraction`` :math:`=` memorized / drawn samples over all processes;
* ``gap/effective_n`` :math:`= (J / R)^{d/p}`, the training-set size at which the law reaches
  :math:`R`. It is ``nan`` where it is not a training-set size the law supports: below the
  smallest size the law was measured at (a model far from the law early in training, or samples
  on another scale; e.g. 0.12 or 0.0) and where :math:`R = 0` (infinite). Values above
  ``n_train`` are extrapolations: the model generalizes beyond its training set.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from gapcallback.evaluation.sample_metrics import SAMPLE_METRIC_PARTS, SAMPLE_METRICS
from gapcallback.law import GapLaw

if TYPE_CHECKING:
    from gapcallback.evaluation.measurement import MeasuredSamples
    from gapcallback.evaluation.prepared import PreparedReference

__all__ = [
    "EVALUATION_KEYS",
    "SHARED_PARTS",
    "ReducedCounts",
    "effective_training_size",
    "gap_values",
    "measured_values",
    "merge_failures",
    "pack_counts",
    "unpack_counts",
]

EVALUATION_KEYS = (
    "gap/observed",
    "gap/memorization",
    "gap/predicted",
    "gap/ratio",
    "gap/effective_n",
    "gap/memorized_fraction",
    "id/data",
    "id/samples",
    "id/law",
    *(f"knn/{name}" for name in SAMPLE_METRICS),
)
"""Every key one evaluation may give (:func:`measured_values`), in this order."""

SHARED_PARTS = ("gap/memorized_fraction", "id/samples", *SAMPLE_METRIC_PARTS)
"""Optional parts of an evaluation whose failure on any process leaves them out on every one."""

FAILED_ELSEWHERE = "it failed on another process"
"""The reason :func:`merge_failures` records for a part that failed on another process only."""


class ReducedCounts(NamedTuple):
    """The callback's own states summed over processes (:func:`unpack_counts`).

    Attributes:
        memorized: samples that copy a training point, over all processes.
        drawn: samples drawn, over all processes.
        failed: the parts of :data:`SHARED_PARTS` that failed on at least one process.
    """

    memorized: float
    drawn: float
    failed: frozenset[str]


def pack_counts(
    memorized: float,
    drawn: float,
    failed: Collection[str],
    device: torch.device | str | None = None,
) -> Tensor:
    """One process's counts as one float64 tensor whose sum over processes :func:`unpack_counts` reads.

    Layout: ``[memorized, drawn, failed flag of each part of SHARED_PARTS]``.
    """
    flags = [float(part in failed) for part in SHARED_PARTS]
    return torch.tensor(
        [float(memorized), float(drawn), *flags], dtype=torch.float64, device=device
    )


def unpack_counts(summed: Tensor) -> ReducedCounts:
    """Read the sum over processes of :func:`pack_counts` tensors."""
    values = summed.detach().cpu().tolist()
    if len(values) != 2 + len(SHARED_PARTS):
        raise ValueError(
            f"Expected {2 + len(SHARED_PARTS)} packed counts (pack_counts), got {len(values)}."
        )
    failed = frozenset(p for p, f in zip(SHARED_PARTS, values[2:], strict=True) if f > 0)
    return ReducedCounts(memorized=values[0], drawn=values[1], failed=failed)


def merge_failures(local: Mapping[str, str], counts: ReducedCounts) -> dict[str, str]:
    """This process's failed parts (part -> reason) plus those that failed on another process."""
    failed = dict(local)
    for part in SHARED_PARTS:
        if part in counts.failed:
            failed.setdefault(part, FAILED_ELSEWHERE)
    return failed


def effective_training_size(law: GapLaw, observed: float) -> float:
    r""":math:`(J / R)^{d/p}`, or ``nan`` outside the sizes the law supports
    (:meth:`GapLaw.effective_size <gapcallback.law.GapLaw.effective_size>`)."""
    return law.effective_size(observed)


def gap_values(
    observed: float,
    *,
    memorized_fraction: float | None = None,
    counts: ReducedCounts | None = None,
    memorization_gap: float | None = None,
    law: GapLaw | None = None,
    n_train: int | None = None,
    data_dimension: float | None = None,
    sample_dimension: float | None = None,
) -> dict[str, float]:
    """The logged values (unprefixed keys) of one evaluation; absent inputs give absent keys.

    Args:
        observed: the gap of the references to the model's samples.
        memorized_fraction: fraction of samples that copy a training point.
        counts: reduced counts (:func:`unpack_counts`): the fraction is ``memorized / drawn``
            unless ``gap/memorized_fraction`` failed somewhere (or nothing was drawn). Give either
            this or ``memorized_fraction``.
        memorization_gap: the gap of the references to the training set.
        law: the fitted gap law.
        n_train: training-set size (default ``law.n_train``).
        data_dimension: intrinsic dimension of the data.
        sample_dimension: intrinsic dimension of the samples.

    Example:
        >>> counts = unpack_counts(pack_counts(3, 100, []) + pack_counts(1, 100, []))
        >>> gap_values(0.5, counts=counts, memorization_gap=0.25)
        {'gap/observed': 0.5, 'gap/memorized_fraction': 0.02, 'gap/memorization': 0.25, 'gap/ratio': 2.0}
    """
    if memorized_fraction is not None and counts is not None:
        raise ValueError("Give `memorized_fraction` or `counts`, not both.")
    if counts is not None and "gap/memorized_fraction" not in counts.failed and counts.drawn > 0:
        memorized_fraction = counts.memorized / counts.drawn
    values: dict[str, float] = {"gap/observed": float(observed)}
    if memorized_fraction is not None:
        values["gap/memorized_fraction"] = float(memorized_fraction)
    if memorization_gap is not None:
        values["gap/memorization"] = float(memorization_gap)
    denominator = None
    if law is not None:
        predicted = float(law.predict(n_train or law.n_train))
        values["gap/predicted"] = predicted
        values["id/law"] = float(law.dimension)
        values["gap/effective_n"] = effective_training_size(law, observed)
        denominator = predicted
    elif memorization_gap:
        denominator = memorization_gap
    if denominator:
        values["gap/ratio"] = float(observed) / denominator
    if data_dimension is not None:
        values["id/data"] = float(data_dimension)
    if sample_dimension is not None:
        values["id/samples"] = float(sample_dimension)
    return values


def measured_values(prepared: PreparedReference, measured: MeasuredSamples) -> dict[str, float]:
    """The keys of one evaluation from a prepared reference and the reduced measurements of the
    samples: :func:`gap_values` with the reference's law, memorization line, training-set size
    and data dimension, and the ``knn/*`` values of the family when asked. The one function the callback, ``evaluate`` and the CLI derive through."""
    values = gap_values(
        measured.observed,
        counts=measured.counts,
        memorization_gap=prepared.memorization_gap,
        law=prepared.law,
        n_train=prepared.n_train,
        data_dimension=prepared.data_dimension,
        sample_dimension=measured.sample_dimension,
    )
    values.update(measured.sample_metrics)
    return values
