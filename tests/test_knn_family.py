"""The k-NN family: precision/recall, density/coverage, authenticity, C_T.

Functional forms against a brute-force oracle (exact integer arithmetic on grid data, so ties and
duplicates are decided exactly; float64 on Gaussian data), ties and duplicates, the Metrics'
streaming == functional (one process and two gloo processes), transforms and trailing shapes, bad
input.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st

from gapcallback.functional import (
    authenticity,
    data_copying_statistic,
    density_coverage,
    precision_recall,
    precision_recall_density_coverage,
)
from gapcallback.functional.data_copying import mann_whitney_z
from gapcallback.functional.knn_balls import ball_counts, knn_sq_radii
from gapcallback.metrics import Authenticity, DensityCoverage, PrecisionRecall
from tests.ddp_utils import run_ddp

# --- the oracle ------------------------------------------------------------------------------


def _sq(a, b):
    """Squared distances by direct difference: int64 for integer data (exact), else float64."""
    a, b = a.flatten(1), b.flatten(1)
    dtype = torch.int64 if not a.is_floating_point() else torch.float64
    return (a.to(dtype)[:, None, :] - b.to(dtype)[None, :, :]).pow(2).sum(-1)


def _radii(x, k):
    d = _sq(x, x)
    d.fill_diagonal_(torch.iinfo(d.dtype).max if not d.is_floating_point() else float("inf"))
    return d.sort(dim=1).values[:, k - 1]


def oracle(real, fake, k):
    """Precision, recall, density, coverage: the papers' formulas; precision and recall with
    closed balls, density and coverage with open balls that contain their centre."""
    d = _sq(real, fake)  # [N, M]
    rr, rf = _radii(real, k), _radii(fake, k)
    inside = d <= rr[:, None]
    precision = inside.any(0).double().mean()
    recall = (d <= rf[None, :]).any(1).double().mean()
    in_open = (d < rr[:, None]) | (d == 0)
    density = in_open.sum(0).double().mean() / k
    coverage = in_open.any(1).double().mean()
    return precision, recall, density, coverage


def oracle_authenticity(samples, train):
    d = _sq(samples, train)
    nn_train = _radii(train, 1)
    nearest = d.argmin(1)  # first minimum: the lowest index
    return (d.min(1).values > nn_train[nearest]).double().mean()


def _grid(g, n, dim, side):
    return torch.randint(0, side, (n, dim), generator=g)


# --- functional forms against the oracle ------------------------------------------------------


@given(
    st.integers(0, 25),
    st.integers(0, 25),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(2, 5),
    st.integers(0, 10_000),
)
def test_grid_data_with_ties_and_duplicates_match_the_exact_oracle(n, m, dim, k, side, seed):
    g = torch.Generator().manual_seed(seed)
    real_i, fake_i = _grid(g, n + k + 1, dim, side), _grid(g, m + k + 1, dim, side)
    real, fake = real_i.float() * 3.0 + 1e4, fake_i.float() * 3.0 + 1e4  # far from the origin
    p, r, dens, cov = oracle(real_i, fake_i, k)
    got_dc = density_coverage(real, fake, k=k)
    assert got_dc.density.item() == pytest.approx(dens.item(), rel=1e-6)
    assert got_dc.coverage.item() == pytest.approx(cov.item(), rel=1e-6)
    got = precision_recall(real, fake, k=k)
    assert got.precision.item() == pytest.approx(p.item(), rel=1e-6)
    assert got.recall.item() == pytest.approx(r.item(), rel=1e-6)
    assert authenticity(fake, real).item() == pytest.approx(
        oracle_authenticity(fake_i, real_i).item(), rel=1e-6
    )


@given(
    st.integers(5, 60),
    st.integers(5, 60),
    st.integers(1, 8),
    st.integers(1, 4),
    st.integers(0, 9999),
)
def test_gaussian_float64_matches_the_oracle(n, m, dim, k, seed):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, dim, generator=g, dtype=torch.float64)
    fake = torch.randn(m, dim, generator=g, dtype=torch.float64) * 1.3 + 0.2
    p, r, dens, cov = oracle(real, fake, k)
    pr = precision_recall(real, fake, k=k)
    dc = density_coverage(real, fake, k=k)
    assert pr.precision.dtype == torch.float64
    torch.testing.assert_close(pr.precision, p, rtol=1e-12, atol=0)
    torch.testing.assert_close(pr.recall, r, rtol=1e-12, atol=0)
    torch.testing.assert_close(dc.density, dens, rtol=1e-12, atol=0)
    torch.testing.assert_close(dc.coverage, cov, rtol=1e-12, atol=0)
    torch.testing.assert_close(authenticity(fake, real), oracle_authenticity(fake, real))
    assert tuple(precision_recall_density_coverage(real, fake, k)) == (*pr, *dc)


@pytest.mark.parametrize("block", [None, (17, 29), (64, 5), (130, 200)])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e25])
def test_ball_counts_both_ways_blocks_and_scales(block, scale):
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(300, 5, generator=g, dtype=torch.float64) * scale
    queries = torch.cat(
        [
            centres[:100],  # duplicates: distance 0
            torch.randn(150, 5, generator=g, dtype=torch.float64) * scale,
            centres[100:130] + 1e-9 * scale,  # near-duplicates
            torch.randn(20, 5, generator=g, dtype=torch.float64) * scale * 1e20,  # far: the
        ]  # screen is scaled to them and the rest falls below float32's normal range
    )
    radii, q_radii = knn_sq_radii(centres, 3, name="c"), knn_sq_radii(queries, 2, name="q")
    d = _sq(queries, centres)
    got = ball_counts(queries, centres, radii, query_sq_radii=q_radii, block_size=block)
    assert torch.equal(got.per_query, (d <= radii[None, :]).sum(1))
    assert torch.equal(got.per_centre, (d <= radii[None, :]).sum(0))
    assert torch.equal(got.in_query_balls, (d <= q_radii[:, None]).sum(0))
    on_sphere = (d == radii[None, :]) & (radii[None, :] > 0)
    assert torch.equal(got.per_query_on_sphere, on_sphere.sum(1))
    assert torch.equal(got.per_centre_on_sphere, on_sphere.sum(0))
    assert ball_counts(queries, centres, radii).in_query_balls is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [2.0**-100, 1.0, 2.0**100])  # exact: ties stay ties
def test_dtypes_scales_and_layouts(dtype, scale):
    g = torch.Generator().manual_seed(3)
    real_i, fake_i = _grid(g, 60, 3, 4), _grid(g, 50, 3, 4)
    expected = oracle(real_i, fake_i, 3)
    if dtype in (torch.float16, torch.bfloat16):
        scale = 1.0  # their range
    real = (real_i.to(torch.float64) * scale).to(dtype)
    fake = (fake_i.to(torch.float64) * scale).to(dtype)
    forms = {
        "plain": (real, fake),
        "non-contiguous": (real.T.contiguous().T, fake[::1].T.contiguous().T),
        "requires_grad": (real.clone().requires_grad_(dtype.is_floating_point), fake),
        "trailing dims": (real.reshape(60, 3, 1), fake.reshape(50, 3, 1)),
    }
    for name, (r, f) in forms.items():
        got = precision_recall_density_coverage(r, f, 3)
        assert [v.item() for v in got] == pytest.approx([v.item() for v in expected], rel=1e-6), (
            name
        )
        assert got.precision.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


# --- ties, duplicates, the identical sets -------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
def test_identical_sets(k):
    g = torch.Generator().manual_seed(0)
    real = torch.randn(500, 32, generator=g) * 50 + 1e3
    pr = precision_recall(real, real.clone(), k=k)
    dc = density_coverage(real, real.clone(), k=k)
    assert pr.precision.item() == pr.recall.item() == dc.coverage.item() == 1.0
    # Each fake is in its own ball and strictly inside the balls of the k - 1 reals it is a nearer
    # neighbour of; on the sphere of the one it is the k-th neighbour of (open: left out).
    assert dc.density.item() == 1.0
    both = precision_recall_density_coverage(real, real.clone(), k=k)
    assert [v.item() for v in both] == [1.0, 1.0, 1.0, 1.0]


def test_duplicated_points_have_radius_zero_and_still_count():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 4, generator=g)
    real = base.repeat(4, 1)  # every point 4 times: the 3-NN radius is 0
    assert torch.equal(knn_sq_radii(real, 3, name="real"), torch.zeros(200, dtype=torch.float64))
    pr = precision_recall(real, real.flip(0), k=3)
    dc = density_coverage(real, real.flip(0), k=3)
    assert pr.precision.item() == pr.recall.item() == dc.coverage.item() == 1.0
    assert dc.density.item() == pytest.approx(4 / 3)  # each fake lies in the 4 balls of its copies
    # A point on the sphere: one real at distance 1 from a fake, radius 1. Inside the closed
    # ball of precision, outside the open one of density and coverage.
    real, fake = torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]])
    assert precision_recall(real, fake, k=1).precision.item() == 0.5
    assert [v.item() for v in density_coverage(real, fake, k=1)] == [0.0, 0.0]
    assert [v.item() for v in density_coverage(real, torch.tensor([[1.5]]), k=1)] == [1.0, 0.5]


def test_near_duplicates_far_from_the_origin_are_exact():
    g = torch.Generator().manual_seed(0)
    real = 1e4 + 1e-2 * torch.randn(300, 16, generator=g)
    fake = real + 1e-4 * torch.randn(300, 16, generator=g)
    p, r, dens, cov = oracle(real, fake, 3)
    pr = precision_recall(real, fake, k=3)
    dc = density_coverage(real, fake, k=3)
    assert pr.precision.item() == pytest.approx(p.item(), rel=1e-7)
    assert pr.recall.item() == pytest.approx(r.item(), rel=1e-7)
    assert dc.density.item() == pytest.approx(dens.item(), rel=1e-7)
    assert dc.coverage.item() == pytest.approx(cov.item(), rel=1e-7)


def test_authenticity_orientation_and_ties():
    train = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [10.0, 0.0]])
    samples = torch.tensor(
        [
            [0.0, 0.0],  # copy: unauthentic
            [0.0, 1.0],  # on the sphere of (0, 0) (radius 1): unauthentic
            [0.0, 1.5],  # farther than (0, 0)'s nearest neighbour: authentic
            [10.0, 0.0],  # copy of a duplicated training point (0 = 0): unauthentic
            [10.0, 0.5],  # near the duplicated point (radius 0): authentic
        ]
    )
    assert authenticity(samples, train).item() == pytest.approx(2 / 5)


# --- Metrics: streaming == functional, transforms, shapes --------------------------------------


def _data(seed=0, n=300, m=257, shape=(6,)):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(n, *shape, generator=g)
    fake = torch.randn(m, *shape, generator=g) * 1.2 + 0.1
    return real, fake


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
@pytest.mark.parametrize("shape", [(6,), (2, 3, 2)])
def test_metrics_stream_equal_functional(shape):
    real, fake = _data(shape=shape)
    pr, dc, au = PrecisionRecall(real, k=3), DensityCoverage(real, k=5), Authenticity(real)
    for batch in fake.split([1, 100, 56, 100]):
        for metric in (pr, dc, au):
            metric.update(batch)
    assert tuple(pr.compute()) == tuple(precision_recall(real, fake, k=3))
    assert tuple(dc.compute()) == tuple(density_coverage(real, fake, k=5))
    assert authenticity(fake, real).item() == au.compute().item()
    for metric in (pr, dc, au):
        metric.reset()
        with pytest.raises(RuntimeError, match="before any"):
            metric.compute()


def test_transform_maps_both_sides_and_is_not_state():
    real, fake = _data(shape=(2, 4))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))
    metric = PrecisionRecall(real, k=3, transform=net)
    metric.update(fake)
    with torch.no_grad():
        expected = precision_recall(net(real), net(fake), k=3)
    assert tuple(metric.compute()) == tuple(expected)
    assert not any(key.startswith("transform") for key in metric.state_dict())
    assert list(metric.children()) == []
    dc = DensityCoverage(real, transform=net)
    dc.update(fake)
    with torch.no_grad():
        assert tuple(dc.compute()) == tuple(density_coverage(net(real), net(fake)))
    au = Authenticity(real, transform=lambda x: x.flatten(1)[:, :5])
    au.update(fake)
    assert (
        au.compute().item() == authenticity(fake.flatten(1)[:, :5], real.flatten(1)[:, :5]).item()
    )


def test_forward_and_plot():
    real, fake = _data()
    metric = DensityCoverage(real)
    batch_value = metric(fake[:100])
    assert tuple(batch_value) == tuple(density_coverage(real, fake[:100]))
    metric.update(fake[100:])
    assert tuple(metric.compute()) == tuple(density_coverage(real, fake))
    pytest.importorskip("matplotlib")
    fig, ax = metric.plot()
    assert fig is not None and ax is not None


def _ddp_family(rank, world_size, real, fake, out_dir):
    metrics = [PrecisionRecall(real, k=3), DensityCoverage(real, k=5), Authenticity(real)]
    for metric in metrics:
        metric.update(fake[rank::world_size])  # each rank sees half the fakes, unevenly
    values = [tuple(metrics[0].compute()), tuple(metrics[1].compute()), metrics[2].compute()]
    torch.save(values, f"{out_dir}/rank{rank}.pt")


def test_ddp_two_processes_equal_single_process(tmp_path):
    real, fake = _data(n=200, m=151)
    run_ddp(_ddp_family, real, fake, str(tmp_path))
    expected = [
        tuple(precision_recall(real, fake, k=3)),
        tuple(density_coverage(real, fake, k=5)),
        authenticity(fake, real),
    ]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got[0] == expected[0] and got[1] == expected[1]
        assert got[2].item() == expected[2].item()


# --- C_T --------------------------------------------------------------------------------------


def test_mann_whitney_u_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 20, (70,), generator=g).double()  # with ties
    b = torch.randint(0, 25, (90,), generator=g).double()
    u = scipy.stats.mannwhitneyu(a.numpy(), b.numpy(), method="asymptotic").statistic
    sigma = np.sqrt(70 * 90 * (70 + 90 + 1) / 12)
    assert mann_whitney_z(a, b) == pytest.approx((u - 70 * 90 / 2) / sigma, rel=1e-12)
    assert mann_whitney_z(a, b, True) == pytest.approx((u + 0.5 - 70 * 90 / 2) / sigma, rel=1e-12)


def test_data_copying_detects_copies_and_not_fresh_samples():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(2000, 3, generator=g)
    test = torch.randn(1000, 3, generator=g)
    fresh = torch.randn(1000, 3, generator=g)
    copies = train[:1000] + 1e-3 * torch.randn(1000, 3, generator=g)
    assert abs(data_copying_statistic(test, fresh, train).statistic.item()) < 3.0
    res = data_copying_statistic(test, copies, train, n_cells=5)
    assert res.statistic.item() < -10.0
    assert res.used.all() and res.test_fraction.sum().item() == pytest.approx(1.0)
    again = data_copying_statistic(test, copies, train, n_cells=5)
    assert again.statistic.item() == res.statistic.item()  # seeded cells
    with pytest.raises(ValueError, match="min_samples"):
        data_copying_statistic(test, copies[:10], train, min_samples=20)
    with pytest.raises(ValueError, match="n_cells"):
        data_copying_statistic(test, copies, train[:4], n_cells=5)


# --- bad input --------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    real, fake = _data()
    with pytest.raises(TypeError, match="`real`"):
        precision_recall(real.numpy(), fake)
    with pytest.raises(ValueError, match=r"`k`=300 .*`real` has only 299"):
        precision_recall(real, fake, k=300)
    with pytest.raises(ValueError, match=r"`k`=5 .*`fake` has only 3"):
        precision_recall(real, fake[:4], k=5)
    with pytest.raises(ValueError, match="`k` must be >= 1"):
        density_coverage(real, fake, k=0)
    with pytest.raises(ValueError, match=r"`real` has points of shape .* but `fake` has"):
        density_coverage(real, fake[:, :3])
    bad = fake.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match="`fake` contains NaN"):
        density_coverage(real, bad)
    with pytest.raises(ValueError, match="`train` needs at least 2"):
        authenticity(fake, real[:1])
    with pytest.raises(ValueError, match="`samples` is empty"):
        authenticity(fake[:0], real)
    metric = DensityCoverage(real)
    with pytest.raises(ValueError, match="`fake` contains NaN"):
        metric.update(bad)
    with pytest.raises(ValueError, match="`fake` is empty"):
        metric.update(fake[:0])
    with pytest.raises(TypeError, match=r"`fake` must be a torch\.Tensor"):
        metric.update(fake.tolist())
    with pytest.raises(ValueError, match=r"`k`=400 .*`real` has only 299"):
        PrecisionRecall(real, k=400)
    with pytest.raises(ValueError, match="`train` needs at least 2"):
        Authenticity(real[:1])
    with pytest.raises(TypeError, match="`transform` must be a callable"):
        PrecisionRecall(real, transform="inception")
    with pytest.raises(ValueError, match="one row per point"):
        PrecisionRecall(real, transform=lambda x: x[:10])
    with pytest.raises(ValueError, match=r"`transform\(real\)` contains NaN"):
        PrecisionRecall(real, transform=lambda x: x / 0.0)
    capped = PrecisionRecall(real, max_fake=100)
    capped.update(fake[:60])
    with pytest.raises(ValueError, match="`max_fake`=100"):
        capped.update(fake[60:120])
    small = PrecisionRecall(real, k=3)
    small.update(fake[:3])
    with pytest.raises(ValueError, match="`fake` has only 2 other points"):
        small.compute()
