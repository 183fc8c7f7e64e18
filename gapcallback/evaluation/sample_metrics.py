r"""The k-NN family beside the gap, when asked: precision, recall, density, coverage, authenticity.

``GapCallback(metrics=...)``, ``gc.evaluate(metrics=...)`` and ``gapcallback evaluate --metrics``
stream the same samples into the Metrics of the family (:class:`~gapcallback.PrecisionRecall`
and :class:`~gapcallback.DensityCoverage` against the references, :class:`~gapcallback.
Authenticity` against the training set), each an optional part of the evaluation (a failure
leaves its keys out and is recorded), reduced across processes by their own states. Keys:

==========================  ===================================================================
``knn/precision``           fraction of samples inside the references' k-NN manifold (k = 3)
``knn/recall``              fraction of references inside the samples' k-NN manifold (k = 3)
``knn/density``             mean number of reference balls (k = 5) holding a sample, over k
``knn/coverage``            fraction of references whose ball (k = 5) holds a sample
``knn/authenticity``        fraction of samples farther from their nearest training point than
                            that point is from its own nearest training neighbour
==========================  ===================================================================

No figure is drawn for them: they are scalars per evaluation, and the loggers plot their history.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from gapcallback.metrics.authenticity import Authenticity
from gapcallback.metrics.density_coverage import DensityCoverage
from gapcallback.metrics.precision_recall import PrecisionRecall

__all__ = ["SAMPLE_METRICS", "SAMPLE_METRIC_PARTS", "SampleMetrics", "check_sample_metrics"]

SAMPLE_METRICS = ("precision", "recall", "density", "coverage", "authenticity")
"""The names ``metrics=`` takes."""

SAMPLE_METRIC_PARTS = ("knn/precision_recall", "knn/density_coverage", "knn/authenticity")
"""The optional parts they form (one Metric each), as recorded when one fails."""

_PART_OF = {
    "precision": "knn/precision_recall",
    "recall": "knn/precision_recall",
    "density": "knn/density_coverage",
    "coverage": "knn/density_coverage",
    "authenticity": "knn/authenticity",
}


def check_sample_metrics(metrics: object, *, has_train: bool | None = None) -> tuple[str, ...]:
    """``metrics`` as a tuple of names of :data:`SAMPLE_METRICS` (order kept, duplicates
    dropped), or a ``ValueError``/``TypeError`` naming ``metrics``; ``authenticity`` needs a
    training set (checked when ``has_train`` is known)."""
    if metrics is None:
        return ()
    if isinstance(metrics, str) or not isinstance(metrics, Iterable):
        raise TypeError(
            f"`metrics` must be a sequence of names from {list(SAMPLE_METRICS)}, got {metrics!r}"
            " (a single name goes in a tuple: metrics=('precision',))."
        )
    names: list[str] = []
    for name in metrics:
        if name not in SAMPLE_METRICS:
            raise ValueError(f"`metrics` has {name!r}, which is not one of {list(SAMPLE_METRICS)}.")
        if name not in names:
            names.append(name)
    if "authenticity" in names and has_train is False:
        raise ValueError(
            "`metrics` asks for 'authenticity', which compares samples with the training set: "
            "pass `train=`, or leave 'authenticity' out."
        )
    return tuple(names)


class SampleMetrics:
    """The Metrics behind ``metrics=`` names, fed the same blocks of samples.

    Args:
        names: names from :data:`SAMPLE_METRICS`.
        reference: ``[m, *dims]`` the reference points (the "real" set).
        train: ``[n, *dims]`` the training points (for ``authenticity``).
        device: where the Metrics live.
        failed: where to record a part that cannot be built on these points (e.g. ``k`` larger
            than the references allow), which is then left out; ``None``: raise instead.
    """

    def __init__(
        self,
        names: Sequence[str],
        reference: Tensor,
        train: Tensor | None = None,
        device: torch.device | str = "cpu",
        failed: dict[str, str] | None = None,
    ) -> None:
        self.names = check_sample_metrics(names, has_train=train is not None)
        parts = {_PART_OF[name] for name in self.names}
        builders = {
            "knn/precision_recall": lambda: PrecisionRecall(reference),
            "knn/density_coverage": lambda: DensityCoverage(reference),
            "knn/authenticity": lambda: Authenticity(train),  # type: ignore[arg-type]
        }
        self.metrics: dict[str, Metric] = {}
        for part in SAMPLE_METRIC_PARTS:
            if part not in parts:
                continue
            try:
                self.metrics[part] = builders[part]().to(device)
            except (ValueError, TypeError) as err:
                if failed is None:
                    raise
                failed[part] = f"{type(err).__name__}: {err}"

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def to(self, device: torch.device | str) -> SampleMetrics:
        for part, metric in self.metrics.items():
            self.metrics[part] = metric.to(device)
        return self

    def update(self, samples: Tensor, failed: dict[str, str]) -> None:
        """Stream ``samples`` into every Metric whose part has not failed; a failure is recorded
        in ``failed`` (part -> reason) and that part is skipped from then on."""
        for part, metric in self.metrics.items():
            if part in failed:
                continue
            try:
                metric.update(samples)
            except Exception as err:
                failed[part] = f"{type(err).__name__}: {err}"

    def compute(self, failed: dict[str, str]) -> dict[str, float]:
        """The asked keys of every part that did not fail anywhere (``failed`` is the merged
        record: every process skips the same parts, so their collectives match)."""
        values: dict[str, float] = {}
        for part, metric in self.metrics.items():
            if part in failed:
                continue
            try:
                result = metric.compute()
            except (ValueError, RuntimeError) as err:
                failed[part] = f"{type(err).__name__}: {err}"
                continue
            if isinstance(result, Tensor):
                named = {"authenticity": result}
            else:
                named = dict(result._asdict())
            for name, value in named.items():
                if name in self.names:
                    values[f"knn/{name}"] = float(value)
        return {
            f"knn/{name}": values[f"knn/{name}"] for name in self.names if f"knn/{name}" in values
        }
