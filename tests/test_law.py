"""Tests of :class:`gapcallback.law.GapLaw`.

Oracles: hand-built power laws (exact), closed-form constants of uniform densities
(:math:`J = \\Gamma(1 + p/d) V_d^{-p/d} \\mathrm{vol}^{p/d}`), the exact expected gap on spheres
(a 1-D integral) and Monte Carlo with fresh training points.
"""

from __future__ import annotations

import json
import math
import warnings

import matplotlib
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, special

from gapcallback.functional.gap import representation_gap
from gapcallback.law import GapLaw

matplotlib.use("Agg")


def _sphere(n: int, d: int, seed: int, ambient: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    if ambient is not None:
        x = torch.nn.functional.pad(x, (0, ambient - d - 1))
    return x


def _exact_sphere_gap(n: int, d: int, p: float = 2.0) -> float:
    """E[min_j |y - x_j|^p] for n uniform points on the unit sphere S^d (chordal distance)."""
    theta = np.linspace(0.0, np.pi, 200_001)
    cap = integrate.cumulative_trapezoid(np.sin(theta) ** (d - 1), theta, initial=0.0)
    cap /= cap[-1]
    chord_p = (2 * np.sin(theta / 2)) ** p
    survival = (1.0 - cap) ** n
    return float(np.sum(0.5 * (survival[1:] + survival[:-1]) * np.diff(chord_p)))


def _uniform_constant(d: int, volume: float, p: float = 2.0) -> float:
    """J = Gamma(1 + p/d) V_d^(-p/d) vol^(p/d) for the uniform density on a d-manifold."""
    v_d = math.pi ** (d / 2) / special.gamma(d / 2 + 1)
    return special.gamma(1 + p / d) * (volume / v_d) ** (p / d)


@pytest.fixture(scope="module")
def sphere_law() -> GapLaw:
    x = _sphere(1200, 2, seed=0)
    return GapLaw.fit(x[:600], x[600:], seed=0)


# ---------------------------------------------------------------------- exact power laws


@pytest.mark.parametrize(
    ("d", "p", "constant"), [(1.0, 2.0, 19.7), (3.5, 1.0, 0.8), (8.0, 2.0, 3.0)]
)
def test_from_gaps_recovers_exact_power_law(d: float, p: float, constant: float) -> None:
    sizes = torch.tensor([100.0, 200.0, 400.0, 800.0, 1600.0], dtype=torch.float64)
    gaps = constant * sizes ** (-p / d)
    law = GapLaw.from_gaps(sizes, gaps, p=p)
    assert law.dimension == pytest.approx(d, rel=1e-10)
    assert law.constant == pytest.approx(constant, rel=1e-10)
    torch.testing.assert_close(law.local_dimensions, torch.full((4,), d, dtype=torch.float64))
    # Extrapolation R(n') = R(n) (n / n')^(p/d), exactly.
    assert law.predict(12800) == pytest.approx(
        float(gaps[-1]) * (1600 / 12800) ** (p / d), rel=1e-10
    )
    assert law.dimension_std == pytest.approx(0.0, abs=1e-12)
    low, high = law.predict_interval(12800)
    assert low == pytest.approx(high, rel=1e-9)


@pytest.mark.parametrize("gap", [0.3, 0.1, 1e-30, 7.0])
def test_from_gaps_refuses_a_flat_curve_whatever_the_rounding(gap: float) -> None:
    # Equal gaps fit to a slope of a few ulps, of either sign: never a finite dimension of 1e31.
    sizes = torch.tensor([8.0, 11.0, 16.0, 23.0, 32.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="does not decrease"):
        GapLaw.from_gaps(sizes, torch.full((5,), gap, dtype=torch.float64))


def test_from_gaps_fixed_dimension_anchors_at_largest_size() -> None:
    sizes = [10.0, 100.0, 1000.0]
    gaps = [1.0, 0.5, 0.1]
    law = GapLaw.from_gaps(sizes, gaps, dimension=2.0)
    assert law.dimension == 2.0
    assert law.predict(1000) == pytest.approx(0.1, rel=1e-12)
    assert law.constant == pytest.approx(0.1 * 1000.0, rel=1e-12)


def test_from_gaps_uncertainty_grows_with_extrapolation() -> None:
    sizes = torch.tensor([100.0, 200.0, 400.0, 800.0])
    gaps = 2.0 * sizes ** (-0.5)
    law = GapLaw.from_gaps(
        sizes, gaps * torch.tensor([1.02, 0.99, 1.01, 1.0]), gaps_std=0.02 * gaps
    )
    assert law.dimension_std > 0
    widths = [math.log(h / lo) for lo, h in (law.predict_interval(n) for n in (800, 8000, 80000))]
    assert widths[0] < widths[1] < widths[2]
    low, high = law.predict_interval(8000, level=0.5)
    low90, high90 = law.predict_interval(8000, level=0.9)
    assert low90 < low < law.predict(8000) < high < high90


@settings(max_examples=60, deadline=None)
@given(
    d=st.floats(0.5, 50.0),
    p=st.floats(0.25, 4.0),
    constant=st.floats(1e-3, 1e3),
    n=st.floats(1.0, 1e7),
)
def test_predict_and_samples_for_are_inverse(d: float, p: float, constant: float, n: float) -> None:
    law = GapLaw(dimension=d, constant=constant, p=p)
    gap = law.predict(n)
    assert isinstance(gap, float)
    assert law.samples_for(gap) == pytest.approx(n, rel=1e-9)
    # Doubling n divides the gap by 2^(p/d).
    assert law.predict(2 * n) == pytest.approx(gap * 2 ** (-p / d), rel=1e-12)


def test_predict_is_vectorised() -> None:
    law = GapLaw(dimension=4.0, constant=2.0)
    n = torch.tensor([[1.0, 16.0], [256.0, 4096.0]])
    out = law.predict(n)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2) and out.dtype == torch.float64
    torch.testing.assert_close(out, 2.0 * n.double() ** -0.5)
    torch.testing.assert_close(law.predict([1, 16]), torch.tensor([2.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(law.samples_for(out), n.double())
    low, high = law.predict_interval(n)
    assert low.shape == high.shape == (2, 2)


# ---------------------------------------------------------------------- data of known dimension


def test_circle_dimension_and_closed_form_constant() -> None:
    # Unit circle: d = 1, length 2 pi, J = Gamma(3) (2 pi / 2)^2 = 2 pi^2 (arc ~ chord).
    x = _sphere(1600, 1, seed=1, ambient=3)
    law = GapLaw.fit(x[:800], x[800:], repeats=3, seed=1)
    assert law.dimension == pytest.approx(1.0, abs=0.05)
    fixed = GapLaw.fit(x[:800], x[800:], k=8, dimension=1.0, sizes=[800, 1599], repeats=1)
    assert fixed.constant == pytest.approx(_uniform_constant(1, 2 * math.pi), rel=0.06)
    assert fixed.dimension_std == 0.0


def test_sphere_fit_matches_closed_form_and_exact_gap(sphere_law: GapLaw) -> None:
    law = sphere_law
    assert law.dimension == pytest.approx(2.0, abs=0.2)
    assert law.dimension_std < 0.2
    # Unit S^2: J = Gamma(2) V_2^-1 (4 pi) = 4, so R_n ~ 4 / n.
    assert law.predict(4000) == pytest.approx(_exact_sphere_gap(4000, 2), rel=0.08)
    assert _exact_sphere_gap(4000, 2) == pytest.approx(4.0 / 4000, rel=0.01)
    assert law.sizes[-1] == 1199  # pooled: every point sees the other 1199
    assert law.anchor_size == 1199.0
    assert torch.all(law.sizes[1:] > law.sizes[:-1])
    assert torch.all(law.gaps_std > 0)
    # Measured gaps agree with the exact expectation at every grid size.
    exact = torch.tensor([_exact_sphere_gap(int(s), 2) for s in law.sizes], dtype=torch.float64)
    torch.testing.assert_close(law.gaps, exact, rtol=0.1, atol=0.0)


@pytest.mark.parametrize("k", [1, 6])
def test_lps_estimator_matches_exact_gap_on_sphere(k: int) -> None:
    # LPS with the true d: Gamma(1+p/d) Gamma(k)/Gamma(k+p/d) ((N-1)/n)^(p/d) mean rho_k^p.
    d = 3
    x = _sphere(1600, d, seed=k, ambient=6)
    for pooled in (True, False):
        law = GapLaw.fit(
            x[:800], x[800:], k=k, dimension=float(d), pooled=pooled, sizes=[400, 799], repeats=1
        )
        for n in (300, 1000, 4000):
            assert law.predict(n) == pytest.approx(_exact_sphere_gap(n, d), rel=0.06), (pooled, n)


def test_unpooled_law_follows_references_from_another_distribution() -> None:
    # Training density q = 1.6 on [0, 1/2] and 0.4 on [1/2, 1], references uniform on [0, 1]:
    # R_n ~ Gamma(3) / 2^2 * int pi q^-2 / n^2 = 0.5 * 3.3203 / n^2. Pooling both (mixture density
    # f = (q + pi) / 2) estimates 0.5 * int f^-1 / n^2 = 0.5 * 1.0989 / n^2 instead: 3x too small.
    g = torch.Generator().manual_seed(3)
    n = 3000

    def draw_train(size: int) -> torch.Tensor:
        u = torch.rand(size, 1, generator=g, dtype=torch.float64)
        dense = torch.rand(size, 1, generator=g, dtype=torch.float64) < 0.8
        return torch.where(dense, 0.5 * u, 0.5 + 0.5 * u)

    train = draw_train(n)
    reference = torch.rand(n, 1, generator=g, dtype=torch.float64)
    law = GapLaw.fit(train, reference, pooled=False, dimension=1.0, k=8, sizes=[1500, n], seed=0)
    closed_form = 0.5 * (0.5 / 1.6**2 + 0.5 / 0.4**2) / (2 * n) ** 2
    fresh = [float(representation_gap(reference, draw_train(2 * n))) for _ in range(3)]
    assert float(np.mean(fresh)) == pytest.approx(closed_form, rel=0.2)  # Monte Carlo
    assert law.predict(2 * n) == pytest.approx(closed_form, rel=0.25)
    with pytest.warns(RuntimeWarning, match="pooled=False"):
        pooled = GapLaw.fit(train, reference, pooled=True, dimension=1.0, sizes=[n, 2 * n - 1])
    mixture_form = 0.5 * (0.5 / 1.3 + 0.5 / 0.7) / (2 * n) ** 2
    assert pooled.predict(2 * n) == pytest.approx(mixture_form, rel=0.2)


def test_pooled_fit_does_not_warn_on_iid_data(sphere_law: GapLaw) -> None:
    x = _sphere(800, 2, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        law = GapLaw.fit(x[:400], x[400:], seed=2)
    # The references' own gap to the training set agrees with the law at n_train.
    assert law.reference_gap == pytest.approx(law.predict(400), rel=0.15)


def test_unpooled_grid_and_anchor(sphere_law: GapLaw) -> None:
    x = _sphere(1200, 2, seed=0)
    law = GapLaw.fit(x[:600], x[600:], pooled=False, repeats=3, k=1, seed=0)
    assert not law.pooled
    assert law.sizes[-1] == 600 and law.anchor_size == 600.0 and law.n_train == 600
    # k = 1 without pooling: the anchor is exactly the measured gap of the references.
    assert law.anchor_gap == pytest.approx(law.reference_gap, rel=1e-9)
    assert law.gaps[-1] == pytest.approx(law.reference_gap, rel=1e-9)
    assert law.dimension == pytest.approx(sphere_law.dimension, abs=0.4)


def test_fit_is_reproducible_and_flattens_trailing_dims() -> None:
    x = _sphere(400, 3, seed=7).float()
    a = GapLaw.fit(x[:200], x[200:], repeats=2, seed=11)
    b = GapLaw.fit(x[:200].reshape(200, 2, 2), x[200:].reshape(200, 2, 2), repeats=2, seed=11)
    assert a.dimension == b.dimension and a.constant == b.constant
    torch.testing.assert_close(a.gaps, b.gaps)
    c = GapLaw.fit(x[:200], x[200:], repeats=2, seed=torch.Generator().manual_seed(11))
    assert c.dimension == a.dimension


def test_explicit_sizes_and_fit_range() -> None:
    x = _sphere(1000, 2, seed=8)
    law = GapLaw.fit(x[:500], x[500:], sizes=[50, 100, 200, 400, 999], fit_min_size=50, seed=0)
    torch.testing.assert_close(
        law.sizes, torch.tensor([50.0, 100.0, 200.0, 400.0, 999.0], dtype=torch.float64)
    )
    assert law.fit_min_size == 50.0
    assert law.dimension == pytest.approx(2.0, abs=0.3)


def test_symmetry_shrinks_constant_like_a_larger_training_set() -> None:
    from gapcallback.symmetry.finite_group import FiniteGroup

    # Points on S^2 and the sign flip x -> -x (|G| = 2): R^G_n ~ R_{2n}.
    x = _sphere(1600, 2, seed=9)
    flip = FiniteGroup([torch.neg], names=["neg"])
    law = GapLaw.fit(
        x[:800], x[800:], symmetry=flip, dimension=2.0, k=4, sizes=[800, 1599], repeats=1
    )
    assert law.group_size == 2
    assert law.predict(1000) == pytest.approx(_exact_sphere_gap(2000, 2), rel=0.08)
    assert law.orbit_constant == pytest.approx(2 * law.constant, rel=1e-12)


# ---------------------------------------------------------------------- state, repr, plot


def test_state_dict_round_trip(sphere_law: GapLaw) -> None:
    state = sphere_law.state_dict()
    restored = GapLaw.from_state_dict(json.loads(json.dumps(state)))
    for name in (
        "dimension",
        "constant",
        "dimension_std",
        "constant_std",
        "p",
        "n_train",
        "k",
        "anchor_size",
        "anchor_gap",
        "pooled",
        "group_size",
        "reference_gap",
    ):
        assert getattr(restored, name) == getattr(sphere_law, name), name
    torch.testing.assert_close(restored.sizes, sphere_law.sizes)
    torch.testing.assert_close(restored.gaps_std, sphere_law.gaps_std)
    n = torch.tensor([10.0, 1e3, 1e5])
    torch.testing.assert_close(restored.predict(n), sphere_law.predict(n))
    torch.testing.assert_close(restored.predict_interval(n)[0], sphere_law.predict_interval(n)[0])
    assert "dimension=" in repr(restored) and "pooled=True" in repr(restored)


def test_plot_returns_axes(sphere_law: GapLaw) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    fig, ax = sphere_law.plot(n_max=20000)
    assert isinstance(ax, Axes)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.lines) >= 1 and ax.get_xlim()[1] >= 20000
    _, ax2 = GapLaw(dimension=2.0, constant=1.0).plot(ax=ax)
    assert ax2 is ax
    plt.close(fig)


# ---------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors() -> None:
    x = _sphere(200, 2, seed=0)
    with pytest.raises(ValueError, match="finite positive"):
        GapLaw.fit(x[:100], x[100:], p=0.0)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        GapLaw.fit(x[:100].numpy(), x[100:])
    bad = x[:100].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        GapLaw.fit(bad, x[100:])
    with pytest.raises(ValueError, match="features"):
        GapLaw.fit(x[:100], x[100:, :2])
    with pytest.raises(ValueError, match="n_max >= 32"):
        GapLaw.fit(x[:10], x[10:15])
    with pytest.raises(ValueError, match="strictly increasing"):
        GapLaw.fit(x[:100], x[100:], sizes=[50, 20, 80])
    with pytest.raises(ValueError, match=r"lie in \[1, 199\]"):
        GapLaw.fit(x[:100], x[100:], sizes=[50, 100, 400])
    with pytest.raises(ValueError, match="fit_min_size"):
        GapLaw.fit(x[:100], x[100:], sizes=[20, 40, 80], fit_min_size=70)
    with pytest.raises(TypeError, match="repeats"):
        GapLaw.fit(x[:100], x[100:], repeats=2.5)
    with pytest.raises(ValueError, match="dimension"):
        GapLaw.fit(x[:100], x[100:], dimension=-1.0)


def test_zero_gap_is_reported_with_its_cause() -> None:
    x = _sphere(200, 2, seed=0)
    with pytest.raises(ValueError, match="copy of a training point"):
        GapLaw.fit(x, x[:50], pooled=False)
    with pytest.raises(ValueError, match="duplicates"):
        GapLaw.fit(x, x, pooled=True)


def test_non_decreasing_gap_is_reported() -> None:
    with pytest.raises(ValueError, match="does not decrease"):
        GapLaw.from_gaps([10, 100, 1000], [0.1, 0.2, 0.3])
    # Pure noise in one dimension far beyond its range: the gap cannot fall with n.
    with pytest.raises(ValueError, match="positive"):
        GapLaw.from_gaps([10, 100], [0.1, 0.0])


def test_bad_arguments_of_methods() -> None:
    law = GapLaw(dimension=2.0, constant=1.0)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="target_gap"):
            law.samples_for(bad)
        with pytest.raises(ValueError, match="`n`"):
            law.predict(bad)
    with pytest.raises(TypeError):
        law.predict("100")
    with pytest.raises(ValueError, match="level"):
        law.predict_interval(100, level=1.5)
    with pytest.raises(ValueError, match="version"):
        GapLaw.from_state_dict({**law.state_dict(), "version": 99})
    with pytest.raises(ValueError, match="constant"):
        GapLaw(dimension=2.0, constant=0.0)


def test_group_size_read_from_shape_dependent_symmetry():
    """CyclicShifts knows |G| only from the point shape: the law must ask with the data."""
    from gapcallback.symmetry import CyclicShifts

    g = torch.Generator().manual_seed(0)
    phase = torch.rand(300, 1, generator=g) * 2 * torch.pi
    grid = torch.arange(8) * (2 * torch.pi / 8)
    signals = torch.cos(grid + phase) + 0.05 * torch.randn(300, 8, generator=g)
    law = GapLaw.fit(signals[:200], signals[200:], symmetry=CyclicShifts(), num_sizes=4, repeats=2)
    assert law.group_size == 8


# ---------------------------------------------------------------------- exactness and cost of fit


def _sq_dists(a: torch.Tensor, b: torch.Tensor, flip: bool) -> torch.Tensor:
    """Brute-force float64 squared distances by direct difference (orbit {x, -x} with ``flip``)."""
    a, b = a.double(), b.double()
    d = (a[:, None] - b[None]).square().sum(-1)
    return torch.minimum(d, (a[:, None] + b[None]).square().sum(-1)) if flip else d


def _brute_force_fit_terms(train, reference, law, *, repeats, seed, pooled, flip=False):
    """Per-size mean gaps of GapLaw.fit's subsets (same shuffles), and the references' gap.

    Each pass shuffles the pool with the fit's generator and cuts it into disjoint blocks; the gap
    terms are exact nearest-neighbour distances within each block (leave-one-out when pooled).
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.cat([train, reference]) if pooled else train
    total = pool.shape[0]
    n_max = total - 1 if pooled else total
    gaps = []
    for size in law.sizes.long().tolist():
        block = size + 1 if pooled else size
        cell_means = []
        for _ in range(1 if size == n_max else repeats):
            if block >= total:
                blocks = [torch.arange(total)]
            else:
                order = torch.randperm(total, generator=generator)
                blocks = [order[s : s + block] for s in range(0, total - block + 1, block)]
            for idx in blocks:
                subset = pool[idx]
                if pooled:
                    d = _sq_dists(subset, subset, flip)
                    d.fill_diagonal_(math.inf)
                else:
                    d = _sq_dists(reference, subset, flip)
                cell_means.append(d.min(dim=1).values.mean())
        gaps.append(float(torch.stack(cell_means).mean()))
    reference_gap = float(_sq_dists(reference, train, flip).min(dim=1).values.mean())
    return torch.tensor(gaps, dtype=torch.float64), reference_gap


@pytest.mark.parametrize(
    ("pooled", "sizes", "k"),
    [
        (True, None, 5),
        (True, [2, 7, 30, 120, 259], 1),  # tiny blocks: most points need their block's search
        (False, None, 3),
        (False, [3, 20, 100, 200], 8),
    ],
)
def test_fit_gaps_are_exact_nearest_neighbour_gaps_of_its_subsets(pooled, sizes, k) -> None:
    """The shared search and its per-block fallbacks equal one exact search per block."""
    x = _sphere(300, 3, seed=21, ambient=6)
    x = torch.cat([x[:250], x[:10]])  # exact duplicates across train and reference: zero terms
    train, reference = x[:200], x[200:]
    law = GapLaw.fit(train, reference, pooled=pooled, sizes=sizes, k=k, repeats=3, seed=5)
    gaps, reference_gap = _brute_force_fit_terms(
        train, reference, law, repeats=3, seed=5, pooled=pooled
    )
    torch.testing.assert_close(law.gaps, gaps, rtol=1e-12, atol=0.0)
    assert law.reference_gap == pytest.approx(reference_gap, rel=1e-12)


def test_fit_gaps_are_exact_orbit_gaps_under_a_symmetry() -> None:
    from gapcallback.symmetry.finite_group import FiniteGroup

    x = _sphere(400, 2, seed=22)
    flip = FiniteGroup([torch.neg], names=["neg"])
    for pooled in (True, False):
        law = GapLaw.fit(
            x[:250], x[250:], symmetry=flip, pooled=pooled, num_sizes=4, repeats=2, seed=1
        )
        gaps, reference_gap = _brute_force_fit_terms(
            x[:250], x[250:], law, repeats=2, seed=1, pooled=pooled, flip=True
        )
        torch.testing.assert_close(law.gaps, gaps, rtol=1e-12, atol=0.0)
        assert law.reference_gap == pytest.approx(reference_gap, rel=1e-12)


def _count_search_work(monkeypatch) -> list[float]:
    """Spy on the kNN searches of ``GapLaw.fit`` (the real search runs): pair products of each.

    Every search of the fit goes through ``gap_curve.curve_knn``, the measurement's one search."""
    from gapcallback.functional import gap_curve as law_module

    real = law_module.curve_knn
    work: list[float] = []

    def spy(queries, points, k=1, **kwargs):
        same = kwargs.get("exclude_self", False) and queries is points
        work.append(queries.shape[0] * points.shape[0] / (2 if same else 1))
        return real(queries, points, k, **kwargs)

    monkeypatch.setattr(law_module, "curve_knn", spy)
    return work


def test_default_fit_costs_a_few_pool_searches(monkeypatch) -> None:
    """Default grid, 5 repeats: about 3.8 leave-one-out searches of the pool in pair products
    (11.6 with one search per block; the shared search reads most blocks' neighbours)."""
    x = _sphere(2500, 8, seed=23, ambient=16).float()
    work = _count_search_work(monkeypatch)
    GapLaw.fit(x[:2000], x[2000:], seed=0)
    pool_search = 2500 * 2500 / 2
    assert sum(work) / pool_search < 5.0
    assert max(work) == pool_search  # the one shared search is the largest


def test_bad_options_fail_before_any_search(monkeypatch) -> None:
    x = _sphere(300, 2, seed=0)
    work = _count_search_work(monkeypatch)
    for kwargs in (
        {"k": 0},
        {"repeats": 0},
        {"num_sizes": 2},
        {"sizes": [10, 5]},
        {"fit_min_size": 0},
        {"dimension": math.nan},
        {"pooled": "yes"},
        {"group_size": 0},
        {"seed": -1},
        {"seed": 1.5},
        {"symmetry": "flip"},
        {"p": math.inf},
    ):
        with pytest.raises((TypeError, ValueError)):
            GapLaw.fit(x[:200], x[200:], **kwargs)
    assert work == []


# ---------------------------------------------------------------------- option and argument checks


def test_fit_options_are_the_forwardable_keywords_of_fit() -> None:
    import inspect

    params = inspect.signature(GapLaw.fit).parameters
    own = {"train", "reference", "p", "symmetry", "seed"}
    assert set(GapLaw.FIT_OPTIONS) == set(params) - own
    options = {"sizes": [10, 20, 40], "num_sizes": 4, "repeats": 2, "k": 3, "fit_min_size": 10}
    options |= {"dimension": 2, "pooled": False, "group_size": None}
    checked = GapLaw.check_fit_options(options)
    assert checked == options and isinstance(checked["dimension"], float)
    assert checked is not options


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"repeat": 3}, TypeError, r"\['repeat'\] in `GapLaw.fit options` \('repeat' -> 'repeats"),
        ({"seed": 0}, TypeError, r"valid keys are \['sizes', 'num_sizes'"),
        ({"p": 1.0}, TypeError, "Unknown key"),
        ({"sizes": [10]}, ValueError, "at least 2 sizes"),
        ({"sizes": [10, 10]}, ValueError, "strictly increasing"),
        ({"sizes": [0, 10]}, ValueError, r"sizes\[i\]|positive"),
        ({"sizes": [1.5, 10]}, TypeError, "`sizes` must be a sequence of ints"),
        ({"sizes": torch.tensor([1.5, 10.0])}, TypeError, "`sizes` must be integers"),
        ({"sizes": "10, 20"}, TypeError, "`sizes` must be None or a sequence"),
        ({"num_sizes": 2}, ValueError, "`num_sizes` must be >= 3"),
        ({"repeats": 0}, ValueError, "`repeats` must be >= 1"),
        ({"repeats": 2.0}, TypeError, "`repeats` must be an int"),
        ({"k": 0}, ValueError, "`k` must be >= 1"),
        ({"fit_min_size": 0}, ValueError, "`fit_min_size` must be >= 1"),
        ({"fit_min_size": "10"}, TypeError, "`fit_min_size`"),
        ({"dimension": -1.0}, ValueError, "`dimension` must be a finite positive"),
        ({"dimension": math.inf}, ValueError, "`dimension`"),
        ({"dimension": "2"}, TypeError, "`dimension`"),
        ({"pooled": 1}, TypeError, "`pooled` must be True or False"),
        ({"group_size": 0}, ValueError, "`group_size` must be >= 1"),
    ],
)
def test_check_fit_options_names_the_bad_option(options, error, match) -> None:
    with pytest.raises(error, match=match):
        GapLaw.check_fit_options(options)
    if set(options) <= set(GapLaw.FIT_OPTIONS):  # fit itself refuses the same values
        x = _sphere(200, 2, seed=0)
        with pytest.raises(error, match=match):
            GapLaw.fit(x[:100], x[100:], **options)


def test_check_fit_options_needs_a_mapping() -> None:
    with pytest.raises(TypeError, match="dict of keyword arguments"):
        GapLaw.check_fit_options([("k", 3)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dimension": math.nan}, ValueError, "`dimension` must be a finite number"),
        ({"dimension": 0.0}, ValueError, "`dimension` must be > 0"),
        ({"dimension": "2"}, TypeError, "`dimension` must be a real number"),
        ({"constant": -1.0}, ValueError, "`constant` must be > 0"),
        ({"p": 0.0}, ValueError, "`p`"),
        ({"dimension_std": -0.1}, ValueError, "`dimension_std` must be a finite number >= 0"),
        ({"constant_std": "x"}, TypeError, "`constant_std`"),
        ({"covariance": [[1.0, 0.0]]}, ValueError, "`covariance` must be the 2 x 2"),
        ({"covariance": [[math.nan, 0.0], [0.0, 1.0]]}, ValueError, "`covariance` contains NaN"),
        ({"sizes": [10, 20], "gaps": [0.1]}, ValueError, "same length"),
        ({"sizes": [-10, 20], "gaps": [0.2, 0.1]}, ValueError, "`sizes` must be positive"),
        ({"sizes": [10, 20], "gaps": [0.2, math.inf]}, ValueError, "`gaps` contains NaN or Inf"),
        ({"sizes": [10, 20], "gaps": [0.2, -0.1]}, ValueError, "`gaps` must be non-negative"),
        ({"sizes": [10, 20], "gaps": [0.2, 0.1], "gaps_std": [0.1]}, ValueError, "`gaps_std`"),
        ({"n_train": -1}, ValueError, "`n_train` must be >= 0"),
        ({"n_train": 10.5}, TypeError, "`n_train`"),
        ({"fit_min_size": 0.0}, ValueError, "`fit_min_size` must be a finite positive"),
        ({"anchor_size": "big"}, TypeError, "`anchor_size`"),
        ({"anchor_gap": -1.0}, ValueError, "`anchor_gap`"),
        ({"k": 0}, ValueError, "`k` must be >= 1"),
        ({"k": 2.5}, TypeError, "`k`"),
        ({"pooled": "no"}, TypeError, "`pooled` must be True or False"),
        ({"group_size": 0}, ValueError, "`group_size` must be >= 1"),
        ({"reference_gap": -1.0}, ValueError, "`reference_gap`"),
    ],
)
def test_constructor_names_the_bad_argument(kwargs, error, match) -> None:
    arguments = {"dimension": 2.0, "constant": 1.0} | kwargs
    with pytest.raises(error, match=match):
        GapLaw(**arguments)


def test_constructor_accepts_tensors_numpy_integers_and_unknown_nan() -> None:
    law = GapLaw(
        dimension=torch.tensor(2.0),
        constant=np.float64(3.0),
        k=np.int64(4),
        n_train=torch.tensor(100),
        dimension_std=math.nan,
        reference_gap=math.nan,
    )
    assert (law.dimension, law.constant, law.k, law.n_train) == (2.0, 3.0, 4, 100)
    assert math.isnan(law.anchor_size) and math.isnan(law.fit_min_size)
    # A law without sizes (NaN anchor) survives the state-dict round trip.
    restored = GapLaw.from_state_dict(json.loads(json.dumps(law.state_dict())))
    assert restored.k == 4 and math.isnan(restored.anchor_gap)


# ---------------------------------------------------------------------- the gap curve (measuring)


def test_measure_gap_curve_holds_what_the_fit_reads() -> None:
    from gapcallback.functional.gap_curve import measure_gap_curve

    x = _sphere(300, 3, seed=3, ambient=6)
    train, reference = x[:220], x[220:]
    sizes = [10, 40, 150, 299]
    curve = measure_gap_curve(train, reference, sizes, repeats=3, k=4, generator=7)
    assert curve.sizes.tolist() == [float(s) for s in sizes]
    assert curve.anchor_size == 299.0 and curve.n_train == 220 and curve.pooled
    # Each pass cuts the pool into 300 // (size + 1) disjoint subsets; one pass at n_max.
    assert [g.numel() for g in curve.subset_gaps] == [3 * 27, 3 * 7, 3 * 1, 1]
    torch.testing.assert_close(curve.gaps, torch.stack([g.mean() for g in curve.subset_gaps]))
    # Per-query sums: every point queries once per pass (except the leftovers of a pass).
    torch.testing.assert_close(
        curve.term_sums.sum(1) / curve.term_counts.sum(1), curve.gaps, rtol=1e-12, atol=0.0
    )
    assert curve.term_counts.shape == (4, 300) and float(curve.term_counts[-1].min()) == 1.0
    # Oracles by brute force: k-th neighbour terms of the pool, references' nearest training point.
    pool = torch.cat([train, reference])
    d = _sq_dists(pool, pool, False).fill_diagonal_(math.inf)
    torch.testing.assert_close(curve.neighbour_terms, d.sort(dim=1).values[:, 3])
    torch.testing.assert_close(
        curve.reference_sq_dists, _sq_dists(reference, train, False).min(dim=1).values
    )
    # The law is this curve, fitted: GapLaw.fit == measure_gap_curve, then from_curve.
    g = torch.Generator().manual_seed(7)
    again = measure_gap_curve(train, reference, sizes, repeats=3, k=4, generator=g)
    fitted = GapLaw.from_curve(again, seed=g)
    assert (
        fitted.state_dict()
        == GapLaw.fit(train, reference, sizes=sizes, repeats=3, k=4, seed=7).state_dict()
    )
    assert fitted.curve is again and GapLaw.from_state_dict(fitted.state_dict()).curve is None


def test_first_subsets_are_the_first_of_each_partition() -> None:
    from gapcallback.functional.gap_curve import measure_gap_curve

    x = _sphere(400, 2, seed=4)
    train, reference = x[:300], x[300:]
    kwargs = {"repeats": 4, "pooled": False, "generator": 11}
    every = measure_gap_curve(train, reference, [20, 75, 300], **kwargs)
    first = measure_gap_curve(train, reference, [20, 75, 300], subsets="first", **kwargs)
    for all_row, first_row, blocks in zip(
        every.subset_gaps, first.subset_gaps, (15, 4, 1), strict=True
    ):
        # The same terms (a column of a [queries, blocks] table is averaged in another order).
        torch.testing.assert_close(first_row, all_row[::blocks], rtol=1e-14, atol=0)
    # The slope dimension measures exactly these subsets (one per repeat, the full set once).
    from gapcallback.functional import gap_slope_dimension

    res = gap_slope_dimension(
        train, reference, [20, 75, 300], repeats=4, generator=torch.Generator().manual_seed(11)
    )
    torch.testing.assert_close(res.gaps[:2], torch.stack(first.subset_gaps[:2]))
    torch.testing.assert_close(res.gaps[2], first.subset_gaps[2].expand(4))


def test_measure_gap_curve_checks_its_arguments() -> None:
    from gapcallback.functional.gap_curve import measure_gap_curve

    x = _sphere(60, 2, seed=0)
    with pytest.raises(ValueError, match="sizes"):
        measure_gap_curve(x[:40], x[40:], [10, 5])
    with pytest.raises(ValueError, match=r"\[1, 59\]"):
        measure_gap_curve(x[:40], x[40:], [10, 60])
    with pytest.raises(ValueError, match="`k`"):
        measure_gap_curve(x[:40], x[40:], [5, 10], k=41, pooled=False)
    with pytest.raises(ValueError, match="subsets"):
        measure_gap_curve(x[:40], x[40:], [5, 10], subsets="some")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`train`"):
        measure_gap_curve(x[:40].numpy(), x[40:], [5, 10])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="GapCurve"):
        GapLaw.from_curve({"sizes": [1, 2]})  # type: ignore[arg-type]


def test_size_grid_is_the_one_both_callers_use() -> None:
    from gapcallback.functional.gap_curve import gap_size_grid

    grid = gap_size_grid(4000, 9, 4000 / 16)
    assert grid.dtype == torch.float64 and grid[0] == 250 and grid[-1] == 4000
    assert bool((grid == grid.round()).all()) and bool((grid.diff() > 0).all())
    ratios = grid.diff().div(grid[:-1])
    assert float(ratios.max() - ratios.min()) < 0.02  # geometric up to rounding
    assert gap_size_grid(10, 6, 8).tolist() == [8.0, 9.0, 10.0]  # duplicates merged
    # gap_slope_dimension's default: 6 sizes from max(8, n // 32), as numpy's geomspace rounded.
    for n in (16, 50, 255, 256, 1000, 4099, 20000):
        lo = max(8, n // 32)
        if n < 2 * lo:
            lo = max(1, n // 4)
        want = np.unique(np.round(np.geomspace(lo, n, 6)).astype(int)).tolist()
        assert gap_size_grid(n, 6, lo).long().tolist() == want
    with pytest.raises(ValueError, match="smallest"):
        gap_size_grid(100, 5, 200)


# ---------------------------------------------------------------------- fitting (statistics)


def test_fit_line_is_exact_on_lines_and_batched() -> None:
    from gapcallback.functional.gap_curve import fit_line

    x = torch.tensor([100.0, 200.0, 400.0, 800.0], dtype=torch.float64).log()
    y = torch.stack([3.0 - 0.5 * x, 1.0 + 2.0 * x, 0.0 * x])
    fit = fit_line(x, y)
    torch.testing.assert_close(fit.slope, torch.tensor([-0.5, 2.0, 0.0], dtype=torch.float64))
    assert float(fit.stderr.max()) < 1e-12
    # Closed form on noisy points: x = (0, 1, 2, 3), y = (0, 2, 1, 3): slope 0.8, se sqrt(0.6/2/5).
    one = fit_line(
        torch.arange(4, dtype=torch.float64),
        torch.tensor([0.0, 2.0, 1.0, 3.0], dtype=torch.float64),
    )
    assert float(one.slope) == pytest.approx(0.8, rel=1e-14)
    assert float(one.stderr) == pytest.approx(math.sqrt(1.8 / 2 / 5), rel=1e-14)


def test_fit_law_on_an_exact_curve_is_exact() -> None:
    """Exact power law, every subset equal: the slope gives d, k = 1 anchors at the last gap (the
    LPS factor is 1), and the bootstrap has nothing to vary."""
    from gapcallback.law.fit import fit_law, lps_log_constant

    sizes = torch.tensor([125.0, 250.0, 500.0, 1000.0], dtype=torch.float64)
    d, p, constant = 4.0, 2.0, 0.7
    gaps = constant * sizes ** (-p / d)
    subsets = [g.repeat(6) for g in gaps[:-1]] + [gaps[-1:]]
    fitted = fit_law(
        sizes,
        gaps,
        subsets,
        [torch.zeros_like(s) for s in subsets],
        torch.ones(4, dtype=torch.bool),
        p=p,
        k=1,
        dimension=None,
        anchor_size=1000.0,
        anchor_mean=float(gaps[-1]),
        anchor_se=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert fitted.dimension == pytest.approx(d, rel=1e-12)
    assert fitted.constant == pytest.approx(constant, rel=1e-12)
    assert fitted.dimension_std == pytest.approx(0.0, abs=1e-9)
    assert float(fitted.covariance.abs().max()) < 1e-20
    assert float(fitted.gaps_std.max()) == 0.0
    assert fitted.anchor_gap == pytest.approx(float(gaps[-1]), rel=1e-12)
    # LPS in closed form: Gamma(1 + a) Gamma(k) / Gamma(k + a) N^a mean, a = p / d.
    a, k, n_eff, mean = 0.5, 5, 1000.0, 0.01
    want = special.gamma(1 + a) * special.gamma(k) / special.gamma(k + a) * n_eff**a * mean
    got = lps_log_constant(
        torch.tensor([mean], dtype=torch.float64),
        n_eff,
        2.0,
        torch.tensor([0.25], dtype=torch.float64),
        k,
    )
    assert float(got.exp()) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    ("d0", "ratio"), [(1.0, 16.0), (2.0, 16.0), (3.0, 2.0 ** (8 / 3)), (8.0, 4.0)]
)
def test_default_fit_min_size_follows_the_whole_grid_slope(d0: float, ratio: float) -> None:
    from gapcallback.law.fit import default_fit_min_size

    sizes = torch.tensor([250.0, 500.0, 1000.0, 2000.0, 4000.0], dtype=torch.float64)
    fit_min = default_fit_min_size(sizes, 3.0 * sizes ** (-2.0 / d0), 2.0, 4000.0)
    assert fit_min == pytest.approx(4000.0 / ratio, rel=1e-12)


# ---------------------------------------------------------------------- the band (calibration)


def test_curvature_bias_is_zero_for_a_power_law_and_exact_for_its_correction() -> None:
    from gapcallback.law.fit import curvature_bias

    sizes = torch.tensor([250.0, 500.0, 1000.0, 2000.0, 4000.0], dtype=torch.float64)
    n = torch.tensor([1000.0, 4000.0, 16000.0, 64000.0], dtype=torch.float64)
    d, p = 4.0, 2.0
    straight = 2.0 * sizes ** (-p / d)
    kwargs = {"p": p, "dimension": d, "anchor_size": 4000.0}
    flat = curvature_bias(
        sizes, straight, 0.01 * straight, n, anchor_gap=float(straight[-1]), **kwargs
    )
    assert float(flat.bias.abs().max()) < 1e-12
    # R = 2 n^(-1/2) exp(A n^(-1/2)) (theta = 2/d): the straight law through the last gap misses
    # log R(n) - log R(4000) + (1/2) log(n / 4000) = A (n^-1/2 - 4000^-1/2), which is the bias.
    a = 3.0
    curved = straight * torch.exp(a * sizes ** (-0.5))
    out = curvature_bias(sizes, curved, 0.01 * curved, n, anchor_gap=float(curved[-1]), **kwargs)
    torch.testing.assert_close(out.bias, a * (n ** (-0.5) - 4000 ** (-0.5)), rtol=1e-9, atol=1e-12)
    # An anchor off the measured curve: the difference is part of the bias everywhere.
    off = curvature_bias(
        sizes, curved, 0.01 * curved, n, anchor_gap=float(curved[-1]) * 1.02, **kwargs
    )
    torch.testing.assert_close(off.bias, out.bias - math.log(1.02), rtol=1e-9, atol=1e-12)
    # Variance: that of the fitted curve's value, growing with the extrapolation.
    assert bool((out.variance[1:].diff() > 0).all())
    # Too few sizes or unknown errors: no correction.
    assert (
        float(
            curvature_bias(sizes[:3], curved[:3], curved[:3], n, anchor_gap=1.0, **kwargs)
            .bias.abs()
            .max()
        )
        == 0.0
    )
    assert (
        float(curvature_bias(sizes, curved, 0 * curved, n, anchor_gap=1.0, **kwargs).variance.max())
        == 0.0
    )


@pytest.mark.parametrize("level", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("shift", [0.0, 0.3, 1.0, 4.0])
def test_band_half_width_holds_level_of_the_shifted_normal(level: float, shift: float) -> None:
    from scipy import stats

    from gapcallback.law.fit import band_half_width

    sigma = torch.tensor([0.02], dtype=torch.float64)
    h = float(band_half_width(sigma, sigma * shift, level))
    b, s = shift * 0.02, 0.02
    assert stats.norm.cdf((h - b) / s) - stats.norm.cdf((-h - b) / s) == pytest.approx(
        level, abs=1e-9
    )
    if shift == 0.0:
        assert h == pytest.approx(float(stats.norm.ppf(0.5 + level / 2)) * s, rel=1e-12)


def test_band_is_the_sampling_band_on_a_straight_curve_and_wider_on_a_bent_one() -> None:
    sizes = torch.tensor([250.0, 500.0, 1000.0, 2000.0, 4000.0], dtype=torch.float64)
    straight = 2.0 * sizes ** (-0.5)
    cov = [[1e-4, 1e-5], [1e-5, 1e-6]]
    common = {"dimension": 4.0, "covariance": cov, "sizes": sizes, "anchor_size": 4000.0}
    plain = GapLaw(constant=2.0, gaps=straight, **common)  # no gaps_std: sampling noise only
    flat = GapLaw(constant=2.0, gaps=straight, gaps_std=1e-9 * straight, **common)
    for n in (1000.0, 16000.0):
        assert flat.predict_interval(n) == pytest.approx(plain.predict_interval(n), rel=1e-6)
    bent = straight * torch.exp(3.0 * sizes ** (-0.5))
    law = GapLaw(constant=float(bent[-1]) * 4000**0.5, gaps=bent, gaps_std=1e-3 * bent, **common)
    low, high = law.predict_interval(16000.0)
    p_low, p_high = plain.predict_interval(16000.0)
    assert math.log(high / low) > 1.5 * math.log(p_high / p_low)  # the bend widens the band
    assert math.log(high / law.predict(16000.0)) == pytest.approx(
        math.log(law.predict(16000.0) / low)
    )
    truth = 2.0 * 16000**-0.5 * math.exp(3.0 * 16000**-0.5)
    assert low <= truth <= high
