"""``torchmetrics.Metric`` classes over the functional layer."""

from gapcallback.metrics.representation_gap import RepresentationGap

__all__ = ["RepresentationGap"]
