"""``torchmetrics.Metric`` classes over the functional layer."""

from gapcallback.metrics.authenticity import Authenticity
from gapcallback.metrics.density_coverage import DensityCoverage
from gapcallback.metrics.intrinsic_dimension import IntrinsicDimension
from gapcallback.metrics.precision_recall import PrecisionRecall
from gapcallback.metrics.prediction_gap import PredictionGap
from gapcallback.metrics.representation_gap import RepresentationGap

__all__ = [
    "Authenticity",
    "DensityCoverage",
    "IntrinsicDimension",
    "PrecisionRecall",
    "PredictionGap",
    "RepresentationGap",
]
