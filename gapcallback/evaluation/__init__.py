"""One evaluation of a model's samples, shared by the callback, ``gc.evaluate`` and the CLI.

* :mod:`.prepared`: the reference (and training) points with their data-only quantities
  (:func:`prepare_reference`, :class:`PreparedReference`);
* :mod:`.measurement`: the local states of an evaluation over blocks of samples, then the
  collectives (:class:`SampleMeasurement`);
* :mod:`.values`: the pure derivation of the logged keys (:func:`measured_values`);
"""

from gapcallback.evaluation.measurement import MeasuredSamples, SampleMeasurement
from gapcallback.evaluation.prepared import (
    GapEvaluationWarning,
    PreparedReference,
    prepare_reference,
)
from gapcallback.evaluation.values import EVALUATION_KEYS, gap_values, measured_values

__all__ = [
    "EVALUATION_KEYS",
    "GapEvaluationWarning",
    "MeasuredSamples",
    "PreparedReference",
    "SampleMeasurement",
    "gap_values",
    "measured_values",
    "prepare_reference",
]
