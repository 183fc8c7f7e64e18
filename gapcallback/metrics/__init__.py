"""``torchmetrics.Metric`` classes over the functional layer."""

from gapcallback.metrics.intrinsic_dimension import IntrinsicDimension
from gapcallback.metrics.prediction_gap import PredictionGap
from gapcallback.metrics.representation_gap import RepresentationGap

__all__ = ["IntrinsicDimension", "PredictionGap", "RepresentationGap"]
