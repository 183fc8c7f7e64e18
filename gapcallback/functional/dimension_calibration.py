r"""The default ``"calibrated"`` intrinsic-dimension estimate: data statistics read off references.

:func:`calibrate` computes the raw Levina-Bickel MLE :math:`\hat m` and the mean neighbour cosine
:math:`\bar c` of a point set (:func:`~gapcallback.functional.dimension_references.geometry_stats`)
and maps them to a dimension with the same statistics on simulated reference families
(:mod:`gapcallback.functional.dimension_references`); the method itself is described in
:mod:`gapcallback.functional.dimension`, whose
:func:`~gapcallback.functional.dimension.intrinsic_dimension_estimate` validates the options and
calls it.

* :func:`calibration_sizes`: a set of more than
  :data:`~gapcallback.functional.dimension_references.MAX_REFERENCE_POINTS` points is split into
  equal chunks, compared with references of the chunk size (:func:`reference_size`).
* :class:`References`: the reference statistics one estimate reads, from the shipped table
  (:mod:`gapcallback.functional.calibration_table`) where it holds them, else simulated.
* :func:`family_reading`: one family's dimension for the observed :math:`\hat m`, and its cosine.
* :func:`match_references`: the families bracketing the observed :math:`\bar c`, interpolated.

No state of its own: a :class:`References` lives for one estimate (it only remembers whether it
announced a simulation); the memo of the simulations is
:func:`~gapcallback.functional.dimension_references.reference_stats` (bounded, documented there),
the loaded table :func:`~gapcallback.functional.calibration_table.load_table`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gapcallback.functional.dimension_references import (
    CALIBRATION_DIMS,
    MAX_CALIBRATION_DIM,
    MAX_REFERENCE_POINTS,
    REFERENCE_FAMILIES,
    geometry_stats,
    reference_stats,
)
from gapcallback.functional.nearest_neighbours import KNNResult
from gapcallback.utils.log import get_logger

__all__ = [
    "ReferenceReader",
    "References",
    "calibrate",
    "calibration_sizes",
    "check_references",
    "family_reading",
    "match_references",
    "reference_size",
]

ReferenceReader = Callable[[str, int], tuple[float, float]]
"""``refs(family, dim) -> (raw MLE, mean cosine)`` at one ``(n, k, seed)``, e.g. a
:class:`References`."""

_LOG = get_logger("intrinsic_dimension")


def check_references(references: object) -> tuple[str, ...]:
    """``references`` as a non-empty tuple of distinct names from ``REFERENCE_FAMILIES``, in that
    order; ``TypeError``/``ValueError`` otherwise."""
    if isinstance(references, str) or not isinstance(references, (Sequence, set, frozenset)):
        raise TypeError(
            "`references` must be a sequence of family names from "
            f"{REFERENCE_FAMILIES}, got {type(references).__name__}."
        )
    names = tuple(references)
    bad = [f for f in names if f not in REFERENCE_FAMILIES]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(
            f"`references` must be distinct names from {REFERENCE_FAMILIES}, got {names!r}."
        )
    return tuple(f for f in REFERENCE_FAMILIES if f in names)


def calibration_sizes(n: int) -> tuple[int, int, int]:
    """``(chunks, points per chunk, reference size)`` of the calibration of ``n`` points.

    ``chunks = ceil(n / 4000)`` equal chunks of ``n // chunks`` points (so 2000 to 4000 points each
    above 4000), compared with references of that size rounded by :func:`reference_size`: never
    more than 4000, so inside the shipped table (sizes 11 to 4000) for every ``n`` that ``k = 10``
    neighbours allow.
    """
    chunks = max(1, math.ceil(n / MAX_REFERENCE_POINTS))
    size = n // chunks
    return chunks, size, reference_size(size)


def reference_size(n: int) -> int:
    """Simulated points per reference sample: ``n`` to 3 significant digits, so that the cache also
    serves sets whose size varies slightly between calls (dropped duplicates); the MLE bias moves
    with :math:`\\log n`, so 0.5% in ``n`` changes nothing measurable."""
    if n < 1000:
        return n
    step = 10 ** (len(str(n)) - 3)
    return round(n / step) * step


class References:
    """The reference statistics one ``"calibrated"`` estimate reads: ``refs(family, dim)`` is the
    ``(raw MLE, mean cosine)`` of ``family`` in dimension ``dim`` at one ``(n, k, seed)``.

    Read from the shipped table (:mod:`gapcallback.functional.calibration_table`: ``k = 10``,
    ``seed = 0`` and every reference size the estimator uses) where it holds them, so nothing is
    simulated; otherwise simulated by
    :func:`~gapcallback.functional.dimension_references.reference_stats` (memoised for the
    process), and the first simulation of the estimate is announced by one INFO line on the
    ``gapcallback`` logger.

    Attributes:
        n, k, seed: the references' size, neighbours and simulation seed.
        tabulated: whether the shipped table holds them.
    """

    def __init__(self, n: int, k: int, seed: int) -> None:
        # Imported on first use, not at import: importing the package must not import the table
        # module, so that `python -m gapcallback.functional.calibration_table` runs it only once.
        from gapcallback.functional import calibration_table

        self.n, self.k, self.seed = n, k, seed
        self.tabulated = calibration_table.covers(n, k, seed)
        self._lookup = calibration_table.lookup
        self._announced = False
        # What this reader has read (one estimate reads each (family, dim) about five times:
        # the estimate and the delta method's four shifted readings); at most families x grid.
        self._read: dict[tuple[str, int], tuple[float, float]] = {}

    def __call__(self, family: str, dim: int) -> tuple[float, float]:
        key = (family, dim)
        if key not in self._read:
            self._read[key] = self._read_one(family, dim)
        return self._read[key]

    def _read_one(self, family: str, dim: int) -> tuple[float, float]:
        if self.tabulated:
            value = self._lookup(family, dim, self.n, self.k, self.seed)
            if value is not None:
                return value
        misses = reference_stats.cache_info().misses
        value = reference_stats(family, dim, self.n, self.k, self.seed)
        if not self._announced and reference_stats.cache_info().misses > misses:
            self._announced = True
            _LOG.info(
                "calibrating the intrinsic-dimension estimator for k=%d, seed=%d at n=%d reference"
                " points (not in the shipped table, which holds k=10, seed=0): simulating the"
                " reference families; this takes a while; cached for this process",
                self.k,
                self.seed,
                self.n,
            )
        return value


def family_reading(family: str, raw: float, refs: ReferenceReader, top: int) -> tuple[float, float]:
    """Dimension ``d_f`` at which ``family``'s raw MLE equals ``raw`` (linear interpolation on the
    grid, over the monotone envelope, at most ``top``), and the family's mean neighbour cosine there.

    The grid is walked only until the reference statistic passes ``raw`` or a grid dimension
    reaches ``top`` (the fixed grid
    :data:`~gapcallback.functional.dimension_references.CALIBRATION_DIMS`, whatever ``top``, so
    that every ambient dimension reads the shipped table); every grid value is seeded by its own
    key, so the reading does not depend on what is cached.
    """
    dims: list[float] = []
    raws: list[float] = []
    coss: list[float] = []
    for dim in CALIBRATION_DIMS:
        value, cos = refs(family, dim)
        dims.append(float(dim))
        raws.append(max(value, raws[-1]) if raws else value)
        coss.append(cos)
        if value > raw or dim >= top:
            break
    if raw <= raws[0]:
        return dims[0] * raw / raws[0], coss[0]
    d = dims[-1] if raw >= raws[-1] else float(np.interp(raw, raws, dims))
    d = min(d, float(top))
    return d, float(np.interp(d, dims, coss))


def match_references(
    raw: float,
    cos: float,
    refs: ReferenceReader,
    ambient: int,
    families: tuple[str, ...] = REFERENCE_FAMILIES,
) -> tuple[float, dict[str, float]]:
    """Map the observed ``(raw, cos)`` to a dimension and the weights of the reference families.

    Each family reads its own dimension :math:`d_f` off ``raw`` (:func:`family_reading`, at most
    the ambient dimension) and predicts a cosine :math:`c_f(d_f)`; the families are sorted by
    :math:`c_f` and :math:`\\hat d` interpolated linearly in ``cos`` between the two that bracket
    it (the nearest family outside the range).
    """
    top = min(MAX_CALIBRATION_DIM, max(ambient, 2))
    readings = sorted((*family_reading(f, raw, refs, top)[::-1], f) for f in families)
    cs = [r[0] for r in readings]
    if cos <= cs[0]:
        return readings[0][1], {readings[0][2]: 1.0}
    if cos >= cs[-1]:
        return readings[-1][1], {readings[-1][2]: 1.0}
    i = int(np.searchsorted(cs, cos, side="right"))
    (c0, d0, f0), (c1, d1, f1) = readings[i - 1], readings[i]
    t = (cos - c0) / (c1 - c0) if c1 > c0 else 0.5
    return (1.0 - t) * d0 + t * d1, {f0: 1.0 - t, f1: t}


def calibrate(
    points: Tensor,
    k: int,
    seed: int,
    families: tuple[str, ...] = REFERENCE_FAMILIES,
    neighbours: KNNResult | None = None,
) -> tuple[float, float, dict[str, Any]]:
    """The calibrated estimate of validated, deduplicated ``[N, D]`` points.

    Args:
        points: ``[N, D]`` distinct points, ``N > k``.
        k: neighbours (>= 2).
        seed: simulation seed of the references (>= 0; also seeds the split into chunks).
        families: reference families (:func:`check_references`).
        neighbours: a precomputed ``[N, k]`` leave-one-out search of ``points`` (read when the
            points make one chunk).

    Returns:
        ``(dimension, standard error, details)``, the details as in
        :class:`~gapcallback.functional.dimension.DimensionEstimate` (``k``, ``raw``, ``cos``,
        ``calibration_points``, ``reference_points``, ``chunks``, ``reference``, ``tabulated``).
    """
    n = points.shape[0]
    chunks, size, ref_n = calibration_sizes(n)
    if chunks == 1:
        s, c = geometry_stats(points, k, neighbours)
    else:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(points.device)
        parts = [geometry_stats(points[perm[i * size : (i + 1) * size]], k) for i in range(chunks)]
        s = torch.cat([p[0] for p in parts])
        c = torch.cat([p[1] for p in parts])
    m = s.numel()
    s_mean = float(s.mean())
    if s_mean <= 0:
        raise ValueError("All k nearest-neighbour distances are equal; the MLE is undefined.")
    raw, cos = (k - 1) / s_mean, float(c.mean())
    refs = References(ref_n, k, seed)
    ambient = points.shape[1]
    d, fam = match_references(raw, cos, refs, ambient, families)
    # Delta method on (raw, cos): per-point covariance of (s_i, c_i), central differences of the map.
    cov = torch.cov(torch.stack([s, c])).numpy() / m if m > 1 else np.zeros((2, 2))
    h_raw, h_cos = 1e-3 * raw, 1e-3 * max(abs(cos), 1e-2)
    grad_raw = (
        match_references(raw + h_raw, cos, refs, ambient, families)[0]
        - match_references(raw - h_raw, cos, refs, ambient, families)[0]
    ) / (2 * h_raw)
    grad_cos = (
        match_references(raw, cos + h_cos, refs, ambient, families)[0]
        - match_references(raw, cos - h_cos, refs, ambient, families)[0]
    ) / (2 * h_cos)
    # d(raw)/d(mean s) = -raw / mean s
    g = np.array([grad_raw * (-raw / s_mean), grad_cos])
    std = math.sqrt(max(float(g @ cov @ g), 0.0))
    details = {
        "k": k,
        "raw": raw,
        "cos": cos,
        "calibration_points": size,
        "reference_points": ref_n,
        "chunks": chunks,
        "reference": fam,
        "tabulated": refs.tabulated,
    }
    return d, std, details
