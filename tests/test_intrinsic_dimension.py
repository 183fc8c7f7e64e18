"""Tests of gapcallback.functional.dimension against independent oracles.

Oracles: float64 brute-force distances (numpy) for the closed forms, synthetic data of known
dimension (uniform samples of linear subspaces, spheres and tori), and exact invariances.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapcallback.functional.dimension import (
    METHODS,
    REFERENCE_FAMILIES,
    DimensionEstimate,
    deduplicate,
    gap_slope_dimension,
    intrinsic_dimension,
    intrinsic_dimension_estimate,
    multiscale_dimension,
)
from gapcallback.functional.dimension_references import reference_stats

pytestmark = pytest.mark.usefixtures("one_thread")


def _flat(n: int, d: int, big_d: int, seed: int = 0) -> torch.Tensor:
    """Uniform cube [0, 1]^d isometrically embedded in R^D (float64)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((big_d, d)))
    return torch.from_numpy(rng.uniform(size=(n, d)) @ q.T)


def _sphere(n: int, d: int, seed: int = 0) -> torch.Tensor:
    z = np.random.default_rng(seed).standard_normal((n, d + 1))
    return torch.from_numpy(z / np.linalg.norm(z, axis=1, keepdims=True))


def _torus(n: int, d: int, seed: int = 0) -> torch.Tensor:
    t = np.random.default_rng(seed).uniform(0, 2 * np.pi, (n, d))
    return torch.from_numpy(np.concatenate([np.cos(t), np.sin(t)], 1))


def _gaussian(n: int, d: int, big_d: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((big_d, d)))
    return torch.from_numpy(rng.standard_normal((n, d)) @ q.T)


def _brute_log_dists(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted log-distances to the k nearest other points, float64 brute force."""
    diff = x[:, None, :] - x[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    return np.log(np.sort(dist, axis=1)[:, :k])


# ---------------------------------------------------------------- closed forms vs brute force


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(5, 40),
    dim=st.integers(1, 6),
    k=st.integers(2, 4),
    seed=st.integers(0, 10_000),
)
def test_twonn_and_mle_match_float64_brute_force(n: int, dim: int, k: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((n, dim))
    log_r = _brute_log_dists(x, k)
    log_mu = log_r[:, 1] - log_r[:, 0]
    expected_twonn = (n - 1) / log_mu.sum()
    expected_mle = (k - 1) / (log_r[:, k - 1 : k] - log_r[:, : k - 1]).sum(1).mean()
    xt = torch.from_numpy(x)
    assert float(intrinsic_dimension(xt, "twonn")) == pytest.approx(expected_twonn, rel=1e-9)
    assert float(intrinsic_dimension(xt, "mle", k=k)) == pytest.approx(expected_mle, rel=1e-9)


def test_twonn_linear_fit_matches_closed_form() -> None:
    x = _flat(400, 3, 5, seed=3).numpy()
    log_r = _brute_log_dists(x, 2)
    mu = np.sort(log_r[:, 1] - log_r[:, 0])
    n = mu.size
    keep = math.floor(n * 0.9)
    ys = -np.log(1 - np.arange(1, keep + 1) / n)
    expected = (mu[:keep] * ys).sum() / (mu[:keep] ** 2).sum()
    got = intrinsic_dimension(torch.from_numpy(x), "twonn", fit="linear", discard=0.1)
    assert float(got) == pytest.approx(expected, rel=1e-9)


def test_mle_uses_k_minus_1_not_k_minus_2() -> None:
    # On a 2-plane with many points the pooled MLE with (k - 1) is ~2; (k - 2) would read 2 * 3/4.
    est = float(intrinsic_dimension(_flat(3000, 2, 4), "mle", k=5))
    assert est == pytest.approx(2.0, rel=0.05)


# ---------------------------------------------------------------- known dimension


@pytest.mark.parametrize("method", ["twonn", "mle", "calibrated", "gap"])
@pytest.mark.parametrize("d", [1, 2, 4])
def test_recovers_dimension_of_flat_data(method: str, d: int) -> None:
    x = _flat(2000, d, d + 3, seed=d)
    est = float(intrinsic_dimension(x, method))
    tol = 0.12 if method == "gap" else 0.07
    assert est == pytest.approx(d, rel=tol)


def test_calibrated_removes_the_high_dimension_bias() -> None:
    # A 12-sphere with N = 1500: raw estimators read ~10.5; calibration is within 5%.
    x = _sphere(1000, 12, seed=1)
    raw = float(intrinsic_dimension(x, "mle"))
    est = intrinsic_dimension_estimate(x)
    assert raw < 11.2
    assert float(est.dimension) == pytest.approx(12, rel=0.05)
    assert est.details["raw"] < 11.5


def test_calibrated_on_torus_and_cube() -> None:
    assert float(intrinsic_dimension(_torus(2000, 3))) == pytest.approx(3, rel=0.05)
    assert float(intrinsic_dimension(_flat(2000, 8, 10))) == pytest.approx(8, rel=0.1)


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(12, 40), dim=st.integers(1, 5), k=st.integers(2, 6), seed=st.integers(0, 10_000)
)
def test_calibrated_statistics_match_float64_brute_force(
    n: int, dim: int, k: int, seed: int
) -> None:
    # raw: the pooled MLE; cos: mean over points of the mean cosine between the directions to
    # every pair of distinct k nearest neighbours (brute force over the pairs).
    x = np.random.default_rng(seed).standard_normal((n, dim))
    dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1)[:, :k]
    log_r = np.log(np.take_along_axis(dist, order, axis=1))
    raw = (k - 1) / (log_r[:, k - 1 : k] - log_r[:, : k - 1]).sum(1).mean()
    cos = []
    for i in range(n):
        u = x[order[i]] - x[i]
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        cos.append(np.mean([u[j] @ u[m] for j in range(k) for m in range(k) if j != m]))
    est = intrinsic_dimension_estimate(torch.from_numpy(x), k=k, references=("cube",))
    assert est.details["raw"] == pytest.approx(raw, rel=1e-9)
    assert est.details["cos"] == pytest.approx(np.mean(cos), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    ("name", "x", "d"),
    [
        ("torus", _torus(1500, 8, seed=3), 8),
        ("gaussian", _gaussian(1500, 10, 20, seed=4), 10),
        ("cube", _flat(1500, 10, 12, seed=5), 10),
        ("sphere", _sphere(1500, 10, seed=6), 10),
    ],
)
def test_calibrated_tells_the_geometries_apart(name: str, x: torch.Tensor, d: int) -> None:
    # The same raw MLE means different d on a torus (reads high), a sphere, a cube and a Gaussian
    # (read low); the neighbour cosine picks the family, so every one lands within 7%.
    est = intrinsic_dimension_estimate(x)
    assert float(est.dimension) == pytest.approx(d, rel=0.07)
    weights = est.details["reference"]
    assert set(weights) <= set(REFERENCE_FAMILIES)
    assert sum(weights.values()) == pytest.approx(1.0)
    assert max(weights, key=weights.get) == name


def test_sphere_only_calibration_misreads_a_flat_torus() -> None:
    # Why one reference family is not enough: calibrated on spheres only, T^8 reads > 9.
    x = _torus(1500, 8, seed=3)
    sphere_only = intrinsic_dimension_estimate(x, k=5, references=["sphere"])
    assert sphere_only.details["reference"] == {"sphere": 1.0}
    assert float(sphere_only.dimension) > 9.0
    assert float(intrinsic_dimension(x)) == pytest.approx(8, rel=0.07)


def test_calibration_does_not_depend_on_the_cache() -> None:
    a, b = _flat(600, 6, 8, seed=1), _torus(600, 7, seed=2)
    first = [intrinsic_dimension_estimate(v) for v in (a, b)]
    reference_stats.cache_clear()
    second = [intrinsic_dimension_estimate(v) for v in (b, a)][::-1]
    for e1, e2 in zip(first, second, strict=True):
        assert torch.equal(e1.dimension, e2.dimension) and torch.equal(e1.std, e2.std)


def test_reference_size_is_rounded_for_the_cache() -> None:
    x = _flat(2503, 3, 5, seed=7)
    est = intrinsic_dimension_estimate(x)
    assert est.details["reference_points"] == 2500 and est.details["calibration_points"] == 2503
    assert intrinsic_dimension_estimate(x[:999]).details["reference_points"] == 999


def test_default_is_calibrated_and_deterministic() -> None:
    x = _flat(800, 5, 7)
    a = intrinsic_dimension_estimate(x)
    b = intrinsic_dimension_estimate(x, "calibrated")
    assert METHODS[0] == "calibrated" and a.method == "calibrated"
    assert torch.equal(a.dimension, b.dimension) and torch.equal(a.std, b.std)


def test_large_input_is_split_into_calibration_chunks() -> None:
    est = intrinsic_dimension_estimate(_flat(4500, 3, 5), k=5)
    assert est.details["chunks"] == 2 and est.details["calibration_points"] == 2250
    assert float(est.dimension) == pytest.approx(3, rel=0.05)


# ---------------------------------------------------------------- uncertainty


@pytest.mark.parametrize("method", ["twonn", "mle", "calibrated"])
def test_std_matches_spread_over_independent_samples(method: str) -> None:
    ests = [intrinsic_dimension_estimate(_flat(300, 3, 5, seed=s), method) for s in range(10)]
    spread = float(np.std([float(e.dimension) for e in ests], ddof=1))
    reported = float(np.mean([float(e.std) for e in ests]))
    assert reported > 0
    assert 0.4 < reported / spread < 2.5


def test_estimate_result_type_and_dtype() -> None:
    est = intrinsic_dimension_estimate(_flat(300, 2, 3).float(), "twonn")
    assert isinstance(est, DimensionEstimate)
    assert est.dimension.dtype == torch.float32 and est.dimension.ndim == 0
    assert est.n_points == 300
    assert intrinsic_dimension(_flat(300, 2, 3), "twonn").dtype == torch.float64


# ---------------------------------------------------------------- invariances


@settings(max_examples=6, deadline=None)
@given(
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-100, 100),
    seed=st.integers(0, 1000),
    method=st.sampled_from(["twonn", "mle", "calibrated"]),
)
def test_invariant_to_similarity_transforms(
    scale: float, shift: float, seed: int, method: str
) -> None:
    x = _flat(200, 3, 4, seed=seed)
    q, _ = torch.linalg.qr(
        torch.randn(4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    y = scale * x @ q + shift
    assert float(intrinsic_dimension(y, method)) == pytest.approx(
        float(intrinsic_dimension(x, method)), rel=1e-6
    )


def test_trailing_dims_are_flattened() -> None:
    x = _flat(300, 2, 6)
    assert float(intrinsic_dimension(x.reshape(300, 2, 3), "mle")) == pytest.approx(
        float(intrinsic_dimension(x, "mle")), rel=1e-12
    )


# ---------------------------------------------------------------- duplicates


@pytest.mark.parametrize("method", ["twonn", "mle", "calibrated"])
def test_ten_percent_duplicates_move_estimate_by_at_most_a_few_percent(method: str) -> None:
    x = _flat(2000, 4, 6, seed=5)
    dup = torch.cat([x, x[:200]])[torch.randperm(2200, generator=torch.Generator().manual_seed(0))]
    near = torch.cat([x, x[:200] + 1e-9 * torch.randn(200, 6, dtype=torch.float64)])
    base = float(intrinsic_dimension(x, method))
    for data in (dup, near):
        est = intrinsic_dimension_estimate(data, method)
        assert est.n_points == 2000
        assert float(est.dimension) == pytest.approx(base, rel=0.03)


def test_deduplicate_keeps_one_of_each_group() -> None:
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1e-9], [5.0, 5.0]])
    out = deduplicate(x, 1e-6)
    assert torch.equal(out, x[[0, 1, 5]])
    assert torch.equal(deduplicate(x, 0.0), x[[0, 1, 4, 5]])


def test_large_duplicate_groups() -> None:
    # Groups larger than the first neighbour window (8) are still merged.
    x = torch.cat([torch.zeros(50, 3), _flat(200, 3, 3).float()])
    assert deduplicate(x).shape[0] == 201


# ---------------------------------------------------------------- gap slope and multiscale


def test_gap_slope_dimension_on_a_torus() -> None:
    x = _torus(3000, 2, seed=2)
    res = gap_slope_dimension(
        x[500:], x[:500], repeats=2, generator=torch.Generator().manual_seed(1)
    )
    assert res.gaps.shape == (res.sizes.numel(), 2)
    assert bool((res.sizes[1:] > res.sizes[:-1]).all())
    assert float(res.dimension) == pytest.approx(2, rel=0.08)
    assert 0 < float(res.std) < 0.3
    # p changes the slope but not the dimension.
    res4 = gap_slope_dimension(x[500:], x[:500], p=4.0, repeats=2)
    assert float(res4.dimension) == pytest.approx(2, rel=0.12)


def test_gap_slope_explicit_sizes_and_errors() -> None:
    x = _flat(600, 2, 3)
    res = gap_slope_dimension(x[100:], x[:100], sizes=[50, 100, 200, 500], repeats=1)
    assert res.sizes.tolist() == [50, 100, 200, 500]
    with pytest.raises(ValueError, match="sizes"):
        gap_slope_dimension(x[100:], x[:100], sizes=[50])
    with pytest.raises(ValueError, match="exactly 0"):
        gap_slope_dimension(x, x[:10], sizes=[600, 600 - 1], repeats=1)


@pytest.mark.parametrize("scale", [1.0, 0.25, 1e-30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gap_method_refuses_a_flat_curve_at_every_scale(scale: float, dtype: torch.dtype) -> None:
    # Every gap of this curve is the same: the fitted slope is 0 up to rounding, whose sign
    # once decided between an error and a dimension of 5e31.
    x = torch.tensor([[2.0, 0.0], [1.0, -2.0], [0.0, 2.0], [0.0, 1.0], [0.0, 2.0]], dtype=dtype)
    with pytest.raises(ValueError, match="does not decrease"):
        intrinsic_dimension(x * scale, "gap")


def test_multiscale_dimension_shows_noise_at_small_scales() -> None:
    x = _flat(4000, 2, 6, seed=4)
    noisy = x + 3e-3 * torch.randn(
        x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    ms = multiscale_dimension(noisy, "twonn")
    assert bool((ms.scales[1:] > ms.scales[:-1]).all())
    assert ms.dimensions.shape == ms.stds.shape == ms.sizes.shape
    assert float(ms.dimensions[0]) > 3.0  # at the noise scale the data look 6-dimensional
    assert float(ms.dimensions[-1]) == pytest.approx(2, rel=0.15)  # at large scales: the plane
    ms_mle = multiscale_dimension(x, "mle", k=5, sizes=[4000, 1000, 250])
    assert ms_mle.sizes.tolist() == [4000, 1000, 250]
    assert torch.allclose(ms_mle.dimensions, torch.full((3,), 2.0, dtype=torch.float64), rtol=0.1)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.rand(10), ValueError, "shape"),
        (torch.rand(2, 3), ValueError, "at least 3"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [2.0, 2.0]]), ValueError, "NaN"),
        (torch.ones(50, 4), ValueError, "constant"),
        (torch.ones(10, 3, dtype=torch.int64), TypeError, "dtype"),
        ([[0.0, 1.0]] * 5, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises_clear_errors(x: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        intrinsic_dimension(x)  # type: ignore[arg-type]


def test_bad_options_raise() -> None:
    x = _flat(20, 2, 3)
    with pytest.raises(ValueError, match="`method` must be one of"):
        intrinsic_dimension(x, "pca")
    with pytest.raises(TypeError, match="Unknown option"):
        intrinsic_dimension(x, "twonn", k=3)
    with pytest.raises(ValueError, match="k=30 neighbours need"):
        intrinsic_dimension(x, "mle", k=30)
    with pytest.raises(ValueError, match="k=30 neighbours need"):
        intrinsic_dimension(x, k=30)
    with pytest.raises(ValueError, match="dup_tol"):
        intrinsic_dimension(x, dup_tol=-1.0)
    with pytest.raises(TypeError, match="references"):
        intrinsic_dimension(x, k=3, references="sphere")
    with pytest.raises(ValueError, match="references"):
        intrinsic_dimension(x, k=3, references=("sphere", "klein_bottle"))
    with pytest.raises(ValueError, match="references"):
        intrinsic_dimension(x, k=3, references=())
    with pytest.raises(ValueError, match="fit"):
        intrinsic_dimension(x, "twonn", fit="ols")
    with pytest.raises(ValueError, match="discard"):
        intrinsic_dimension(x, "twonn", fit="linear", discard=1.0)
    with pytest.raises(ValueError, match="holdout"):
        intrinsic_dimension(x, "gap", holdout=0.0)
    with pytest.raises(TypeError, match="generator"):
        intrinsic_dimension(x, "gap", generator=0)
    with pytest.raises(ValueError, match="multiscale"):
        multiscale_dimension(x, "gap")
