r"""Are the model's samples on the scale of the reference points? (A check, not a measurement.)

A gap between points of two different value ranges is a plausible-looking wrong number: diffusion
libraries work in :math:`[-1, 1]`, data sets often in :math:`[0, 1]` or :math:`[0, 255]`, and
``gap/ratio`` then reads 185 with no hint of the cause. :class:`FeatureStats` accumulates, in one
pass over batches, the per-feature mean and standard deviation and the overall extremes;
:func:`scale_mismatch` compares the samples' summary with the references' and describes the
mismatch when it is clear.

With per-feature means :math:`\mu_j`, standard deviations :math:`\sigma_j`, the summary scale
:math:`s = (\frac1D\sum_j \sigma_j^2)^{1/2}` and location :math:`c = \frac1D \sum_j \mu_j`, the
samples are flagged when

.. math::

    s_\text{samples} / s_\text{reference} \notin [1/4,\ 4]
    \quad\text{or}\quad
    |c_\text{samples} - c_\text{reference}| > 1.5 \min(s_\text{samples}, s_\text{reference}) ,

which catches :math:`[-1, 1]` against :math:`[0, 1]` (either way round) and :math:`[0, 255]`
against :math:`[0, 1]`, while a model that is merely untrained (samples spread around the data
with a few times its scale) is not flagged. The suggested fix is the affine map
:math:`z \mapsto (z - b) / a` with :math:`a = s_\text{samples} / s_\text{reference}` and
:math:`b = c_\text{samples} - a\, c_\text{reference}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["FeatureStats", "scale_mismatch"]

_SCALE_RATIO = 4.0
_SHIFT_IN_SCALES = 1.5


@dataclass
class FeatureStats:
    """Streaming per-feature first and second moments and extremes of point batches ``[B, *dims]``.

    Accumulated in float64 on the batches' device; :attr:`count` points so far.
    """

    count: int = 0
    total: Tensor | None = None
    total_sq: Tensor | None = None
    low: float = math.inf
    high: float = -math.inf
    _shape: tuple[int, ...] = field(default=(), repr=False)

    def update(self, batch: Tensor) -> None:
        """Add a batch ``[B, *dims]`` (flattened to ``[B, D]``)."""
        flat = batch.detach().reshape(batch.shape[0], -1).to(torch.float64)
        if flat.shape[0] == 0:
            return
        if self.total is None:
            self.total = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
            self.total_sq = torch.zeros_like(self.total)
        assert self.total_sq is not None
        self.total += flat.sum(0).to(self.total.device)
        self.total_sq += flat.square().sum(0).to(self.total.device)
        self.count += flat.shape[0]
        self.low = min(self.low, float(flat.min()))
        self.high = max(self.high, float(flat.max()))

    @property
    def location(self) -> float:
        """:math:`c`, the mean over features of the per-feature means."""
        assert self.total is not None and self.count > 0
        return float(self.total.mean()) / self.count

    @property
    def scale(self) -> float:
        """:math:`s`, the root mean square over features of the per-feature standard deviations."""
        assert self.total is not None and self.total_sq is not None and self.count > 0
        mean = self.total / self.count
        var = (self.total_sq / self.count - mean.square()).clamp_min(0.0)
        return math.sqrt(float(var.mean()))

    def describe(self) -> str:
        return (
            f"mean {self.location:.3g}, std {self.scale:.3g}, values in "
            f"[{self.low:.3g}, {self.high:.3g}]"
        )


def scale_mismatch(reference: FeatureStats, samples: FeatureStats) -> str | None:
    """A one-sentence description of a clear scale mismatch, or ``None`` when there is none.

    Args:
        reference: statistics of the reference points.
        samples: statistics of the model samples (in the same space, after any transform).
    """
    if reference.count < 2 or samples.count < 2:
        return None
    s_ref, s_smp = reference.scale, samples.scale
    c_ref, c_smp = reference.location, samples.location
    tiny = 1e-12 * max(abs(c_ref), abs(c_smp), 1.0)
    if s_ref <= tiny and s_smp <= tiny:
        return None
    ratio = s_smp / max(s_ref, tiny)
    shift = abs(c_smp - c_ref) / max(min(s_ref, s_smp), tiny)
    if 1.0 / _SCALE_RATIO <= ratio <= _SCALE_RATIO and shift <= _SHIFT_IN_SCALES:
        return None
    if s_smp <= tiny or s_ref <= tiny:  # no affine map relates a constant set to a spread one
        which = "samples" if s_smp <= tiny else "reference points"
        return (
            f"samples: {samples.describe()}; reference: {reference.describe()}; the {which} do "
            "not vary (every point is the same), so no change of scale maps one onto the other: "
            "check what the model (or the data loader) returns"
        )
    a = float(f"{ratio:.3g}")
    b = c_smp - ratio * c_ref
    b = 0.0 if abs(b) < 0.01 * s_smp else float(f"{b:.3g}")
    sign = "+" if b >= 0 else "-"
    undo = f"(z {'-' if b >= 0 else '+'} {abs(b):g}) / {a:g}" if b else f"z / {a:g}"
    return (
        f"samples: {samples.describe()}; reference: {reference.describe()}; the samples look like "
        f"{a:g} * reference {sign} {abs(b):g}. If the model works in another range, map its "
        f"samples back with `sample_transform=`, e.g. sample_transform=lambda z: {undo}"
    )
