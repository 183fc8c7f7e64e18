r"""The values a gap evaluation logs, derived from reduced measurements by one pure function.

:class:`~gapcallback.GapCallback` reduces its states across processes (the gap metric's minimum,
the memorization counts, the dimension reservoir) and hands plain numbers to
:func:`gap_values`, which does the arithmetic only (as Lightning's ``EarlyStopping`` keeps
``_evaluate_stopping_criteria`` apart from the collective): the same inputs give the same keys
wherever they are computed.

With observed gap :math:`R`, the law :math:`R_n = J n^{-p/d}` and ``n_train`` training points:

* ``gap/predicted`` :math:`= J\, n_\text{train}^{-p/d}`;
* ``gap/ratio`` :math:`= R / \text{predicted}` (:math:`R / R_\text{mem}` without a law);
* ``gap/effective_n`` :math:`= (J / R)^{d/p}`, the training-set size at which the law reaches
  :math:`R`. It is ``nan`` where it is not a training-set size the law supports: below the
  smallest size the law was measured at (a model far from the law early in training, or samples
  on another scale; e.g. 0.12 or 0.0) and where :math:`R = 0` (infinite). Values above
  ``n_train`` are extrapolations: the model generalizes beyond its training set.
"""

from __future__ import annotations

import math

from gapcallback.law import GapLaw

__all__ = ["effective_training_size", "gap_values"]


def effective_training_size(law: GapLaw, observed: float) -> float:
    r""":math:`(J / R)^{d/p}`, or ``nan`` outside the sizes the law supports (see the module doc)."""
    if not observed > 0:
        return math.nan
    effective = float(law.samples_for(observed))
    lowest = float(law.sizes.min()) if law.sizes.numel() else 1.0
    if not (math.isfinite(effective) and effective >= lowest):
        return math.nan
    return effective


def gap_values(
    observed: float,
    *,
    memorized_fraction: float | None = None,
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
        memorization_gap: the gap of the references to the training set.
        law: the fitted gap law.
        n_train: training-set size (default ``law.n_train``).
        data_dimension: intrinsic dimension of the data.
        sample_dimension: intrinsic dimension of the samples.
    """
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
