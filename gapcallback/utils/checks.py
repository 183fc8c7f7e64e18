"""Input validation shared by every public entry point.

Each helper raises a ``TypeError`` or ``ValueError`` whose message names the argument, the
problem and the fix, so that bad input never turns into a silent NaN further down.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_point_set(
    x: object, name: str, *, allow_empty: bool = False, finite: bool = True
) -> Tensor:
    """Validate a set of points ``[N, *feature_dims]`` and return it unchanged.

    Checks: a ``torch.Tensor``; real floating dtype (fp16, bf16, fp32, fp64); at least two
    dimensions (``[N, D]`` or ``[N, C, H, W]`` ...); non-empty unless ``allow_empty``; finite
    (skipped with ``finite=False`` by callers that detect NaN/Inf more cheaply themselves).
    """
    if not isinstance(x, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape [N, D] (or [N, *dims]), got {type(x).__name__}."
            " Convert it first, e.g. torch.as_tensor(array, dtype=torch.float32)."
        )
    if x.is_complex() or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"`{name}` has dtype {x.dtype}; distances need a real floating dtype "
            "(float16, bfloat16, float32 or float64). Cast it, e.g. `x.float()`."
        )
    if x.ndim < 2:
        raise ValueError(
            f"`{name}` must have shape [N, D] (one row per point), got shape {tuple(x.shape)}."
            " For N scalar points use `x.unsqueeze(-1)`; for a single point use `x.unsqueeze(0)`."
        )
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"`{name}` is empty (shape {tuple(x.shape)}); pass at least one point.")
    if x[0].numel() == 0:
        raise ValueError(
            f"`{name}` has zero features per point (shape {tuple(x.shape)}); each point needs D >= 1."
        )
    if finite:
        check_finite(x, name)
    return x


def check_finite(x: Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or +-Inf, saying how many and where to look."""
    if x.numel() == 0:
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad_rows = (~finite.reshape(x.shape[0], -1)).any(dim=1) if x.ndim >= 2 else ~finite
        n_bad = int(bad_rows.sum())
        first = int(bad_rows.nonzero()[0, 0])
        raise ValueError(
            f"`{name}` contains NaN or Inf in {n_bad} of {bad_rows.numel()} rows (first: row {first})."
            " Remove or repair those points, e.g. `x = x[torch.isfinite(x).flatten(1).all(1)]`."
        )


def check_same_device(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` if two tensors live on different devices."""
    if a.device != b.device:
        raise ValueError(
            f"`{name_a}` is on {a.device} but `{name_b}` is on {b.device}; move both to one device,"
            f" e.g. `{name_b}.to({name_a}.device)`."
        )


def check_same_features(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise ``ValueError`` if two point sets differ in their per-point shape."""
    if a.shape[1:] != b.shape[1:] and a[0].numel() != b[0].numel():
        raise ValueError(
            f"`{name_a}` has points of shape {tuple(a.shape[1:])} ({a[0].numel()} features) but "
            f"`{name_b}` has {tuple(b.shape[1:])} ({b[0].numel()} features); both must describe "
            "points of the same space. Apply the same preprocessing/`transform` to both."
        )
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"`{name_a}` has points of shape {tuple(a.shape[1:])} but `{name_b}` has "
            f"{tuple(b.shape[1:])}; reshape them to the same per-point shape."
        )


def check_positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as ``int`` after checking it is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return value


def check_exponent(p: object, name: str = "p") -> float:
    """Return the loss exponent ``p`` as a float after checking ``0 < p < inf``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"`{name}` must be a positive number (the loss is ||y - z||^p), got {p!r}.")
    p = float(p)
    if not (p > 0.0 and p < float("inf")):
        raise ValueError(
            f"`{name}` must be a finite positive number, got {p}; p = 2 is the default."
        )
    return p


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The accumulation dtype: float64 if any input is float64, else float32 (never below fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
