"""Input validation shared by every public entry point.

Each helper raises a ``TypeError`` or ``ValueError`` whose message names the argument, the
problem and the fix, so that bad input never turns into a silent NaN further down.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_point_set(
    x: object, name: str, *, allow_empty: bool = False, finite: bool = True
) -> Tensor:
    """Validate a set of points ``[N, *feature_dims]`` and return it unchanged.

    Checks: a ``torch.Tensor`` (numpy arrays and lists are refused with a ``TypeError`` saying how
    to convert them, as torchmetrics does); real floating dtype (fp16, bf16, fp32, fp64); not on
    the ``meta`` device (no data); at least two dimensions (``[N, D]`` or ``[N, C, H, W]`` ...);
    at least one feature; non-empty unless ``allow_empty``; finite (skipped with ``finite=False``
    by callers that detect NaN/Inf more cheaply themselves).
    """
    if not isinstance(x, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of shape [N, D] (or [N, *dims]), got {type(x).__name__}."
            f" Convert it first, e.g. `{name} = torch.as_tensor({name}, dtype=torch.float32)`."
        )
    if x.is_complex() or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"`{name}` has dtype {x.dtype}; distances need a real floating dtype "
            f"(float16, bfloat16, float32 or float64). Cast it, e.g. `{name}.float()`."
        )
    if x.device.type == "meta":
        raise ValueError(
            f"`{name}` is on the meta device: it has a shape {tuple(x.shape)} but no data, so no "
            "distance can be computed; pass a tensor holding the actual points (materialise it "
            "on 'cpu' or 'cuda' first)."
        )
    if x.ndim < 2:
        raise ValueError(
            f"`{name}` must have shape [N, D] (one row per point), got shape {tuple(x.shape)}."
            f" For N scalar points use `{name}.unsqueeze(-1)`; for a single point use "
            f"`{name}.unsqueeze(0)`."
        )
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(
            f"`{name}` has zero features per point (shape {tuple(x.shape)}); each point needs D >= 1."
        )
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"`{name}` is empty (shape {tuple(x.shape)}); pass at least one point.")
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


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` after checking it is a ``bool`` (``0``/``1``/strings are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    """Return ``value`` after checking it is one of the strings ``choices``.

    The error lists the valid names and, for a near miss (``"twonnn"``), suggests the closest one.
    """
    if not isinstance(value, str) or value not in choices:
        close = difflib.get_close_matches(value, choices, n=1) if isinstance(value, str) else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}.{hint}"
        )
    return value


def check_number(
    value: object,
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict: bool = False,
    allow_none: bool = False,
    allow_inf: bool = False,
) -> float | None:
    """Return a real number ``value`` as ``float`` after checking its type and range.

    Refuses ``bool``, complex and non-numbers (``TypeError``), NaN always and ``+-inf`` unless
    ``allow_inf`` (``ValueError``). ``minimum``/``maximum`` bound it (excluded with ``strict``).
    ``allow_none`` lets ``None`` through unchanged.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        expected = "a real number" + (" or None" if allow_none else "")
        raise TypeError(f"`{name}` must be {expected}, got {value!r}.")
    out = float(value)
    if math.isnan(out) or (math.isinf(out) and not allow_inf):
        raise ValueError(f"`{name}` must be a finite number, got {out}.")
    low_bad = minimum is not None and (out <= minimum if strict else out < minimum)
    high_bad = maximum is not None and (out >= maximum if strict else out > maximum)
    if low_bad or high_bad:
        lo = "" if minimum is None else f"{'>' if strict else '>='} {minimum:g}"
        hi = "" if maximum is None else f"{'<' if strict else '<='} {maximum:g}"
        raise ValueError(f"`{name}` must be {' and '.join(b for b in (lo, hi) if b)}, got {out:g}.")
    return out


def check_optional_int(value: object, name: str, *, minimum: int = 1) -> int | None:
    """``None``, or an integer ``>= minimum`` (see :func:`check_positive_int`)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be None or an int >= {minimum}, got {value!r}.")
    return check_positive_int(int(value), name, minimum=minimum)


def check_known_keys(options: Mapping[str, Any], name: str, valid: Sequence[str]) -> None:
    """Raise ``TypeError`` naming the keys of ``options`` that are not in ``valid`` (and the valid ones).

    ``name`` describes where the options go, e.g. ``"law_options (GapLaw.fit)"``.
    """
    unknown = [key for key in options if key not in valid]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), valid, n=1)
            if close:
                hints.append(f"{key!r} -> {close[0]!r}?")
        hint = f" ({', '.join(hints)})" if hints else ""
        raise TypeError(
            f"Unknown key(s) {sorted(map(str, unknown))} in `{name}`{hint}; valid keys are "
            f"{list(valid)}."
        )
