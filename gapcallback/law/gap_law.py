"""The value object :class:`GapLaw`: a fitted gap law :math:`R_n = J\\,n^{-p/d}`.

It predicts (:meth:`GapLaw.predict`, :meth:`GapLaw.predict_interval`, :meth:`GapLaw.samples_for`),
serialises (:meth:`GapLaw.state_dict`, :meth:`GapLaw.from_state_dict`) and is built by
:meth:`GapLaw.fit` (which measures the curve with
:func:`~gapcallback.functional.gap_curve.measure_gap_curve` and fits it with
:func:`~gapcallback.law.fit.fit_law`), :meth:`GapLaw.from_curve` or :meth:`GapLaw.from_gaps`.
The mathematics is in :mod:`gapcallback.law`.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from gapcallback.functional.gap_curve import (
    GapCurve,
    as_generator,
    gap_size_grid,
    measure_gap_curve,
    size_values,
)
from gapcallback.law.fit import (
    LawFit,
    band_half_width,
    curvature_bias,
    default_fit_min_size,
    fit_law,
)
from gapcallback.utils.checks import (
    check_bool,
    check_exponent,
    check_known_keys,
    check_number,
    check_optional_int,
    check_point_set,
    check_positive_int,
    check_same_device,
    check_same_features,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from gapcallback.symmetry.base import Symmetry

__all__ = ["GapLaw"]

_STATE_VERSION = 1


class GapLaw:
    r"""Fitted gap law :math:`R_n = J\, n^{-p/d}` (build it with :meth:`fit` or :meth:`from_gaps`).

    :meth:`predict` evaluates ``constant * n ** (-p / dimension)``. The line passes through the
    LPS estimate of the gap at the largest measured size (the *anchor*) with the slope fitted on
    the upper part of the size grid, so predictions extrapolate from the best-measured point:
    :math:`R(n) = \hat R(N_\mathrm{eff}) (N_\mathrm{eff} / n)^{p/d}`.

    Example:
        >>> import torch
        >>> from gapcallback.law import GapLaw
        >>> law = GapLaw.from_gaps([100, 200, 400, 800], [0.4, 0.2, 0.1, 0.05])  # R = 40 / n
        >>> round(law.dimension, 6), round(law.predict(1600), 6), round(law.samples_for(0.01))
        (2.0, 0.025, 4000)

    Attributes:
        dimension: fitted (or fixed) dimension :math:`d = -p / \text{slope}`, float.
        dimension_std: bootstrap standard deviation of ``dimension`` (0 when it was fixed).
        constant: :math:`J`, float: the anchor gap times ``anchor_size ** (p / d)``.
        constant_std: standard deviation of ``constant`` (propagated jointly with ``dimension``).
        p: loss exponent of the gap.
        n_train: number of training points given to :meth:`fit` (``sizes[-1]`` for
            :meth:`from_gaps`).
        sizes: ``[K]`` float64 tensor, training-set sizes at which the gap was measured.
        gaps: ``[K]`` float64 tensor, mean measured gap at each size.
        gaps_std: ``[K]`` float64 tensor, standard error of ``gaps`` (bootstrap over repeats and
            points; 0 where unknown).
        local_dimensions: ``[K - 1]`` float64 tensor, :math:`-p\,\Delta\log n / \Delta\log R`
            between consecutive sizes (``inf`` where the gap did not decrease); a drift reveals
            scale dependence.
        fit_min_size: smallest size used in the slope fit.
        anchor_size: :math:`N_\mathrm{eff}`, the size at which the constant was pinned.
        anchor_gap: LPS estimate of the gap at ``anchor_size``.
        k: neighbour rank of the LPS estimator.
        pooled: whether references and training points were pooled (see the module docstring).
        group_size: :math:`|G|` of a finite symmetry group (1 without symmetry).
        reference_gap: gap of the references to the full training set (``nan`` for
            :meth:`from_gaps`).
        curve: the :class:`~gapcallback.functional.gap_curve.GapCurve` the law was fitted on
            (:meth:`fit`, :meth:`from_curve`; its per-point terms, e.g. each reference's distance
            to the training set, serve callers without another search), ``None`` otherwise. Not
            part of :meth:`state_dict`.

    Raises:
        TypeError, ValueError: a constructor argument of the wrong type or out of range (the
            message names it); NaN stands for "unknown" only in the standard deviations,
            ``fit_min_size``, ``anchor_size``, ``anchor_gap`` and ``reference_gap``.
    """

    def __init__(
        self,
        *,
        dimension: float,
        constant: float,
        p: float = 2.0,
        dimension_std: float = 0.0,
        constant_std: float = 0.0,
        covariance: Sequence[Sequence[float]] | None = None,
        n_train: int | None = None,
        sizes: Sequence[float] | Tensor = (),
        gaps: Sequence[float] | Tensor = (),
        gaps_std: Sequence[float] | Tensor | None = None,
        fit_min_size: float | None = None,
        anchor_size: float | None = None,
        anchor_gap: float | None = None,
        k: int = 1,
        pooled: bool = False,
        group_size: int = 1,
        reference_gap: float = math.nan,
    ) -> None:
        # Everything is checked before anything is stored (a law is also rebuilt from checkpoints).
        self.p = check_exponent(p)
        self.dimension = float(
            check_number(_scalar(dimension), "dimension", minimum=0.0, strict=True)
        )
        self.constant = float(check_number(_scalar(constant), "constant", minimum=0.0, strict=True))
        self.dimension_std = _check_spread(dimension_std, "dimension_std")
        self.constant_std = _check_spread(constant_std, "constant_std")
        # Covariance of (log J, 1/d): log R(n) = log J - p * (1/d) * log n is linear in both.
        if covariance is None:
            covariance = [[0.0, 0.0], [0.0, 0.0]]
        cov = _as_vector(covariance, "covariance")
        if cov.numel() != 4:
            raise ValueError(
                "`covariance` must be the 2 x 2 covariance of (log constant, 1 / dimension), got "
                f"{cov.numel()} values."
            )
        self._covariance = cov.reshape(2, 2).clone()
        self.sizes = _as_vector(sizes, "sizes").clone()
        self.gaps = _as_vector(gaps, "gaps").clone()
        if self.sizes.shape != self.gaps.shape:
            raise ValueError(
                f"`sizes` and `gaps` must have the same length, got {self.sizes.numel()} and "
                f"{self.gaps.numel()}."
            )
        if not bool((self.sizes > 0).all()):
            raise ValueError(f"`sizes` must be positive, got {self.sizes.tolist()}.")
        if not bool((self.gaps >= 0).all()):
            raise ValueError(f"`gaps` must be non-negative, got {self.gaps.tolist()}.")
        if gaps_std is None:
            self.gaps_std = torch.zeros_like(self.gaps)
        else:
            self.gaps_std = torch.as_tensor(
                [_check_spread(v, "gaps_std[i]") for v in _as_list(gaps_std, "gaps_std")],
                dtype=torch.float64,
            )
            if self.gaps_std.shape != self.gaps.shape:
                raise ValueError(
                    f"`gaps_std` must hold one value per size ({self.gaps.numel()}), got "
                    f"{self.gaps_std.numel()}."
                )
        if n_train is not None:
            self.n_train = check_positive_int(_as_int(n_train, "n_train"), "n_train", minimum=0)
        else:
            self.n_train = int(self.sizes.max().item() if self.sizes.numel() else 0)
        first = float(self.sizes[0]) if self.sizes.numel() else math.nan
        last = float(self.sizes[-1]) if self.sizes.numel() else math.nan
        self.fit_min_size = _check_positive_or_nan(fit_min_size, "fit_min_size", first)
        self.anchor_size = _check_positive_or_nan(anchor_size, "anchor_size", last)
        self.anchor_gap = _check_positive_or_nan(
            anchor_gap, "anchor_gap", self.constant * self.anchor_size ** (-self.p / self.dimension)
        )
        self.k = check_positive_int(_as_int(k, "k"), "k")
        self.pooled = check_bool(pooled, "pooled")
        self.group_size = check_positive_int(_as_int(group_size, "group_size"), "group_size")
        self.reference_gap = _check_spread(reference_gap, "reference_gap")
        self.curve: GapCurve | None = None

    # ------------------------------------------------------------------ fitting

    FIT_OPTIONS: ClassVar[tuple[str, ...]] = (
        "sizes",
        "num_sizes",
        "repeats",
        "k",
        "fit_min_size",
        "dimension",
        "pooled",
        "group_size",
    )
    """Keyword arguments of :meth:`fit` a caller may forward (``law_options`` of the callback): all
    but ``train``, ``reference``, ``p``, ``symmetry`` and ``seed``, which the caller sets itself."""

    @staticmethod
    def check_fit_options(options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate keyword options for :meth:`fit` without data; return them with checked values.

        For a caller that forwards user options to :meth:`fit` later (e.g. ``GapCallback``'s
        ``law_options``) and wants to refuse bad ones when it is built, not at fit start. Checks
        that every key is one of :attr:`FIT_OPTIONS` and every value's type and range (``sizes``
        strictly increasing positive integers, ``num_sizes >= 3``, ``repeats >= 1``,
        ``k >= 1``, ``fit_min_size >= 1``, ``dimension`` finite and positive, ``pooled`` a
        bool, ``group_size >= 1``; ``None`` where :meth:`fit` accepts it). What depends on the
        data (sizes within the number of points) is checked by :meth:`fit`.

        Args:
            options: a subset of :attr:`FIT_OPTIONS` mapped to values.

        Returns:
            A new dict with the same keys; numbers normalised (``dimension`` as ``float``).

        Raises:
            TypeError: an unknown key (the message lists the valid ones) or a value of the wrong
                type.
            ValueError: a value out of range.

        Example:
            >>> GapLaw.check_fit_options({"num_sizes": 5, "repeats": 3})
            {'num_sizes': 5, 'repeats': 3}
            >>> GapLaw.check_fit_options({"repeat": 3})
            Traceback (most recent call last):
            ...
            TypeError: Unknown key(s) ['repeat'] in `GapLaw.fit options` ('repeat' -> 'repeats'?); valid keys are ['sizes', 'num_sizes', 'repeats', 'k', 'fit_min_size', 'dimension', 'pooled', 'group_size'].
        """
        if not isinstance(options, Mapping):
            raise TypeError(
                "GapLaw.fit options must be a dict of keyword arguments, got "
                f"{type(options).__name__}."
            )
        check_known_keys(options, "GapLaw.fit options", GapLaw.FIT_OPTIONS)
        out = dict(options)
        if out.get("sizes") is not None:
            _check_sizes_values(out["sizes"])
        if "num_sizes" in out:
            out["num_sizes"] = check_positive_int(out["num_sizes"], "num_sizes", minimum=3)
        if "repeats" in out:
            out["repeats"] = check_positive_int(out["repeats"], "repeats")
        if "k" in out:
            out["k"] = check_positive_int(out["k"], "k")
        if "fit_min_size" in out:
            out["fit_min_size"] = check_optional_int(out["fit_min_size"], "fit_min_size")
        if out.get("dimension") is not None:
            out["dimension"] = _check_dimension(out["dimension"])
        if "pooled" in out:
            out["pooled"] = check_bool(out["pooled"], "pooled")
        if "group_size" in out:
            out["group_size"] = check_optional_int(out["group_size"], "group_size")
        return out

    @classmethod
    def fit(
        cls,
        train: Tensor,
        reference: Tensor,
        *,
        p: float = 2.0,
        sizes: Sequence[int] | Tensor | None = None,
        num_sizes: int = 9,
        repeats: int = 5,
        k: int = 5,
        fit_min_size: int | None = None,
        dimension: float | None = None,
        pooled: bool = True,
        symmetry: Symmetry | None = None,
        group_size: int | None = None,
        seed: int | torch.Generator = 0,
    ) -> GapLaw:
        r"""Measure the gap at several training-set sizes and fit :math:`R_n = J\,n^{-p/d}`.

        Args:
            train: ``[n, D]`` (or ``[n, *dims]``) training points.
            reference: ``[m, D]`` (or ``[m, *dims]``) held-out reference points.
            p: loss exponent of the gap, ``||y - z||^p``.
            sizes: increasing training-set sizes at which to measure the gap (each reference sees
                that many points). Default: ``num_sizes`` sizes geometrically spaced from
                ``n_max / 16`` to ``n_max``, where ``n_max = n + m - 1`` when ``pooled`` else ``n``.
            num_sizes: number of sizes of the default grid (>= 3).
            repeats: passes per size. Each pass shuffles the points and cuts them into disjoint
                random subsets of the size, so every point is used once per pass and small sizes
                average many subsets (one pass at ``n_max``, where all subsets coincide).
            k: neighbour rank of the LPS estimator that pins the constant at ``n_max``. ``k = 1`` is
                the measured gap itself; larger ``k`` averages more neighbours (much less noise for
                small ``d``, where ``rho^p`` is heavy-tailed) at the cost of relying on the fitted
                ``d`` over a factor ``k`` in scale. Default 5.
            fit_min_size: smallest size used to fit the slope. Default ``n_max / r`` with
                :math:`r = \mathrm{clip}(2^{8/d_0}, 4, 16)` and :math:`d_0` the slope dimension of the
                whole grid: the finite-size bias of the slope decays like :math:`n^{-2/d}`, so
                small dimensions (noisiest gaps, negligible bias) use the whole grid (``d0 <= 2``)
                and ``d0 >= 4`` the upper quarter, where the bias is smallest.
            dimension: fix ``d`` instead of fitting it (the constant is still estimated).
            pooled: pool references and training points and use leave-one-out neighbours (see the
                module docstring); requires both to be i.i.d. draws of one distribution. Set
                ``False`` when the references come from a different distribution.
            symmetry: optional :class:`gapcallback.symmetry.Symmetry`; all distances become orbit
                distances, so the fitted law is the law on the quotient.
            group_size: :math:`|G|` for :attr:`orbit_constant`; default ``symmetry.order`` (1
                without symmetry or for a continuous group).
            seed: int seed or ``torch.Generator`` (CPU) for the subsets and the bootstrap.

        Cost: one ``max(k, 5)``-neighbour search of the pool (leave-one-out when pooled) serves
        the anchor, the largest size, the references' gap and most points of every pass (a point's
        nearest neighbour within its block is the first listed neighbour in the block); only the
        points with none listed are searched within their block. About 4 leave-one-out searches
        of the pool in pair products for the default grid (8x the time of one ``k = 1`` search at
        ``n + m = 25000``, ``D = 64``), with the same values as one exact search per block.

        Returns:
            The fitted :class:`GapLaw`.

        Raises:
            TypeError: non-tensor or non-float inputs, non-integer sizes or counts, unknown
                ``symmetry`` objects. Every argument is checked before any search (see
                :meth:`check_fit_options`).
            ValueError: NaN/Inf, mismatched features or devices, too few points for the size grid,
                sizes not increasing or out of range, a zero gap (references duplicated in the
                training set, or duplicated points when pooled), or a gap that does not decrease
                with ``n``.
        """
        # Every argument is checked before any computation; what needs the data comes next.
        p = check_exponent(p)
        options = cls.check_fit_options(
            {
                "sizes": sizes,
                "num_sizes": num_sizes,
                "repeats": repeats,
                "k": k,
                "fit_min_size": fit_min_size,
                "dimension": dimension,
                "pooled": pooled,
                "group_size": group_size,
            }
        )
        repeats, k, dimension = options["repeats"], options["k"], options["dimension"]
        _check_symmetry(symmetry)
        generator = as_generator(seed)
        train = check_point_set(train, "train")
        reference = check_point_set(reference, "reference")
        check_same_device(train, reference, "train", "reference")
        check_same_features(train, reference, "train", "reference")
        group_size = _group_size(group_size, symmetry, train)

        n_max = train.shape[0] + reference.shape[0] - 1 if pooled else train.shape[0]
        sizes_t = _size_grid(sizes, num_sizes, n_max, pooled)
        fit_min = None if fit_min_size is None else float(fit_min_size)
        in_fit = sizes_t >= (fit_min or 0.0) - 1e-9
        if dimension is None and int(in_fit.sum()) < 2:
            raise ValueError(
                f"Only {int(in_fit.sum())} of the sizes {sizes_t.long().tolist()} are >= "
                f"fit_min_size={fit_min:g}; the slope needs at least 2. Lower `fit_min_size` or add "
                "sizes."
            )
        if k > n_max:
            raise ValueError(
                f"`k`={k} exceeds the {n_max} points available at the largest size; lower `k`."
            )
        curve = measure_gap_curve(
            train,
            reference,
            sizes_t,
            p=p,
            repeats=repeats,
            k=k,
            pooled=pooled,
            symmetry=symmetry,
            generator=generator,
        )
        return cls._from_curve(
            curve,
            dimension=dimension,
            fit_min_size=fit_min,
            group_size=group_size,
            generator=generator,
            stacklevel=3,
        )

    @classmethod
    def from_gaps(
        cls,
        sizes: Sequence[float] | Tensor,
        gaps: Sequence[float] | Tensor,
        *,
        p: float = 2.0,
        gaps_std: Sequence[float] | Tensor | None = None,
        fit_min_size: float | None = None,
        dimension: float | None = None,
        seed: int | torch.Generator = 0,
    ) -> GapLaw:
        r"""Fit the law to gaps measured elsewhere (e.g. logged by a callback).

        The slope is fitted by least squares on :math:`\log R` vs :math:`\log n` over the sizes
        ``>= fit_min_size`` (default: all) and the line is anchored at the largest size. With
        ``gaps_std`` the uncertainties come from a parametric bootstrap.

        Args:
            sizes: ``[K]`` increasing positive training-set sizes.
            gaps: ``[K]`` positive measured gaps.
            p: loss exponent of the gaps.
            gaps_std: ``[K]`` standard errors of ``gaps`` (optional).
            fit_min_size: smallest size used in the slope fit.
            dimension: fix ``d`` instead of fitting it.
            seed: int seed or ``torch.Generator`` for the bootstrap.
        """
        p = check_exponent(p)
        sizes_t = _as_vector(sizes, "sizes")
        gaps_t = _as_vector(gaps, "gaps")
        if sizes_t.numel() != gaps_t.numel():
            raise ValueError(
                f"`sizes` and `gaps` must have the same length, got {sizes_t.numel()} and "
                f"{gaps_t.numel()}."
            )
        if sizes_t.numel() < 2 and dimension is None:
            raise ValueError("Fitting the dimension needs gaps at >= 2 sizes; pass more sizes.")
        if not bool((sizes_t > 0).all()) or not bool((sizes_t[1:] > sizes_t[:-1]).all()):
            raise ValueError(
                f"`sizes` must be positive and strictly increasing, got {sizes_t.tolist()}."
            )
        if not bool((gaps_t > 0).all()):
            raise ValueError(
                f"`gaps` must be positive (the law is fitted in log space), got {gaps_t.tolist()};"
                " a zero gap means the references are copies of training points."
            )
        std_t = torch.zeros_like(gaps_t) if gaps_std is None else _as_vector(gaps_std, "gaps_std")
        if std_t.numel() != gaps_t.numel() or not bool((std_t >= 0).all()):
            raise ValueError("`gaps_std` must hold one non-negative value per size.")
        if dimension is not None:
            dimension = _check_dimension(dimension)
        fit_min = float(sizes_t[0]) if fit_min_size is None else float(fit_min_size)
        in_fit = sizes_t >= fit_min - 1e-9
        if dimension is None and int(in_fit.sum()) < 2:
            raise ValueError(
                f"Fewer than 2 sizes are >= fit_min_size={fit_min:g}; lower it or add sizes."
            )
        fitted = fit_law(
            sizes_t,
            gaps_t,
            [g.reshape(1) for g in gaps_t],
            [s.reshape(1) for s in std_t],
            in_fit,
            p=p,
            k=1,
            dimension=dimension,
            anchor_size=float(sizes_t[-1]),
            anchor_mean=float(gaps_t[-1]),
            anchor_se=float(std_t[-1]),
            generator=as_generator(seed),
            stacklevel=3,
        )
        return cls._from_fit(
            fitted,
            p=p,
            n_train=round(float(sizes_t[-1])),
            sizes=sizes_t,
            gaps=gaps_t,
            fit_min_size=fit_min,
            anchor_size=float(sizes_t[-1]),
            k=1,
            pooled=False,
            group_size=1,
        )

    @classmethod
    def from_curve(
        cls,
        curve: GapCurve,
        *,
        fit_min_size: float | None = None,
        dimension: float | None = None,
        group_size: int = 1,
        seed: int | torch.Generator = 0,
    ) -> GapLaw:
        r"""Fit the law to a curve measured by :func:`~gapcallback.functional.gap_curve.measure_gap_curve`.

        :meth:`fit` is ``measure_gap_curve`` followed by this (with the same generator), so
        ``GapLaw.from_curve(curve, seed=g)`` after ``curve = measure_gap_curve(..., generator=g)``
        reproduces it; measuring once and fitting with several options costs no search.

        Args:
            curve: the measured :class:`~gapcallback.functional.gap_curve.GapCurve`.
            fit_min_size: smallest size used in the slope fit (default: see :meth:`fit`).
            dimension: fix ``d`` instead of fitting it.
            group_size: :math:`|G|` for :attr:`orbit_constant`.
            seed: int seed or CPU ``torch.Generator`` for the bootstrap.

        Returns:
            The fitted :class:`GapLaw`; its :attr:`curve` is ``curve``.

        Raises:
            ValueError: a zero gap (duplicates), fewer than two sizes ``>= fit_min_size``, or a
                gap that does not decrease with ``n``.
        """
        if not isinstance(curve, GapCurve):
            raise TypeError(
                "`curve` must be a GapCurve from gapcallback.functional.gap_curve.measure_gap_curve,"
                f" got {type(curve).__name__}."
            )
        if dimension is not None:
            dimension = _check_dimension(dimension)
        if fit_min_size is not None:
            fit_min_size = float(check_number(fit_min_size, "fit_min_size", minimum=1.0))
        group_size = check_positive_int(_as_int(group_size, "group_size"), "group_size")
        return cls._from_curve(
            curve,
            dimension=dimension,
            fit_min_size=fit_min_size,
            group_size=group_size,
            generator=as_generator(seed),
            stacklevel=3,
        )

    @classmethod
    def _from_curve(
        cls,
        curve: GapCurve,
        *,
        dimension: float | None,
        fit_min_size: float | None,
        group_size: int,
        generator: torch.Generator,
        stacklevel: int,
    ) -> GapLaw:
        """:meth:`from_curve` on checked arguments (``stacklevel``: the user's frame for warnings)."""
        sizes, means, p = curve.sizes, curve.gaps, curve.p
        for size, row in zip(sizes.tolist(), curve.subset_gaps, strict=True):
            if bool((row == 0).any()):
                raise ValueError(_zero_gap_message(size, curve.pooled))
        rho_p = curve.neighbour_terms  # LPS anchor at the full size: k-th neighbour terms
        if not bool((rho_p > 0).any()):
            raise ValueError(_zero_gap_message(curve.anchor_size, curve.pooled))
        anchor_mean = float(rho_p.mean())
        anchor_se = float(rho_p.std()) / math.sqrt(rho_p.numel()) if rho_p.numel() > 1 else 0.0
        if fit_min_size is None:
            fit_min = default_fit_min_size(sizes, means, p, curve.anchor_size)
        else:
            fit_min = float(fit_min_size)
        in_fit = sizes >= fit_min - 1e-9
        if dimension is None and int(in_fit.sum()) < 2:
            raise ValueError(
                f"Only {int(in_fit.sum())} of the sizes {sizes.long().tolist()} are >= "
                f"fit_min_size={fit_min:g}; the slope needs at least 2. Lower `fit_min_size`."
            )
        fitted = fit_law(
            sizes,
            means,
            curve.subset_gaps,
            curve.subset_stderr,
            in_fit,
            p=p,
            k=curve.k,
            dimension=dimension,
            anchor_size=curve.anchor_size,
            anchor_mean=anchor_mean,
            anchor_se=anchor_se,
            generator=generator,
            stacklevel=stacklevel + 1,
        )
        law = cls._from_fit(
            fitted,
            p=p,
            n_train=curve.n_train,
            sizes=sizes,
            gaps=means,
            fit_min_size=fit_min,
            anchor_size=curve.anchor_size,
            k=curve.k,
            pooled=curve.pooled,
            group_size=group_size,
        )
        reference_terms = curve.reference_sq_dists
        if p != 2.0:
            reference_terms = reference_terms.pow(p / 2.0)
        law.reference_gap = float(reference_terms.mean())
        law.curve = curve
        if curve.pooled:
            _check_pooling(law, reference_terms, reference_terms.numel(), stacklevel + 1)
        return law

    @classmethod
    def _from_fit(
        cls,
        fitted: LawFit,
        *,
        p: float,
        n_train: int,
        sizes: Tensor,
        gaps: Tensor,
        fit_min_size: float,
        anchor_size: float,
        k: int,
        pooled: bool,
        group_size: int,
    ) -> GapLaw:
        return cls(
            dimension=fitted.dimension,
            constant=fitted.constant,
            p=p,
            dimension_std=fitted.dimension_std,
            constant_std=fitted.constant_std,
            covariance=fitted.covariance.tolist(),
            n_train=n_train,
            sizes=sizes,
            gaps=gaps,
            gaps_std=fitted.gaps_std,
            fit_min_size=fit_min_size,
            anchor_size=anchor_size,
            anchor_gap=fitted.anchor_gap,
            k=k,
            pooled=pooled,
            group_size=group_size,
        )

    # ------------------------------------------------------------------ derived quantities

    @property
    def local_dimensions(self) -> Tensor:
        r"""``[K - 1]`` local dimensions :math:`-p\,\Delta\log n / \Delta\log R` between sizes."""
        if self.sizes.numel() < 2:
            return torch.empty(0, dtype=torch.float64)
        dlog_r = self.gaps.log().diff()
        dlog_n = self.sizes.log().diff()
        local = -self.p * dlog_n / dlog_r
        return torch.where(dlog_r < 0, local, torch.full_like(local, math.inf))

    @property
    def exponent(self) -> float:
        """The decay exponent ``p / dimension`` of :math:`R_n \\propto n^{-p/d}`."""
        return self.p / self.dimension

    @property
    def orbit_constant(self) -> float:
        r"""Constant counted in orbit points, :math:`J\,|G|^{p/d}` (:math:`R^G_n = R_{|G| n}`).

        Comparable to the constant of a law fitted without the symmetry; equals :attr:`constant`
        when ``group_size == 1``.
        """
        return self.constant * self.group_size ** (self.p / self.dimension)

    def predict(self, n: float | Tensor | Sequence[float]) -> float | Tensor:
        r"""Predicted gap :math:`J\,n^{-p/d}` at training-set size(s) ``n``.

        Args:
            n: positive size(s): a number (returns a float) or a tensor / sequence of any shape
                (returns a float64 tensor of that shape).
        """
        n_t, scalar = _as_sizes(n, "n")
        out = self.constant * n_t.pow(-self.p / self.dimension)
        return float(out) if scalar else out

    def predict_interval(
        self, n: float | Tensor | Sequence[float], level: float = 0.9
    ) -> tuple[float, float] | tuple[Tensor, Tensor]:
        r"""Uncertainty band of :meth:`predict` at ``n``: ``(low, high)``, centred on it in log scale.

        Two errors make up the band, both in :math:`\log R(n)`:

        * sampling noise: :math:`\log R(n) = \log J - p\,(1/d)\log n` is linear in
          :math:`(\log J, 1/d)`, whose joint covariance comes from the bootstrap in :meth:`fit`
          (variance :math:`v(n)`);
        * curvature: at finite sizes the measured curve is not straight in log-log (finite-size
          corrections of relative size :math:`n^{-\theta}`, :math:`\theta = \min(1, 2/d)`), so
          the slope fitted on the grid is not the slope beyond it. A fit of the curve with that
          correction (:func:`~gapcallback.law.fit.curvature_bias`, from :attr:`sizes`,
          :attr:`gaps` and :attr:`gaps_std`) estimates the straight law's systematic error
          :math:`b(n)`, the curve's value at ``n`` minus the law's, with variance
          :math:`v_b(n)`; at the anchor it is the difference between the gap measured there and
          the anchor's LPS estimate.

        The error is then taken as :math:`N(b(n), v(n) + v_b(n))` and the band is the shortest
        interval centred on :meth:`predict` that holds ``level`` of it
        (:func:`~gapcallback.law.fit.band_half_width`; :math:`z\sqrt{v}` when the curve is
        straight). With fewer than 4 sizes or unknown ``gaps_std`` only the sampling noise counts.
        Neither covers a change of regime outside the measured range that the curve does not show.
        """
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            raise ValueError(f"`level` must be a probability in (0, 1), got {level!r}.")
        n_t, scalar = _as_sizes(n, "n")
        log_n = n_t.log()
        cov = self._covariance
        var = cov[0, 0] - 2 * self.p * log_n * cov[0, 1] + (self.p * log_n) ** 2 * cov[1, 1]
        curvature = curvature_bias(
            self.sizes,
            self.gaps,
            self.gaps_std,
            n_t,
            p=self.p,
            dimension=self.dimension,
            anchor_size=self.anchor_size,
            anchor_gap=self.anchor_gap,
        )
        sigma = (var.clamp_min(0) + curvature.variance).sqrt()
        half = band_half_width(sigma, curvature.bias, level)
        centre = math.log(self.constant) - self.p / self.dimension * log_n
        low, high = (centre - half).exp(), (centre + half).exp()
        if scalar:
            return float(low), float(high)
        return low, high

    def samples_for(self, target_gap: float | Tensor) -> float | Tensor:
        r"""Training-set size needed to reach ``target_gap``: :math:`n = (J / R)^{d/p}`.

        The inverse of :meth:`predict`. A float for a number, a float64 tensor for a tensor.
        Returns ``inf`` if the size overflows float64.
        """
        target, scalar = _as_sizes(target_gap, "target_gap")
        out = (self.constant / target).pow(self.dimension / self.p)
        return float(out) if scalar else out

    def samples_for_interval(self, target_gap: float, level: float = 0.9) -> tuple[float, float]:
        r"""Range of training-set sizes that reach ``target_gap`` within the band of
        :meth:`predict_interval`: ``(optimistic, pessimistic)``.

        ``optimistic`` is the smallest :math:`n` whose band's lower end reaches the target,
        ``pessimistic`` the smallest whose upper end does (both searched on a log grid of
        :math:`n \in [1, 10^{15}]`, refined by bisection to 0.1%); ``inf`` where the band never
        reaches it in that range. :meth:`samples_for` lies between them.
        """
        target, scalar = _as_sizes(target_gap, "target_gap")
        if not scalar:
            raise TypeError("`target_gap` must be a number.")
        goal = float(target)

        def first_reaching(end: int) -> float:
            def reaches(log_n: float) -> bool:
                band = self.predict_interval(math.exp(log_n), level)
                return band[end] <= goal  # type: ignore[index, operator]

            grid = torch.linspace(0.0, 15 * math.log(10), 601, dtype=torch.float64)
            low, high = self.predict_interval(grid.exp(), level)
            hit = ((low if end == 0 else high) <= goal).nonzero()  # type: ignore[operator]
            if not hit.numel():
                return math.inf
            i = int(hit[0])
            if i == 0:
                return 1.0
            lo, hi = float(grid[i - 1]), float(grid[i])
            while hi - lo > 1e-3:
                mid = 0.5 * (lo + hi)
                lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
            return math.exp(hi)

        return first_reaching(0), first_reaching(1)

    def effective_size(self, observed: float) -> float:
        r"""The training-set size at which the law reaches the gap ``observed``: :math:`(J/R)^{d/p}`.

        :meth:`samples_for` restricted to the sizes the law supports: ``nan`` below the smallest
        measured size (a model far from the law, or samples on another scale) and where
        ``observed <= 0`` (infinite). Values above :attr:`n_train` are extrapolations.
        """
        if not observed > 0:
            return math.nan
        effective = float(self.samples_for(float(observed)))
        lowest = float(self.sizes.min()) if self.sizes.numel() else 1.0
        if not (math.isfinite(effective) and effective >= lowest):
            return math.nan
        return effective

    # ------------------------------------------------------------------ plotting

    def plot(
        self, ax: Axes | None = None, n_max: float | None = None, *, level: float = 0.9
    ) -> tuple[Figure, Axes]:
        """Log-log plot of the measured gaps, the fitted law and its band
        (:func:`gapcallback.plotting.plot_law`).

        Args:
            ax: matplotlib ``Axes`` to draw on; a new figure when ``None``.
            n_max: right end of the fitted line (default ``4 * max(sizes)``).
            level: probability of the uncertainty band.

        Returns:
            ``(figure, axes)``.
        """
        from gapcallback.plotting import plot_law

        return plot_law(self, ax=ax, n_max=n_max, level=level)

    # ------------------------------------------------------------------ (de)serialisation

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (floats, ints, bools, lists) for checkpoints and JSON."""
        return {
            "version": _STATE_VERSION,
            "dimension": self.dimension,
            "constant": self.constant,
            "p": self.p,
            "dimension_std": self.dimension_std,
            "constant_std": self.constant_std,
            "covariance": self._covariance.tolist(),
            "n_train": self.n_train,
            "sizes": self.sizes.tolist(),
            "gaps": self.gaps.tolist(),
            "gaps_std": self.gaps_std.tolist(),
            "fit_min_size": self.fit_min_size,
            "anchor_size": self.anchor_size,
            "anchor_gap": self.anchor_gap,
            "k": self.k,
            "pooled": self.pooled,
            "group_size": self.group_size,
            "reference_gap": self.reference_gap,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> GapLaw:
        """Rebuild a :class:`GapLaw` from :meth:`state_dict`."""
        if not isinstance(state, dict):
            raise TypeError(
                f"`state` must be a dict from GapLaw.state_dict(), got {type(state).__name__}."
            )
        state = dict(state)
        version = state.pop("version", _STATE_VERSION)
        if version != _STATE_VERSION:
            raise ValueError(
                f"Unsupported GapLaw state version {version}; expected {_STATE_VERSION}."
            )
        missing = {"dimension", "constant", "p"} - set(state)
        if missing:
            raise ValueError(f"GapLaw state is missing {sorted(missing)}.")
        return cls(**state)

    def __repr__(self) -> str:
        return (
            f"GapLaw(dimension={self.dimension:.4g} ± {self.dimension_std:.2g}, "
            f"constant={self.constant:.4g} ± {self.constant_std:.2g}, p={self.p:g}, "
            f"n_train={self.n_train}, sizes={self.sizes.numel()}, pooled={self.pooled})"
        )


# ---------------------------------------------------------------------- helpers


def _as_int(value: object, name: str) -> object:
    """``value`` as ``int`` if it is an integer of any kind (numpy, 0-dim tensor), else unchanged
    (for the check that follows to refuse it)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    return int(value) if isinstance(value, numbers.Integral) else value


def _scalar(value: object) -> object:
    """A one-element real tensor as a Python float; anything else unchanged."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    return value


def _as_list(values: object, name: str) -> list[object]:
    if isinstance(values, Tensor):
        return values.reshape(-1).tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"`{name}` must be a 1-D sequence or tensor of numbers, got {values!r}.")
    return list(values)


def _check_spread(value: object, name: str) -> float:
    """A standard deviation (or a gap): a number >= 0, or NaN for "unknown"."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number >= 0 (or NaN if unknown), got {value!r}.")
    out = float(value)
    if not (math.isnan(out) or 0.0 <= out < math.inf):
        raise ValueError(f"`{name}` must be a finite number >= 0 (or NaN if unknown), got {out}.")
    return out


def _check_positive_or_nan(value: object, name: str, default: float) -> float:
    """``None`` (use ``default``), NaN (unknown) or a finite positive number."""
    if value is None:
        return float(default)
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a positive number, NaN or None, got {value!r}.")
    out = float(value)
    if not (math.isnan(out) or 0.0 < out < math.inf):
        raise ValueError(f"`{name}` must be a finite positive number (or NaN), got {out}.")
    return out


def _check_symmetry(symmetry: object) -> None:
    if symmetry is None:
        return
    from gapcallback.symmetry.base import Symmetry

    if not isinstance(symmetry, Symmetry):
        raise TypeError(
            "`symmetry` must be None or a gapcallback.symmetry object (FiniteGroup, CyclicShifts, "
            f"RigidMotions, Permutations), got {type(symmetry).__name__}."
        )


def _check_sizes_values(sizes: object) -> None:
    """``sizes`` (when given) must be a 1-D sequence or tensor of >= 2 strictly increasing ints."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (Sequence, Tensor)):
        raise TypeError(f"`sizes` must be None or a sequence of ints, got {sizes!r}.")
    values = size_values(sizes)
    if len(values) < 2:
        raise ValueError(f"`sizes` needs at least 2 sizes, got {values}.")
    if any(v < 1 for v in values):
        raise ValueError(f"`sizes` must be positive, got {values}.")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"`sizes` must be strictly increasing, got {values}.")


def _check_dimension(dimension: object) -> float:
    if isinstance(dimension, bool) or not isinstance(dimension, (int, float)):
        raise TypeError(f"`dimension` must be a positive number or None, got {dimension!r}.")
    value = float(dimension)
    if not 0.0 < value < math.inf:
        raise ValueError(f"`dimension` must be a finite positive number, got {value}.")
    return value


def _group_size(group_size: int | None, symmetry: Symmetry | None, train: Tensor) -> int:
    if group_size is not None:
        return check_positive_int(group_size, "group_size")
    # order_on: some groups (CyclicShifts, Permutations) know |G| only from the point shape.
    order = symmetry.order_on(train) if symmetry is not None else None
    return int(order) if isinstance(order, int) and order >= 1 else 1


def _size_grid(
    sizes: Sequence[int] | Tensor | None, num_sizes: int, n_max: int, pooled: bool
) -> Tensor:
    """The fit's sizes: ``num_sizes`` geometric from ``n_max / 16`` to ``n_max``, or ``sizes``."""
    what = "n + m - 1 (pooled training and reference points)" if pooled else "n (training points)"
    if sizes is None:
        num_sizes = check_positive_int(num_sizes, "num_sizes", minimum=3)
        if n_max < 32:
            raise ValueError(
                f"The default size grid runs from n_max/16 to n_max = {what} = {n_max}, which needs"
                " n_max >= 32; pass more points or explicit `sizes`."
            )
        return gap_size_grid(n_max, num_sizes, n_max / 16)
    _check_sizes_values(sizes)
    values = [int(v) for v in (sizes.reshape(-1).tolist() if isinstance(sizes, Tensor) else sizes)]
    if values[-1] > n_max:
        raise ValueError(
            f"`sizes` must lie in [1, {n_max}] (n_max = {what}), got {values}; pass more points or"
            " smaller sizes."
        )
    return torch.tensor(values, dtype=torch.float64)


def _zero_gap_message(size: float, pooled: bool) -> str:
    cause = (
        "the pooled `train` and `reference` points contain exact duplicates"
        if pooled
        else "every point of `reference` is a copy of a training point (`train`)"
    )
    return (
        f"The measured gap is 0 at size {int(size)}: {cause}, so the law (fitted in log space) is "
        "undefined. Remove duplicates (e.g. `train = torch.unique(train, dim=0)`) and references "
        "that appear in the training set."
    )


def _as_vector(values: Sequence[float] | Tensor, name: str) -> Tensor:
    try:
        out = torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"`{name}` must be a 1-D sequence or tensor of numbers, got {values!r}."
        ) from err
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"`{name}` contains NaN or Inf: {out.tolist()}.")
    return out


def _as_sizes(n: float | Tensor | Sequence[float], name: str) -> tuple[Tensor, bool]:
    """``n`` as a float64 tensor (and whether it was a plain number); must be finite and > 0."""
    if isinstance(n, bool):
        raise TypeError(f"`{name}` must be a positive number or tensor, got {n!r}.")
    scalar = isinstance(n, (int, float))
    if isinstance(n, Tensor):
        if n.is_complex():
            raise TypeError(f"`{name}` must be real, got dtype {n.dtype}.")
        n_t = n.detach().to(dtype=torch.float64)
    else:
        try:
            n_t = torch.as_tensor(n, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"`{name}` must be a positive number or tensor, got {n!r}.") from err
    if not bool(torch.isfinite(n_t).all()) or not bool((n_t > 0).all()):
        raise ValueError(f"`{name}` must be finite and positive, got {n!r}.")
    return n_t, scalar


def _check_pooling(law: GapLaw, reference_terms: Tensor, m: int, stacklevel: int) -> None:
    """Warn when references and training points do not look like one distribution."""
    measured = float(reference_terms.mean())
    predicted = law.predict(law.n_train)
    if measured <= 0.0 or not isinstance(predicted, float):
        return
    se = float(reference_terms.std()) / math.sqrt(m) / measured if m > 1 else 0.0
    low, high = law.predict_interval(law.n_train, 0.6827)
    law_se = math.log(high / low) / 2.0 if isinstance(low, float) and low > 0 else 0.0
    if abs(math.log(measured / predicted)) > 0.05 + 4.0 * math.hypot(se, law_se):
        warnings.warn(
            f"The references' gap to the training set ({measured:.4g}) differs from the pooled law's"
            f" prediction at n={law.n_train} ({predicted:.4g}) by more than sampling noise explains:"
            " references and training points do not look like draws of one distribution. Refit"
            " with `pooled=False`, which estimates the gap of these references.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
