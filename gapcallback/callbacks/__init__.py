"""Lightning callbacks."""

from gapcallback.callbacks.curvature_diagnostics import GeneralizationDiagnostics
from gapcallback.callbacks.early_stopping import GapEarlyStopping
from gapcallback.callbacks.gap_callback import GapCallback, GapEvaluationWarning
from gapcallback.callbacks.gradient_snr import GradientSNR
from gapcallback.callbacks.prediction_gap_callback import PredictionGapCallback

__all__ = [
    "GapCallback",
    "GapEarlyStopping",
    "GapEvaluationWarning",
    "GeneralizationDiagnostics",
    "GradientSNR",
    "PredictionGapCallback",
]
