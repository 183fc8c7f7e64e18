r"""The numeric range of a search: screen scaling, and the cast of exact distances to the output.

The GEMM (or FFT) screen works on centred data scaled by a power of two (exact) whenever the
centred magnitudes leave :math:`[2^{-30}, 2^{30}]`, so that its products neither overflow nor fall
into the subnormal range where rounding errors are absolute and the screen's slack no longer
bounds them (:func:`screen_exponent`, :func:`ldexp`, :func:`centred_magnitude`).

Every search returns exact squared distances in float64 (float32 on MPS) and casts them to the
output dtype by one rule (:func:`output_sq_dists`): a squared distance too large for it raises
:class:`DistanceRangeError`; a non-zero squared distance below its smallest normal number (which
the cast would flush to zero, and zero means a duplicate) keeps the float64 values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "SCREEN_EXPONENT",
    "DistanceRangeError",
    "centred_magnitude",
    "check_underflow",
    "exact_dtype",
    "ldexp",
    "output_sq_dists",
    "range_message",
    "screen_exponent",
]

SCREEN_EXPONENT = 30
"""Screen operands are rescaled when the centred magnitudes leave ``2^[-30, 30]``."""


class DistanceRangeError(ValueError):
    """Squared distances that a floating dtype cannot hold, raised inside a search.

    The public entry points catch it and raise a ``ValueError`` naming the user's own arguments
    (:meth:`message`); raised from a :class:`~gapcallback.symmetry.Symmetry`'s ``knn`` called
    directly, its message names ``queries`` and ``points``.

    Attributes:
        kind: ``"overflow"`` or ``"underflow"``.
        dtype: the dtype that cannot hold the values.
        value: the offending squared distance (largest for an overflow, smallest for an underflow).
    """

    def __init__(self, kind: str, dtype: torch.dtype, value: float) -> None:
        self.kind = kind
        self.dtype = dtype
        self.value = value
        super().__init__(self.message(("queries", "points")))

    def message(self, names: Sequence[str]) -> str:
        """The error message, naming the user's arguments ``names`` (one or two)."""
        return range_message(self.kind, self.dtype, self.value, names)


def range_message(kind: str, dtype: torch.dtype, value: float, names: Sequence[str]) -> str:
    """Message of a squared distance (or gap) ``value`` outside the range of ``dtype``."""
    a, b = (names[0], names[-1]) if names else ("queries", "points")
    who = f"points of `{a}`" if a == b else f"`{a}` and `{b}`"
    info = torch.finfo(dtype)
    if kind == "overflow":
        shown = "are" if not math.isfinite(value) else f"reach {value:.3g},"
        fix = "rescale the data (e.g. divide it by its standard deviation)"
        if dtype != torch.float64:
            fix += " or pass float64 tensors"
        return (
            f"squared distances between {who} {shown} too large for {dtype} (largest "
            f"{info.max:.3g}): the data's scale is out of range; {fix}."
        )
    return (
        f"squared distances between {who} go down to {value:.3g}, below the smallest normal "
        f"{dtype} number ({info.tiny:.3g}), so they cannot be represented; rescale the data (e.g. "
        "multiply it by 2**500)."
    )


def output_sq_dists(values: Tensor, dtype: torch.dtype) -> Tensor:
    r"""Cast exact squared distances (float64) to the output ``dtype``: the rule of every search.

    * a value too large for ``dtype`` (or non-finite: beyond float64 itself) raises
      :class:`DistanceRangeError` (a ``ValueError``): the distances cannot be returned in ``dtype``,
      rescale the data or pass float64 tensors;
    * if some non-zero value is below the smallest normal number of ``dtype`` (float32:
      :math:`1.2 \cdot 10^{-38}`), the cast would flush it to zero (or keep only a few bits), and a
      distance of zero means a duplicate: ``values`` are returned unchanged, in float64;
    * otherwise ``values.to(dtype)``.

    Exact zeros (duplicates) stay exactly zero. ``values`` already in ``dtype`` are only checked.
    """
    if values.numel() == 0:
        return values.to(dtype)
    info = torch.finfo(dtype)
    top = float(values.max())
    if not top <= info.max:  # also NaN
        over = values.dtype if not math.isfinite(top) else dtype
        raise DistanceRangeError("overflow", over, top)
    if values.dtype == dtype:
        return values
    small = (values > 0) & (values < info.tiny)
    if bool(small.any()):
        return values
    return values.to(dtype)


def check_underflow(sq: Tensor, diff: Tensor) -> None:
    """Raise :class:`DistanceRangeError` when a squared distance ``sq`` ``[T]`` (or ``[T, G]``) of
    differences ``diff`` ``[T, D]`` (``[T, G, D]``) lost a non-zero difference to underflow."""
    tiny = torch.finfo(sq.dtype).tiny
    small = sq < tiny
    if bool(small.any()) and bool((diff[small] != 0).any()):
        raise DistanceRangeError(
            "underflow", sq.dtype, float(sq[small & (diff != 0).any(-1)].min())
        )


def exact_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of exact re-checks: float64, or ``dtype`` on MPS (which has no float64)."""
    return dtype if device.type == "mps" else torch.float64


def centred_magnitude(x: Tensor, centre: Tensor) -> float:
    """``max |x - centre|`` over all entries of ``x`` ``[N, D]`` (no ``[N, D]`` copy).

    Two reductions, ``amin`` and ``amax``: on torch 2.13's CPU kernels ``torch.aminmax(x, dim=0)``
    took 4-13x as long as both together."""
    lo, hi = x.amin(dim=0), x.amax(dim=0)
    return float(torch.maximum(hi - centre, centre - lo).amax())


def screen_exponent(*magnitudes: float) -> int:
    """Power of two ``s`` bringing the largest of ``magnitudes`` near 1, or 0 when it is within
    ``2^[-30, 30]`` (or zero, or not finite: left to the finiteness checks)."""
    top = max(magnitudes)
    if not (top > 0.0 and math.isfinite(top)):
        return 0
    e = math.frexp(top)[1]  # top = f * 2**e with 0.5 <= f < 1
    if -SCREEN_EXPONENT <= e <= SCREEN_EXPONENT:
        return 0
    return max(-1000, min(1000, -e))


def ldexp(x: Tensor, exponent: int) -> Tensor:
    """``x * 2**exponent``, exact unless it under/overflows, in steps the dtype can represent."""
    while exponent:
        step = max(-100, min(100, exponent))
        x = x * (2.0**step)
        exponent -= step
    return x
