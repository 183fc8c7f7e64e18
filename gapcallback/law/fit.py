r"""Fitting the gap law to a measured gap curve: pure statistics, no search.

Given the gap :math:`R_{n_k}` at sizes :math:`n_1 < \dots < n_K` (a
:class:`~gapcallback.functional.gap_curve.GapCurve`, or gaps measured elsewhere), :func:`fit_law`
returns the point estimates and uncertainties of :math:`R_n = J\, n^{-p/d}`:

* the slope :math:`\hat b` of :math:`\log R` against :math:`\log n` (ordinary least squares,
  :func:`~gapcallback.functional.gap_curve.fit_line`) over the sizes ``>= fit_min_size``, and
  :math:`\hat d = -p / \hat b`;
* the constant, pinned at the *anchor* (the largest size :math:`N_\mathrm{eff}`) by the
  Leonenko-Pronzato-Savani estimator (:func:`lps_log_constant`): with :math:`a = p / d`,
  :math:`\log J = \log\!\left[\Gamma(1+a)\,\Gamma(k)/\Gamma(k+a)\; N_\mathrm{eff}^{\,a}\,
  \overline{\rho_k^p}\right]`;
* a bootstrap of both, whose draws give the covariance of :math:`(\log J, 1/d)`: the prediction
  :math:`\log R(n) = \log J - p\,(1/d) \log n` is linear in them, so the covariance gives the
  sampling variance of every prediction;
* the systematic error of the straight line (:func:`curvature_bias`): the measured curve is not
  straight in log-log at finite ``n`` (finite-size corrections of relative size
  :math:`n^{-\theta}`), so the slope fitted on the grid differs from the slope beyond it. A fit of
  the curve with its leading correction estimates that error and its variance;
  :meth:`GapLaw.predict_interval <gapcallback.law.GapLaw.predict_interval>` combines the three.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from scipy import special, stats
from torch import Tensor

from gapcallback.functional.gap_curve import fit_line, slope_rounding

__all__ = [
    "NUM_BOOTSTRAP",
    "CurvatureBias",
    "LawFit",
    "band_half_width",
    "correction_exponent",
    "curvature_bias",
    "default_fit_min_size",
    "fit_law",
    "lps_log_constant",
]

NUM_BOOTSTRAP = 400
"""Bootstrap draws behind every uncertainty of a fit."""


class LawFit(NamedTuple):
    """Result of :func:`fit_law` (the fields of :class:`~gapcallback.law.GapLaw` it sets).

    Attributes:
        dimension: :math:`\\hat d` (or the fixed dimension).
        constant: :math:`J`.
        dimension_std: bootstrap standard deviation of ``dimension`` (0 when fixed; NaN when
            unknown).
        constant_std: bootstrap standard deviation of ``constant``.
        covariance: ``[2, 2]`` float64 covariance of :math:`(\\log J, 1/d)`.
        gaps_std: ``[K]`` float64 bootstrap standard error of each size's gap.
        anchor_gap: the fitted law at the anchor, :math:`J\\,N_\\mathrm{eff}^{-p/d}`.
    """

    dimension: float
    constant: float
    dimension_std: float
    constant_std: float
    covariance: Tensor
    gaps_std: Tensor
    anchor_gap: float


def default_fit_min_size(sizes: Tensor, gaps: Tensor, p: float, n_max: float) -> float:
    r"""Smallest size of the slope fit: :math:`n_\max / \mathrm{clip}(2^{8/d_0}, 4, 16)`.

    :math:`d_0 = -p / \hat b_0` is the slope dimension of the whole curve (positive gaps only).
    The finite-size bias of the slope decays like :math:`n^{-2/d}`: small dimensions (noisiest
    gaps, negligible bias) use the whole grid (``d0 <= 2``) and ``d0 >= 4`` the upper quarter.
    At least the two largest sizes are kept.
    """
    positive = gaps > 0
    slope = (
        float(fit_line(sizes[positive].log(), gaps[positive].log()).slope)
        if int(positive.sum()) >= 2
        else 0.0
    )
    ratio = 4.0 if not slope < 0 else min(16.0, max(4.0, 2.0 ** (8.0 * -slope / p)))
    fit_min = n_max / ratio
    if int((sizes >= fit_min - 1e-9).sum()) < 2:  # short custom grids: keep at least two sizes
        fit_min = float(sizes[-2])
    return float(fit_min)


def lps_log_constant(
    anchor_mean: Tensor, anchor_size: float, p: float, inv_d: Tensor, k: int
) -> Tensor:
    r"""LPS: :math:`\log J = \log[\Gamma(1+a)\Gamma(k)/\Gamma(k+a)\, N^{a}\, \overline{\rho^p}]`, a = p/d.

    Args:
        anchor_mean: ``[B]`` mean :math:`\overline{\rho_k^p}` of the k-th neighbour terms.
        anchor_size: :math:`N_\mathrm{eff}`, the points each query saw.
        p: loss exponent.
        inv_d: ``[B]`` values of :math:`1/d`.
        k: neighbour rank.

    Returns:
        ``[B]`` float64 :math:`\log J`.
    """
    a = p * inv_d
    a_np = a.numpy()
    log_gamma = torch.from_numpy(
        special.gammaln(1.0 + a_np) + special.gammaln(k) - special.gammaln(k + a_np)
    )
    return log_gamma + a * math.log(anchor_size) + anchor_mean.log()


def fit_law(
    sizes: Tensor,
    gaps: Tensor,
    subset_gaps: Sequence[Tensor],
    subset_stderr: Sequence[Tensor],
    in_fit: Tensor,
    *,
    p: float,
    k: int,
    dimension: float | None,
    anchor_size: float,
    anchor_mean: float,
    anchor_se: float,
    generator: torch.Generator,
    stacklevel: int = 2,
) -> LawFit:
    r"""Point estimate and bootstrap of the law from a measured curve.

    Args:
        sizes: ``[K]`` sizes :math:`n_k`.
        gaps: ``[K]`` positive gaps :math:`R_{n_k}`.
        subset_gaps: ``K`` tensors ``[B_k]``, the independent estimates averaged into ``gaps``.
        subset_stderr: ``K`` tensors ``[B_k]``, their standard errors (used where ``B_k = 1``).
        in_fit: ``[K]`` bool, the sizes of the slope fit (>= 2 unless ``dimension`` is fixed).
        p: loss exponent.
        k: neighbour rank of the anchor's LPS estimator (1: the anchor is a measured gap).
        dimension: fix :math:`d` instead of fitting the slope.
        anchor_size: :math:`N_\mathrm{eff}`.
        anchor_mean: :math:`\overline{\rho_k^p}` at the anchor.
        anchor_se: its standard error.
        generator: CPU generator for the bootstrap.
        stacklevel: of the warning that most bootstrap fits failed (the caller's frame).

    The bootstrap resamples the subsets' gap estimates at each size (or perturbs a single estimate
    by its standard error), refits the slope, and perturbs the anchor by its standard error.

    Raises:
        ValueError: the fitted slope is not negative (the gap does not decrease).
    """
    log_n = sizes.log()
    if dimension is None:
        log_gaps = gaps[in_fit].log()
        slope = float(fit_line(log_n[in_fit], log_gaps).slope)
        if not slope < -slope_rounding(log_n[in_fit], log_gaps):  # equal gaps: 0 up to rounding
            raise ValueError(
                f"The gap does not decrease with the training-set size (fitted slope {slope:.3g}"
                f" of log R vs log n over sizes {sizes[in_fit].long().tolist()}, gaps "
                f"{[f'{g:.3g}' for g in gaps[in_fit].tolist()]}). Either the sizes are too "
                "small to leave the pre-asymptotic regime, the references are far from the "
                "training distribution, or the data are (near-)duplicated; use more points, "
                "larger `sizes`, or fix `dimension`."
            )
        d = -p / slope
    else:
        d = dimension

    boot = NUM_BOOTSTRAP
    boot_means = torch.empty(boot, sizes.numel(), dtype=torch.float64)
    for i, (cell_means, cell_sds) in enumerate(zip(subset_gaps, subset_stderr, strict=True)):
        if cell_means.numel() >= 2:  # subsets are i.i.d. estimates: resample them
            pick = torch.randint(
                cell_means.numel(), (boot, cell_means.numel()), generator=generator
            )
            draws = cell_means[pick]
        else:  # a single measurement: perturb it by its standard error
            noise = torch.randn(boot, 1, generator=generator, dtype=torch.float64)
            draws = cell_means + cell_sds * noise
        boot_means[:, i] = draws.mean(dim=1)
    boot_means = boot_means.clamp_min(torch.finfo(torch.float64).tiny)
    gaps_std = boot_means.std(dim=0)
    anchor_draws = anchor_mean + anchor_se * torch.randn(
        boot, generator=generator, dtype=torch.float64
    )
    if dimension is None:
        slopes = fit_line(log_n[in_fit], boot_means[:, in_fit].log()).slope
        good = (slopes < 0) & (anchor_draws > 0)
        inv_d = -slopes[good] / p
        anchor_draws = anchor_draws[good]
    else:
        good = anchor_draws > 0
        inv_d = torch.full((int(good.sum()),), 1.0 / d, dtype=torch.float64)
        anchor_draws = anchor_draws[good]
    if inv_d.numel() < boot // 2:
        warnings.warn(
            "More than half of the bootstrap fits gave a non-decreasing gap; the dimension and"
            " its uncertainty are unreliable. Use more points or repeats.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    log_j_draws = lps_log_constant(anchor_draws, anchor_size, p, inv_d, k)
    log_j = float(
        lps_log_constant(
            torch.tensor([anchor_mean], dtype=torch.float64),
            anchor_size,
            p,
            torch.tensor([1.0 / d], dtype=torch.float64),
            k,
        )[0]
    )
    if inv_d.numel() >= 2:
        covariance = torch.cov(torch.stack([log_j_draws, inv_d]))
        d_std = float((1.0 / inv_d).std()) if dimension is None else 0.0
        j_std = float(log_j_draws.exp().std())
        # Bootstrap slopes near 0 give unbounded draws (inf): the spread is unknown.
        d_std, j_std = (v if math.isfinite(v) else math.nan for v in (d_std, j_std))
    else:
        covariance = torch.zeros(2, 2, dtype=torch.float64)
        d_std = j_std = math.nan
    constant = math.exp(log_j)
    return LawFit(
        dimension=d,
        constant=constant,
        dimension_std=d_std,
        constant_std=j_std,
        covariance=covariance,
        gaps_std=gaps_std,
        anchor_gap=constant * anchor_size ** (-p / d),
    )


class CurvatureBias(NamedTuple):
    r"""Result of :func:`curvature_bias` (log scale, one value per requested size).

    Attributes:
        bias: estimated :math:`\log R_\text{true}(n) - \log R_\text{law}(n)`, the systematic
            error of the straight law.
        variance: variance of that estimate.
    """

    bias: Tensor
    variance: Tensor


def correction_exponent(dimension: float) -> float:
    r"""Exponent :math:`\theta = \min(1, 2/d)` of the leading finite-size correction of the gap.

    :math:`R_n = J n^{-p/d} (1 + A n^{-\theta} + \dots)`: curvature of the manifold (or of its
    embedding: chords shorter than arcs) and gradients of the density change the distribution of
    nearest-neighbour distances at the scale :math:`n^{-1/d}` in relative order :math:`n^{-2/d}`;
    the discreteness of ``n`` points (the Beta laws behind the asymptotic Gamma ones, e.g.
    :math:`E\rho^2 \propto 1/((n+1)(n+2))` on a circle) in relative order :math:`n^{-1}`. The
    slower one leads.
    """
    return min(1.0, 2.0 / dimension)


def curvature_bias(
    sizes: Tensor,
    gaps: Tensor,
    gaps_std: Tensor,
    n: Tensor,
    *,
    p: float,
    dimension: float,
    anchor_size: float,
    anchor_gap: float,
) -> CurvatureBias:
    r"""The straight law's systematic error at sizes ``n``, from the curvature of the measured curve.

    The law is the line :math:`y = \log \hat R(N) - (p/d)(x - x_N)` in
    :math:`(x, y) = (\log n, \log R)`, through the anchor (``anchor_gap`` at
    :math:`x_N = \log N_\mathrm{eff}`). The measured curve is fitted by weighted least squares
    (weights :math:`1/\sigma_k^2`, :math:`\sigma_k` = ``gaps_std / gaps``) with its leading
    finite-size correction,

    .. math::

        f(x) = \alpha + \beta\,(x - x_N) + \gamma\,u(x), \qquad
        u(x) = e^{-\theta (x - x_N)} - 1, \quad \theta = \min(1, 2/d)

    (:func:`correction_exponent`), and the bias is the difference between that curve and the
    line, :math:`b(n) = \hat f(x) - y(x)`: zero for an exact power law through the anchor; at the
    anchor, the difference between the gap measured there and the anchor's estimate (the LPS
    estimate for ``k > 1``); beyond the grid, what the curvature adds to the straight
    extrapolation. Its variance is that of :math:`\hat f(x)`,
    :math:`c^\top (A^\top W A)^{-1} c` with :math:`c = (1, x - x_N, u(x))`, treating the sizes as
    independent.

    Args:
        sizes: ``[K]`` measured sizes.
        gaps: ``[K]`` positive measured gaps.
        gaps_std: ``[K]`` their standard errors.
        n: sizes (any shape) at which to evaluate the bias.
        p: loss exponent.
        dimension: the law's dimension.
        anchor_size: :math:`N_\mathrm{eff}`.
        anchor_gap: the law at the anchor, :math:`J N_\mathrm{eff}^{-p/d}`.

    Returns:
        :class:`CurvatureBias` of ``n``'s shape; zeros (no correction) with fewer than 4 sizes,
        a standard error that is not positive and finite, an unknown anchor or a singular design.

    Example:
        >>> sizes = torch.tensor([100.0, 200.0, 400.0, 800.0], dtype=torch.float64)
        >>> gaps = 40 / sizes * torch.exp(2 / sizes)  # R = 40/n with a 1/n correction (d = 2)
        >>> out = curvature_bias(sizes, gaps, 0.01 * gaps, torch.tensor(3200.0), p=2.0,
        ...                      dimension=2.0, anchor_size=800.0, anchor_gap=float(gaps[-1]))
        >>> round(float(out.bias), 9)  # log R(3200) - log R(800) + log 4 = 2/3200 - 2/800
        -0.001875
    """
    n = torch.as_tensor(n, dtype=torch.float64)
    zeros = CurvatureBias(torch.zeros_like(n), torch.zeros_like(n))
    sigma = gaps_std / gaps
    usable = sizes.numel() >= 4 and 0.0 < anchor_size < math.inf and 0.0 < anchor_gap < math.inf
    if not usable or not bool(((sigma > 0) & torch.isfinite(sigma)).all()):
        return zeros
    theta = correction_exponent(dimension)
    x_anchor = math.log(anchor_size)
    dx = sizes.log() - x_anchor
    design = torch.stack([torch.ones_like(dx), dx, torch.expm1(-theta * dx)], dim=1)
    weights = sigma.reciprocal()
    weighted = design * weights[:, None]
    gram = weighted.T @ weighted
    if not bool(torch.linalg.matrix_rank(gram) == 3):
        return zeros
    inverse = torch.linalg.inv(gram)
    coef = inverse @ (weighted.T @ (gaps.log() * weights))
    qx = n.log() - x_anchor
    c = torch.stack([torch.ones_like(qx), qx, torch.expm1(-theta * qx)], dim=-1)
    line = math.log(anchor_gap) - p / dimension * qx
    bias = c @ coef - line
    variance = ((c @ inverse) * c).sum(dim=-1).clamp_min(0.0)
    return CurvatureBias(bias, variance)


def band_half_width(sigma: Tensor, bias: Tensor, level: float) -> Tensor:
    r"""Half width ``h`` of the shortest interval ``[-h, h]`` holding ``level`` of :math:`N(b, \sigma^2)`.

    :math:`h = \sigma \sqrt{q}` with ``q`` the ``level`` quantile of the noncentral
    :math:`\chi^2_1(b^2/\sigma^2)` (:math:`|N(b, \sigma^2)| / \sigma` is its square root): the
    symmetric band around the law's prediction that covers the truth with probability ``level``
    when the error is Gaussian with mean ``b`` (the estimated bias). ``b = 0`` gives the usual
    :math:`z_{(1+\text{level})/2}\, \sigma`.
    """
    sigma = sigma.clamp_min(0.0)
    z = float(stats.norm.ppf(0.5 + level / 2))
    centred = z * sigma
    t2 = torch.where(sigma > 0, (bias / sigma.clamp_min(1e-300)).square(), torch.zeros_like(bias))
    if not bool((t2 > 0).any()):
        return centred
    q = torch.as_tensor(stats.ncx2.ppf(level, 1, t2.clamp_min(1e-300).numpy()), dtype=torch.float64)
    return torch.where(t2 > 0, sigma * q.sqrt(), centred)
