r"""Intrinsic dimension of a point set: TwoNN, Levina-Bickel MLE, gap slope, and a calibrated default.

Every estimator reads the dimension off nearest-neighbour distances, so it sees the data at the
scale of the neighbour distances (noise inflates the estimate at small scales; curvature and
boundaries bias it at large ones: see :func:`multiscale_dimension` for the estimate vs scale).

``"twonn"`` (Facco et al. 2017)
    :math:`\mu_i = r_{2,i} / r_{1,i}` is Pareto(d) distributed, so
    :math:`\hat d = (N - 1) / \sum_i \log \mu_i` (``fit="mle"``), or the slope of the fit through the
    origin of :math:`-\log(1 - F(\mu))` vs :math:`\log \mu` after discarding the largest
    ``discard`` fraction of :math:`\mu` (``fit="linear"``).
``"mle"`` (Levina and Bickel 2004, pooled as MacKay and Ghahramani 2005)
    :math:`\hat d = (k - 1) / \frac1N \sum_i \sum_{j<k} \log(T_{k,i} / T_{j,i})`, with
    :math:`T_{j,i}` the distance to the j-th neighbour (``k - 1``, not ``k - 2``: the latter is a
    known bug, biased low by :math:`(k-2)/(k-1)`).
``"gap"``
    Subsample a training split at sizes :math:`n_1 < \dots < n_K`, measure the representation gap
    :math:`R_n` of a held-out split, :math:`\hat d = -p / \text{slope}(\log R_n \text{ vs } \log n)`
    (:func:`gap_slope_dimension`).
``"calibrated"`` (default)
    Every nearest-neighbour estimator underestimates large d at small N (a 10-cube with N = 5000
    reads about 8.3), and by how much depends on the geometry: boundaries (cubes) and density
    gradients (Gaussians) bias it low, the compressed chord distances of a flat torus
    :math:`T^{18} \subset \mathbb R^{36}` high (it reads ~22, like :math:`S^{30}`). As in DANCo
    (Ceruti et al. 2014), two statistics of the k nearest neighbours are compared with the same
    statistics on simulated data of known dimension with the same number of points and the same k:

    * the raw Levina-Bickel MLE :math:`\hat m` (as ``"mle"``), which carries the dimension;
    * the mean cosine :math:`\bar c` between the directions :math:`u_j = (x_j - x_i)/\lVert x_j -
      x_i\rVert` to the neighbours, :math:`c_i = (\lVert\sum_j u_j\rVert^2 - k)/(k(k-1))`, which
      tells the geometry apart (about 0 in a uniform flat interior, where the directions are
      independent and isotropic; positive where the neighbours sit on one side: boundaries, density
      gradients, and curvature at the neighbour scale).

    Each reference family :math:`f` (:data:`REFERENCE_FAMILIES`: the sphere :math:`S^d`, the flat
    torus :math:`(S^1)^d` in :math:`\mathbb R^{2d}`, the cube :math:`[0,1]^d` and the standard
    Gaussian :math:`N(0, I_d)`) is simulated for d = 1, 2, ... until its :math:`\hat m` passes the
    observed one; it reads its own :math:`d_f` off :math:`\hat m` (linear interpolation) and
    predicts a cosine :math:`c_f(d_f)`. The families are sorted by :math:`c_f` and :math:`\hat d`
    is interpolated linearly in :math:`\bar c` between the two that bracket the observed cosine
    (the nearest family when it lies outside). The uncertainty is the delta method on
    :math:`(\hat m, \bar c)` with their per-point covariance.

    The grid of simulated dimensions is fixed (1 to 12, then steps of about 15% up to 512): a
    family is read up to the first grid dimension at or above the ambient dimension ``D`` and its
    reading clamped to ``D``. A set of more than 4000 points is split into equal chunks of at most
    4000, compared with references of the chunk size. For the defaults ``k=10, seed=0`` the
    references come from a table shipped with the package
    (:mod:`gapcallback.functional.calibration_table`: every family and grid dimension, 28
    reference sizes from 11 to 4000, interpolated linearly in :math:`\log n`), so no call simulates
    anything, whatever ``N``; other ``k`` or ``seed`` simulate the references once per process
    (announced by one INFO line on the ``gapcallback`` logger; seeded by ``(family, d, n, k,
    seed)`` and memoised by the bounded
    :func:`~gapcallback.functional.dimension_references.reference_stats`), so the estimate is
    deterministic either way.

    The machinery lives in two modules: :mod:`gapcallback.functional.dimension_references` (the
    families, the grid, the statistics and their seeded, memoised simulation) and
    :mod:`gapcallback.functional.dimension_calibration` (chunking, reading the references,
    matching, the delta method); this module validates the options and calls
    :func:`~gapcallback.functional.dimension_calibration.calibrate`.

Duplicates and near-duplicates (distance below ``dup_tol`` times the data's RMS radius) would give
:math:`r_1 = 0` and break every estimator; they are merged first (one representative per group).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from gapcallback.functional.dimension_calibration import calibrate, check_references
from gapcallback.functional.dimension_references import MAX_REFERENCE_POINTS, REFERENCE_FAMILIES
from gapcallback.functional.gap_curve import (
    as_generator,
    fit_line,
    gap_size_grid,
    measure_gap_curve,
    slope_rounding,
)
from gapcallback.functional.nearest_neighbours import KNNResult, exact_knn
from gapcallback.utils.checks import (
    check_choice,
    check_exponent,
    check_known_keys,
    check_number,
    check_point_set,
    check_positive_int,
    check_same_device,
    check_same_features,
    compute_dtype,
)

__all__ = [
    "METHODS",
    "METHOD_OPTIONS",
    "REFERENCE_FAMILIES",
    "DimensionEstimate",
    "GapSlope",
    "MultiscaleDimension",
    "check_dimension_method",
    "deduplicate",
    "gap_slope_dimension",
    "intrinsic_dimension",
    "intrinsic_dimension_estimate",
    "multiscale_dimension",
]


def knn(points: Tensor, other: Tensor, k: int, *, exclude_self: bool = False) -> KNNResult:
    """The estimators' searches: exact float64 squared distances whatever the inputs' dtype (the
    estimators are scale-free: float32 data at any scale is estimated), errors naming ``x``."""
    return exact_knn(points, other, k, exclude_self=exclude_self, names=("x", "x"))


METHODS = ("calibrated", "twonn", "mle", "gap")
"""Names accepted by ``method=``; the first is the default."""

METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "calibrated": ("dup_tol", "k", "seed", "references"),
    "twonn": ("dup_tol", "fit", "discard"),
    "mle": ("dup_tol", "k"),
    "gap": ("dup_tol", "p", "holdout", "sizes", "repeats", "generator"),
}
"""The options each method of :data:`METHODS` accepts (see :func:`intrinsic_dimension_estimate`)."""

DEFAULT_DUP_TOL = 1e-6
"""Default duplicate tolerance, relative to the RMS distance of the points to their mean."""


class DimensionEstimate(NamedTuple):
    """Result of :func:`intrinsic_dimension_estimate`.

    Attributes:
        dimension: 0-dim tensor, the estimate :math:`\\hat d`.
        std: 0-dim tensor, its standard error (analytic delta method, or the spread of the fit).
        method: the method name.
        n_points: points used after merging duplicates.
        details: method-specific extras (``k``, ``raw`` uncalibrated value, ``cos`` mean neighbour
            cosine, ``reference`` family weights and ``tabulated``, whether the references came
            from the shipped table, of ``"calibrated"``; ``sizes``/``gaps`` ...).
    """

    dimension: Tensor
    std: Tensor
    method: str
    n_points: int
    details: dict[str, Any]


class GapSlope(NamedTuple):
    """Result of :func:`gap_slope_dimension`.

    Attributes:
        dimension: 0-dim tensor, :math:`-p / \\text{slope}`.
        std: 0-dim tensor, standard error from the least-squares fit (delta method).
        sizes: ``[K]`` int64 subsample sizes :math:`n_k`.
        gaps: ``[K, repeats]`` representation gaps :math:`R_{n_k}` (one column per repeat).
    """

    dimension: Tensor
    std: Tensor
    sizes: Tensor
    gaps: Tensor


class MultiscaleDimension(NamedTuple):
    """Result of :func:`multiscale_dimension` (ordered from small to large scale).

    Attributes:
        scales: ``[K]`` median neighbour distance at which each estimate looks at the data.
        dimensions: ``[K]`` estimates.
        stds: ``[K]`` standard errors (spread over repeats when ``repeats > 1``, else analytic).
        sizes: ``[K]`` int64 number of points behind each estimate.
    """

    scales: Tensor
    dimensions: Tensor
    stds: Tensor
    sizes: Tensor


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------


def intrinsic_dimension(x: Tensor, method: str = "calibrated", **options: Any) -> Tensor:
    r"""Intrinsic dimension of the points ``x`` (0-dim tensor).

    Args:
        x: ``[N, D]`` or ``[N, *dims]`` points (trailing dimensions flattened).
        method: ``"calibrated"`` (default, the most accurate), ``"twonn"``, ``"mle"`` or ``"gap"``.
        **options: method options, see :func:`intrinsic_dimension_estimate`.

    Returns:
        0-dim tensor on ``x.device`` (float32, float64 for float64 input).

    Example:
        >>> import torch
        >>> from gapcallback.functional import intrinsic_dimension
        >>> g = torch.Generator().manual_seed(0)
        >>> plane = torch.rand(2000, 2, generator=g) @ torch.randn(2, 10, generator=g)
        >>> round(float(intrinsic_dimension(plane)))
        2
    """
    return intrinsic_dimension_estimate(x, method, **options).dimension


def intrinsic_dimension_estimate(
    x: Tensor, method: str = "calibrated", **options: Any
) -> DimensionEstimate:
    r"""Intrinsic dimension of ``x`` with its standard error and diagnostics.

    Args:
        x: ``[N, D]`` or ``[N, *dims]`` points.
        method: one of :data:`METHODS`.
        **options: common: ``dup_tol`` (float, default ``1e-6``: points closer than
            ``dup_tol * rms_radius`` are merged; ``0`` merges exact duplicates only).
            ``"twonn"``: ``fit`` (``"mle"`` or ``"linear"``), ``discard`` (fraction of largest
            :math:`\mu` dropped by the linear fit, default 0.1).
            ``"mle"``: ``k`` (default 10).
            ``"calibrated"``: ``k`` (default 10), ``seed`` (simulation seed, default 0),
            ``references`` (reference families, a subset of :data:`REFERENCE_FAMILIES`; default
            all; ``("sphere",)`` with ``k=5`` is a sphere-only calibration).
            ``"gap"``: ``p`` (2.0), ``holdout`` (0.2), ``sizes``, ``repeats`` (3),
            ``generator`` (a ``torch.Generator``; default seeded with 0).

    Returns:
        :class:`DimensionEstimate`.

    Raises:
        TypeError, ValueError: bad input (1-D input, NaN/Inf, fewer than 3 distinct points, constant
            data, unknown method or options, too few points for the neighbours asked).
    """
    method = check_choice(method, "method", METHODS)
    x = check_point_set(x, "x").detach()  # an estimate of the data, not a differentiable loss
    dup_tol = options.pop("dup_tol", DEFAULT_DUP_TOL)
    if isinstance(dup_tol, bool) or not isinstance(dup_tol, (int, float)) or not dup_tol >= 0:
        raise ValueError(f"`dup_tol` must be a number >= 0, got {dup_tol!r}.")
    out_dtype = compute_dtype(x)
    # The duplicate probe doubles as the estimator's own neighbour search when there are no
    # duplicates: k = 2 for TwoNN, k for the MLE, k for the calibrated default on one chunk.
    n_rows = x.shape[0]
    if method == "twonn":
        probe_k = 2
    elif method == "mle" or (method == "calibrated" and n_rows <= MAX_REFERENCE_POINTS):
        probe_k = _int_or(options.get("k", 10), 1)
    else:
        probe_k = 1
    points, probe = _deduplicate(x.reshape(x.shape[0], -1), float(dup_tol), probe_k)
    n = points.shape[0]
    if n < 3:
        kind = "constant data (all points identical" if n == 1 else "only 2 distinct points ("
        raise ValueError(
            f"`x` has {kind} within dup_tol={dup_tol}); the intrinsic dimension needs at least 3"
            " distinct points. Pass more (distinct) points."
        )
    if method == "twonn":
        fit = options.pop("fit", "mle")
        discard = options.pop("discard", 0.1)
        _no_extra(options, method)
        d, s, det = _twonn(points, fit, discard, None if probe is None else probe.sq_dists)
    elif method == "mle":
        k = options.pop("k", 10)
        _no_extra(options, method)
        d, s, det = _mle(points, k, None if probe is None else probe.sq_dists)
    elif method == "calibrated":
        k = options.pop("k", 10)
        seed = options.pop("seed", 0)
        references = options.pop("references", REFERENCE_FAMILIES)
        _no_extra(options, method)
        d, s, det = _calibrated(points, k, seed, references, probe)
    else:
        p = options.pop("p", 2.0)
        holdout = options.pop("holdout", 0.2)
        sizes = options.pop("sizes", None)
        repeats = options.pop("repeats", 3)
        generator = options.pop("generator", None)
        _no_extra(options, method)
        d, s, det = _gap(points, p, holdout, sizes, repeats, generator)
    as_t = lambda v: torch.tensor(v, dtype=out_dtype, device=x.device)  # noqa: E731
    return DimensionEstimate(as_t(d), as_t(s), method, n, det)


def check_dimension_method(
    method: object, options: dict[str, Any] | None = None, *, name: str = "method"
) -> dict[str, Any]:
    r"""Validate an estimator ``method`` and its ``options`` without data; return the options.

    Everything that does not depend on the points is checked here, so that a callback or a metric
    can refuse a bad configuration at construction instead of failing (or skipping) at its first
    evaluation: the method name (a near miss such as ``"twonnn"`` is answered with the closest
    valid name), the option names the method accepts (:data:`METHOD_OPTIONS`), and the option
    values (types and ranges). What depends on the data (``k`` below the number of distinct
    points, ``sizes`` within the training set) is checked by the estimator.

    Args:
        method: a name from :data:`METHODS`.
        options: the method's keyword options (``None``: none).
        name: the user's name for ``method`` in error messages (e.g. ``"dimension_method"``).

    Returns:
        A copy of ``options`` (a plain dict).

    Raises:
        ValueError: unknown method, or an option value out of range.
        TypeError: an option the method does not take, or an option of the wrong type.

    Example:
        >>> from gapcallback.functional.dimension import check_dimension_method
        >>> check_dimension_method("mle", {"k": 20})
        {'k': 20}
        >>> check_dimension_method("twonnn")
        Traceback (most recent call last):
        ...
        ValueError: `method` must be one of 'calibrated', 'twonn', 'mle', 'gap'; got 'twonnn'. Did you mean 'twonn'?
    """
    method = check_choice(method, name, METHODS)
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"The options of `{name}`={method!r} must be a dict of keyword arguments, got "
            f"{type(options).__name__}."
        )
    options = dict(options)
    check_known_keys(options, f"options of {name}={method!r}", METHOD_OPTIONS[method])
    if "dup_tol" in options:
        check_number(options["dup_tol"], "dup_tol", minimum=0.0)
    if "k" in options:
        check_positive_int(options["k"], "k", minimum=2)
    if "fit" in options:
        check_choice(options["fit"], "fit", ("mle", "linear"))
    if "discard" in options:
        check_number(options["discard"], "discard", minimum=0.0)
        if not options["discard"] < 1:
            raise ValueError(f"`discard` must be a fraction in [0, 1), got {options['discard']!r}.")
    if "seed" in options:
        check_positive_int(options["seed"], "seed", minimum=0)
    if "references" in options:
        check_references(options["references"])
    if "p" in options:
        check_exponent(options["p"])
    if "holdout" in options:
        check_number(options["holdout"], "holdout", minimum=0.0, maximum=1.0, strict=True)
    if options.get("sizes") is not None:
        sizes = options["sizes"]
        values = sizes.reshape(-1).tolist() if isinstance(sizes, Tensor) else sizes
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"`sizes` must be None or a sequence of ints, got {sizes!r}.")
        for v in values:
            check_positive_int(v, "sizes[i]")
    if "repeats" in options:
        check_positive_int(options["repeats"], "repeats")
    if options.get("generator") is not None:
        _generator(options["generator"])
    return options


def gap_slope_dimension(
    train: Tensor,
    reference: Tensor,
    sizes: Sequence[int] | Tensor | None = None,
    repeats: int = 3,
    p: float = 2.0,
    generator: torch.Generator | None = None,
) -> GapSlope:
    r"""Dimension from the slope of :math:`\log R_n` vs :math:`\log n` over subsampled training sets.

    For each size :math:`n_k` and repeat, a random subset of ``n_k`` training points is drawn
    (without replacement) and the representation gap
    :math:`R_{n} = \frac1m \sum_i \min_j \lVert y_i - z_j \rVert^p` of ``reference`` against it is
    measured. Since :math:`R_n \propto n^{-p/d}`, a least-squares line through all
    :math:`(\log n_k, \log R)` pairs gives :math:`\hat d = -p / \text{slope}`, with standard error
    :math:`p\, \sigma_{\text{slope}} / \text{slope}^2`.

    Args:
        train: ``[n, D]`` (or ``[n, *dims]``) training points.
        reference: ``[m, D]`` held-out points (should share no point with ``train``).
        sizes: increasing subsample sizes in ``[1, n]`` (at least 2 distinct); default 6 sizes
            geometrically spaced from ``max(8, n // 32)`` to ``n``.
        repeats: subsamples per size (>= 1; the full set is drawn once).
        p: loss exponent (default 2).
        generator: ``torch.Generator`` for the subsampling (CPU); default seeded with 0.

    Returns:
        :class:`GapSlope` ``(dimension, std, sizes [K], gaps [K, repeats])``.
    """
    train = check_point_set(train, "train")
    reference = check_point_set(reference, "reference")
    check_same_device(train, reference, "train", "reference")
    check_same_features(train, reference, "train", "reference")
    p = check_exponent(p)
    repeats = check_positive_int(repeats, "repeats")
    generator = as_generator(generator, "generator")
    n = train.shape[0]
    size_list = _gap_sizes(n, sizes)
    # One random subset per repeat (the first subset of each pass); exact float64 gaps whatever
    # the dtype: the slope is scale-free.
    curve = measure_gap_curve(
        train,
        reference,
        size_list,
        p=p,
        repeats=repeats,
        k=1,
        pooled=False,
        subsets="first",
        generator=generator,
    )
    # The full training set is measured once: each of its repeats is the same gap.
    gaps = torch.stack([row.expand(repeats) for row in curve.subset_gaps])
    if not bool((gaps > 0).all()):
        raise ValueError(
            "A representation gap is exactly 0: every `reference` point is also in `train`. Use a"
            " held-out `reference` that shares no point with `train` (or deduplicate first)."
        )
    log_n = curve.sizes.log()[:, None].expand(-1, repeats).reshape(-1)
    log_gaps = gaps.log().reshape(-1)
    line = fit_line(log_n, log_gaps)
    slope, slope_std = float(line.slope), float(line.stderr)
    if not slope < -slope_rounding(log_n, log_gaps):  # equal gaps: 0 up to rounding
        raise ValueError(
            f"The gap does not decrease with n (slope {slope:.3g} of log R vs log n); the data look"
            " like noise or too few points. Use more points or larger `sizes`."
        )
    dtype = compute_dtype(train, reference)
    dim = torch.tensor(-p / slope, dtype=dtype, device=train.device)
    std = torch.tensor(p * slope_std / slope**2, dtype=dtype, device=train.device)
    return GapSlope(
        dim, std, torch.tensor(size_list, dtype=torch.long), gaps.to(dtype).to(train.device)
    )


def multiscale_dimension(
    x: Tensor,
    method: str = "twonn",
    *,
    sizes: Sequence[int] | None = None,
    repeats: int = 3,
    k: int = 10,
    dup_tol: float = DEFAULT_DUP_TOL,
    generator: torch.Generator | None = None,
) -> MultiscaleDimension:
    r"""Estimate vs neighbourhood scale: ``"twonn"`` or ``"mle"`` on subsamples of decreasing size.

    A subsample of ``n`` points has neighbour distances :math:`\propto n^{-1/d}`, so shrinking ``n``
    looks at the data at larger scales. A plateau is the dimension; noise of size
    :math:`\sigma` shows up as a rise at scales near :math:`\sigma`, curvature and boundaries as a
    drift at large scales. The reported scale is the median first-neighbour distance
    (``"twonn"``) or k-th neighbour distance (``"mle"``).

    Args:
        x: ``[N, D]`` points.
        method: ``"twonn"`` or ``"mle"`` (raw estimators; calibration would hide the drift).
        sizes: subsample sizes; default ``N, N/2, N/4, ...`` down to ``max(4 k, 20)``.
        repeats: subsamples per size (the full set once).
        k: neighbours for ``"mle"``.
        dup_tol: duplicate tolerance (see :func:`intrinsic_dimension_estimate`).
        generator: ``torch.Generator`` for subsampling; default seeded with 0.

    Returns:
        :class:`MultiscaleDimension` ordered by increasing scale.
    """
    if method not in ("twonn", "mle"):
        raise ValueError(
            f"`method` must be 'twonn' or 'mle' for the multiscale view, got {method!r}."
        )
    x = check_point_set(x, "x")
    repeats = check_positive_int(repeats, "repeats")
    k = check_positive_int(k, "k", minimum=2)
    generator = _generator(generator)
    points = deduplicate(x.reshape(x.shape[0], -1), float(dup_tol))
    n = points.shape[0]
    smallest = 4 if method == "twonn" else k + 2
    if n < smallest:
        raise ValueError(f"`x` has {n} distinct points; the multiscale view needs >= {smallest}.")
    if sizes is None:
        size_list, s = [], n
        while s >= max(smallest, min(n, 4 * k if method == "mle" else 20)):
            size_list.append(s)
            s //= 2
    else:
        size_list = sorted({int(s) for s in sizes}, reverse=True)
        if not size_list or size_list[-1] < smallest or size_list[0] > n:
            raise ValueError(
                f"`sizes` must lie in [{smallest}, {n}] (distinct points), got {sizes}."
            )
    scales, dims, stds = [], [], []
    for size in size_list:
        vals, scl, ana = [], [], []
        for _ in range(1 if size == n else repeats):
            sub = points if size == n else points[torch.randperm(n, generator=generator)[:size]]
            if method == "twonn":
                d, s, det = _twonn(sub, "mle", 0.1)
            else:
                d, s, det = _mle(sub, k)
            vals.append(d)
            ana.append(s)
            scl.append(det["scale"])
        dims.append(float(np.mean(vals)))
        stds.append(float(np.std(vals, ddof=1)) / math.sqrt(len(vals)) if len(vals) > 1 else ana[0])
        scales.append(float(np.median(scl)))
    dtype = compute_dtype(x)

    def _t(v: list[float]) -> Tensor:
        return torch.tensor(v, dtype=dtype, device=x.device)

    # Sizes decrease, so scales increase along the result.
    return MultiscaleDimension(_t(scales), _t(dims), _t(stds), torch.tensor(size_list))


@torch.no_grad()
def deduplicate(x: Tensor, dup_tol: float = DEFAULT_DUP_TOL) -> Tensor:
    r"""Merge duplicates and near-duplicates: keep one point of every group closer than the tolerance.

    Point ``i`` is dropped when a lower-indexed point lies within ``dup_tol * rms_radius`` (RMS
    distance of the points to their mean), so exactly one representative of each group survives
    (the first). ``dup_tol = 0`` merges exact duplicates only.

    Args:
        x: ``[N, D]`` (or ``[N, *dims]``) points, a floating ``torch.Tensor``.
        dup_tol: relative tolerance (>= 0).

    Returns:
        ``[N', D]`` (``[N', *dims]``) the kept points, in their original order.
    """
    x = check_point_set(x, "x").detach()
    dup_tol = float(check_number(dup_tol, "dup_tol", minimum=0.0))
    kept = _deduplicate(x.reshape(x.shape[0], -1), dup_tol)[0]
    return kept.reshape(kept.shape[0], *x.shape[1:])


def _deduplicate(x: Tensor, dup_tol: float, probe_k: int = 1) -> tuple[Tensor, KNNResult | None]:
    """:func:`deduplicate`, also returning the probe's ``probe_k`` nearest other points (``[N,
    probe_k]`` squared distances and indices) when no duplicate was found, so an estimator that
    needs those neighbours reuses the search (the engine is exact, so it is the same result).
    """
    n = x.shape[0]
    if n < 2:
        return x, None
    xd = x.to(compute_dtype(x))
    # RMS radius, scaled by the largest centred magnitude so that its squares neither overflow
    # nor underflow the data's dtype (float32 data at 1e30 or 1e-30).
    centred = xd - xd.mean(0)
    top = float(centred.abs().amax()) or 1.0
    radius = top * float((centred / top).square().sum(1).mean().sqrt())
    tol_sq = (dup_tol * radius) ** 2
    # Probe first (k=1 is the engine's fastest path, or the k the estimator needs anyway): the
    # nearest other point tells whether there is any duplicate; only then search for whole groups.
    probe = knn(xd, xd, max(1, min(probe_k, n - 1)), exclude_self=True)
    if not bool((probe.sq_dists[:, 0] <= tol_sq).any()):
        return x, probe if probe.sq_dists.shape[1] == probe_k else None
    k = min(8, n - 1)
    while True:
        res = knn(xd, xd, k, exclude_self=True)
        within = res.sq_dists <= tol_sq
        if k == n - 1 or not bool(within[:, -1].any()):
            break
        k = min(4 * k, n - 1)
    rows = torch.arange(n, device=x.device)[:, None]
    drop = (within & (res.indices < rows)).any(dim=1)
    return (x[~drop] if bool(drop.any()) else x), None


# ----------------------------------------------------------------------------------------------
# estimators on validated, deduplicated [N, D] points; each returns (dim, std, details)
# ----------------------------------------------------------------------------------------------


def _log_neighbour_dists(points: Tensor, k: int, sq: Tensor | None = None) -> Tensor:
    """``[N, k]`` float64 log-distances to the k nearest other points (CPU); ``sq``: precomputed
    ``[N, k]`` squared distances of that search."""
    if sq is None or sq.shape != (points.shape[0], k):
        sq = knn(points, points, k, exclude_self=True).sq_dists
    return 0.5 * sq.to(device="cpu", dtype=torch.float64).log()


def _twonn(
    points: Tensor, fit: str, discard: float, sq: Tensor | None = None
) -> tuple[float, float, dict[str, Any]]:
    if fit not in ("mle", "linear"):
        raise ValueError(f"`fit` must be 'mle' or 'linear', got {fit!r}.")
    if isinstance(discard, bool) or not isinstance(discard, (int, float)) or not 0 <= discard < 1:
        raise ValueError(f"`discard` must be a fraction in [0, 1), got {discard!r}.")
    log_r = _log_neighbour_dists(points, 2, sq)
    log_mu = log_r[:, 1] - log_r[:, 0]
    n = log_mu.numel()
    details: dict[str, Any] = {"fit": fit, "scale": float(log_r[:, 0].exp().median())}
    if fit == "mle":
        total = float(log_mu.sum())
        if total <= 0:
            raise ValueError(
                "`x`: all first and second neighbour distances are equal (points on a regular"
                " grid?), so TwoNN is undefined; use method='mle' or add points."
            )
        d = (n - 1) / total
        # Posterior of d given Pareto ratios is Gamma(N, sum log mu): sd = d / sqrt(N).
        return d, d / math.sqrt(n), details
    # Linear fit through the origin of -log(1 - F) against log(mu), largest `discard` dropped.
    sorted_mu = log_mu.sort().values
    keep = max(2, math.floor(n * (1.0 - discard)))
    xs = sorted_mu[:keep]
    ys = -torch.log1p(-torch.arange(1, keep + 1, dtype=torch.float64) / n)
    denom = float((xs * xs).sum())
    if denom <= 0:
        raise ValueError(
            "`x`: all first and second neighbour distances are equal (points on a regular grid?),"
            " so TwoNN is undefined; use method='mle' or add points."
        )
    d = float((xs * ys).sum()) / denom
    resid = ys - d * xs
    # Residuals of an empirical CDF are strongly correlated; inflate by the MLE-form error floor.
    std = max(math.sqrt(float(resid.square().sum()) / max(1, keep - 1) / denom), d / math.sqrt(n))
    details["discard"] = float(discard)
    return d, std, details


def _check_k(k: object, n: int) -> int:
    """``k`` as an int in ``[2, n - 1]`` (the neighbours of ``n`` distinct points), or a clear error."""
    k = check_positive_int(k, "k", minimum=2)
    if k > n - 1:
        raise ValueError(
            f"k={k} neighbours need at least k + 1 = {k + 1} distinct points, got {n}; lower `k` or"
            " pass more points."
        )
    return k


def _mle(
    points: Tensor, k: object, sq: Tensor | None = None
) -> tuple[float, float, dict[str, Any]]:
    k = _check_k(k, points.shape[0])
    n = points.shape[0]
    log_r = _log_neighbour_dists(points, k, sq)
    s = (log_r[:, k - 1 : k] - log_r[:, : k - 1]).sum(dim=1)  # sum_{j<k} log(T_k / T_j)
    mean = float(s.mean())
    if mean <= 0:
        raise ValueError("All k nearest-neighbour distances are equal; the MLE is undefined.")
    d = (k - 1) / mean
    spread = float(s.std()) if n > 1 else 0.0
    std = d * spread / (mean * math.sqrt(n))
    return d, std, {"k": k, "scale": float(log_r[:, k - 1].exp().median())}


def _calibrated(
    points: Tensor, k: object, seed: object, references: object, neighbours: KNNResult | None = None
) -> tuple[float, float, dict[str, Any]]:
    k = _check_k(k, points.shape[0])
    seed = check_positive_int(seed, "seed", minimum=0)
    return calibrate(points, k, seed, check_references(references), neighbours)


def _gap(
    points: Tensor, p: object, holdout: object, sizes: Any, repeats: object, generator: Any
) -> tuple[float, float, dict[str, Any]]:
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise ValueError(f"`holdout` must be a fraction in (0, 1), got {holdout!r}.")
    generator = _generator(generator)
    n = points.shape[0]
    m = max(1, round(n * holdout))
    if n - m < 2:
        raise ValueError(
            f"The gap method needs at least 2 training points; got {n} distinct points."
        )
    perm = torch.randperm(n, generator=generator).to(points.device)
    res = gap_slope_dimension(
        points[perm[m:]],
        points[perm[:m]],
        sizes,
        repeats,
        p,
        generator,  # type: ignore[arg-type]
    )
    return (
        float(res.dimension),
        float(res.std),
        {"sizes": res.sizes, "gaps": res.gaps, "p": float(p)},  # type: ignore[arg-type]
    )


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _int_or(value: object, default: int) -> int:
    """``value`` if it is a plain int >= 1, else ``default`` (validation happens later)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    return value if ok else default  # type: ignore[return-value]


def _no_extra(options: dict[str, Any], method: str) -> None:
    if options:
        raise TypeError(
            f"Unknown option(s) {', '.join(f'`{k}`' for k in sorted(options))} for "
            f"`method`={method!r}; it takes {', '.join(METHOD_OPTIONS[method])} (see "
            "`intrinsic_dimension_estimate`)."
        )


def _generator(generator: object) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
    return generator


def _gap_sizes(n: int, sizes: Sequence[int] | Tensor | None) -> list[int]:
    if sizes is None:
        lo = max(8, n // 32)
        if n < 2 * lo:
            lo = max(1, n // 4)
        if lo >= n:
            raise ValueError(f"`train` has {n} points; the gap slope needs at least 2.")
        return [int(v) for v in gap_size_grid(n, 6, lo).long().tolist()]
    values = [int(v) for v in (sizes.tolist() if isinstance(sizes, Tensor) else sizes)]
    if len(set(values)) < 2 or any(v < 1 or v > n for v in values):
        raise ValueError(
            f"`sizes` must hold at least 2 distinct subsample sizes in [1, {n}], got {values}."
        )
    return sorted(set(values))
