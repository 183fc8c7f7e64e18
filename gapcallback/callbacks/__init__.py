"""Lightning callbacks."""

from gapcallback.callbacks.early_stopping import GapEarlyStopping
from gapcallback.callbacks.gap_callback import GapCallback, GapEvaluationWarning
from gapcallback.callbacks.gradient_snr import GradientSNR

__all__ = ["GapCallback", "GapEarlyStopping", "GapEvaluationWarning", "GradientSNR"]
