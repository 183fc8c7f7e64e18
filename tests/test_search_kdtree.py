"""The cKDTree backend (gapcallback.search.kdtree) against a float64 brute-force oracle, bit for bit.

The oracle computes every ``[N, M]`` squared distance by direct difference in float64 with the
same expression as the engine's re-check (so the same bits), and breaks ties by the lower index
(stable sort over columns in index order). ``kdtree_knn`` must return exactly its first ``k``
columns (``torch.equal`` on distances and indices), and exactly what the GEMM engine returns.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapcallback.functional import nearest_neighbours
from gapcallback.search import kdtree
from gapcallback.search.kdtree import kdtree_knn, prefer_kdtree

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = (1, 2, 3, 5)
KS = (1, 3, 7)
DTYPES = (torch.float32, torch.float64)


def oracle(
    queries: torch.Tensor, points: torch.Tensor, k: int, exclude_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by (float64 direct-difference distance, index) over all ``N x M`` pairs."""
    n, m = queries.shape[0], points.shape[0]
    rows = torch.arange(n).repeat_interleave(m)
    cols = torch.arange(m).repeat(n)
    diff = queries[rows].to(torch.float64) - points[cols].to(torch.float64)
    d = diff.square().sum(dim=1).view(n, m)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    d, order = torch.sort(d, dim=1, stable=True)  # columns in index order: ties by lower index
    return d[:, :k].contiguous(), order[:, :k].contiguous()


def gemm(
    queries: torch.Tensor, points: torch.Tensor, k: int, exclude_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM engine's exact float64 result (before the output cast)."""
    kwargs: dict[str, Any] = {"exclude_self": exclude_self}
    if "backend" in inspect.signature(nearest_neighbours.exact_knn).parameters:
        kwargs["backend"] = "gemm"
    res = nearest_neighbours.exact_knn(queries, points, k, **kwargs)
    return res.sq_dists, res.indices


def assert_same(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]):
    d, i = got
    ref_d, ref_i = ref
    assert d.dtype == torch.float64 and i.dtype == torch.int64
    assert d.shape == ref_d.shape and i.shape == ref_i.shape
    assert torch.equal(i, ref_i), (i, ref_i)
    assert torch.equal(d, ref_d), (d, ref_d)


def _random(n: int, dim: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, dim, generator=g, dtype=torch.float64).to(dtype)


def _lattice(side: int, dim: int) -> torch.Tensor:
    axes = [torch.arange(side, dtype=torch.float64)] * dim
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dim)


# ------------------------------------------------------------------------------------------------
# exact equality with the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dim", DIMS)
def test_random_matches_oracle(dim: int, k: int, dtype: torch.dtype) -> None:
    q = _random(150, dim, 1, dtype)
    x = _random(230, dim, 2, dtype)
    assert_same(kdtree_knn(q, x, k), oracle(q, x, k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dim", DIMS)
def test_exclude_self_matches_oracle(dim: int, k: int, dtype: torch.dtype) -> None:
    x = _random(200, dim, 3, dtype)
    assert_same(kdtree_knn(x, x, k, exclude_self=True), oracle(x, x, k, exclude_self=True))
    # A copy (not the same tensor) is the same set too.
    assert_same(kdtree_knn(x.clone(), x, k, exclude_self=True), oracle(x, x, k, exclude_self=True))


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("k", [1, 7, 50, 130])
@pytest.mark.parametrize("dim", [1, 3])
def test_many_duplicates(dim: int, k: int, exclude_self: bool) -> None:
    """Many copies of a few points: ties at exactly 0 far beyond the first window."""
    base = _random(5, dim, 4, torch.float64)
    x = torch.cat([base.repeat(40, 1), _random(60, dim, 5, torch.float64)])
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(6))]
    q = x if exclude_self else torch.cat([base, _random(20, dim, 7, torch.float64)])
    d, i = kdtree_knn(q, x, k, exclude_self=exclude_self)
    assert_same((d, i), oracle(q, x, k, exclude_self=exclude_self))
    if not exclude_self:
        assert bool((d[:5, : min(k, 40)] == 0).all())  # duplicates give exactly 0


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("k", [1, 6, 19, 40])
@pytest.mark.parametrize(("side", "dim"), [(60, 1), (12, 2), (6, 3)])
def test_lattice_ties(side: int, dim: int, k: int, exclude_self: bool) -> None:
    """An integer grid: massive ties at equal distances, on and off the grid (half offsets)."""
    x = _lattice(side, dim)
    if exclude_self:
        q = x
    else:
        q = torch.cat([x[::3], x[::5] + 0.5, x[::7] + torch.tensor([0.5] + [0.0] * (dim - 1))])
    assert_same(
        kdtree_knn(q, x, k, exclude_self=exclude_self), oracle(q, x, k, exclude_self=exclude_self)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_near_ties(dtype: torch.dtype) -> None:
    """Points at one exact distance from the query (permutations and sign flips of one offset),
    far from the origin: rounding splits the tie by a few ulps, differently in cKDTree's sum."""
    centre = torch.tensor([1234.5678, -987.654321, 4321.0], dtype=torch.float64)
    v = torch.tensor([0.123456789, 0.0234567891, 0.00345678912], dtype=torch.float64)
    offsets = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((-1.0, 1.0), repeat=3):
            offsets.append(v[list(perm)] * torch.tensor(signs, dtype=torch.float64))
    x = centre + torch.stack(offsets) * torch.arange(1, 4, dtype=torch.float64)[:, None, None]
    x = torch.cat([x.reshape(-1, 3), centre + _random(100, 3, 8, torch.float64) - 0.5]).to(dtype)
    q = centre[None].to(dtype)
    for k in (1, 5, 48, 100, x.shape[0]):
        assert_same(kdtree_knn(q, x, k), oracle(q, x, k))


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_equals_m(dtype: torch.dtype) -> None:
    q = _random(40, 3, 9, dtype)
    x = _random(25, 3, 10, dtype)
    assert_same(kdtree_knn(q, x, 25), oracle(q, x, 25))
    assert_same(kdtree_knn(x, x, 24, exclude_self=True), oracle(x, x, 24, exclude_self=True))


def test_mixed_dtypes_and_single_points() -> None:
    q = _random(30, 2, 11, torch.float32)
    x = _random(50, 2, 12, torch.float64)
    assert_same(kdtree_knn(q, x, 4), oracle(q, x, 4))
    assert_same(kdtree_knn(x, q, 4), oracle(x, q, 4))
    assert_same(kdtree_knn(q[:1], x, 3), oracle(q[:1], x, 3))
    assert_same(kdtree_knn(q, x[:1], 1), oracle(q, x[:1], 1))
    two = x[:2]
    assert_same(kdtree_knn(two, two, 1, exclude_self=True), oracle(two, two, 1, exclude_self=True))


def test_non_contiguous_inputs() -> None:
    base = _random(120, 6, 13, torch.float64)
    q, x = base[::2, ::2], base[1::2, 1::2]  # [60, 3] strided views
    assert_same(kdtree_knn(q, x, 5), oracle(q, x, 5))


@pytest.mark.parametrize("exclude_self", [False, True])
def test_no_margin_and_tiny_chunks(monkeypatch: pytest.MonkeyPatch, exclude_self: bool) -> None:
    """With no window margin and chunks of a few rows, nearly every row of tied data needs the
    re-query loop (and some the brute force): still exact."""
    monkeypatch.setattr(kdtree, "_WINDOW_MARGIN", 0)
    monkeypatch.setattr(kdtree, "_WINDOW_FRACTION", 0.0)
    monkeypatch.setattr(kdtree, "_WINDOW_ENTRIES", 40)
    monkeypatch.setattr(kdtree, "_RECHECK_ELEMENTS", 64)
    x = torch.cat([_lattice(5, 2).repeat(3, 1), _random(40, 2, 14, torch.float64) * 4])
    q = x if exclude_self else _lattice(9, 2) / 2
    for k in (1, 4, 12, 60):
        assert_same(
            kdtree_knn(q, x, k, exclude_self=exclude_self),
            oracle(q, x, k, exclude_self=exclude_self),
        )


def test_workers_do_not_change_the_result() -> None:
    q = _random(300, 3, 15, torch.float64)
    x = _random(400, 3, 16, torch.float64)
    ref = oracle(q, x, 7)
    assert_same(kdtree_knn(q, x, 7, workers=1), ref)
    assert_same(kdtree_knn(q, x, 7, workers=2), ref)
    assert_same(kdtree_knn(q, x, 7, workers=-1), ref)


# ------------------------------------------------------------------------------------------------
# equality with the GEMM engine
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "dim", "k", "exclude_self", "dtype"),
    [
        ("random", 3, 1, False, torch.float32),
        ("random", 2, 10, True, torch.float64),
        ("random", 5, 7, False, torch.float64),
        ("offset", 3, 4, True, torch.float32),
        ("lattice", 3, 12, True, torch.float64),
        ("lattice", 2, 5, False, torch.float32),
        ("duplicates", 2, 30, True, torch.float32),
    ],
)
def test_matches_gemm_engine(
    kind: str, dim: int, k: int, exclude_self: bool, dtype: torch.dtype
) -> None:
    if kind == "lattice":
        x = _lattice(7 if dim == 3 else 20, dim)
    elif kind == "duplicates":
        x = _random(30, dim, 17, torch.float64).repeat(20, 1)
    else:
        x = _random(700, dim, 18, torch.float64)
        if kind == "offset":  # near-duplicates far from the origin
            x = 1e4 + x * 1e-3
    x = x.to(dtype)
    q = x if exclude_self else (x[::3] + 0.25).to(dtype)
    got = kdtree_knn(q, x, k, exclude_self=exclude_self)
    assert_same(got, gemm(q, x, k, exclude_self))
    assert_same(got, oracle(q, x, k, exclude_self=exclude_self))


# ------------------------------------------------------------------------------------------------
# property test: small random sets with duplicated rows
# ------------------------------------------------------------------------------------------------


@st.composite
def problems(draw: Any) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    m = draw(st.integers(1, 50))
    dim = draw(st.integers(1, 6))
    exclude_self = draw(st.booleans()) and m >= 2
    n = m if exclude_self else draw(st.integers(1, 30))
    k = draw(st.integers(1, m - 1 if exclude_self else m))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "integers", "duplicates"]))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 10.0, -1e3]))
    g = torch.Generator().manual_seed(seed)
    if kind == "integers":
        x = torch.randint(-2, 3, (m, dim), generator=g).double()
        q = torch.randint(-2, 3, (n, dim), generator=g).double()
    else:
        x = torch.randn(m, dim, generator=g, dtype=torch.float64) * scale + offset
        q = torch.randn(n, dim, generator=g, dtype=torch.float64) * scale + offset
        if kind == "duplicates":  # each row a copy of one of a few
            x = x[torch.randint(0, max(1, m // 4), (m,), generator=g)]
            q = x[torch.randint(0, m, (n,), generator=g)]
    if exclude_self:
        q = x
    return q.to(dtype), x.to(dtype), k, exclude_self


@settings(max_examples=60, deadline=None)
@given(problems())
def test_property_matches_oracle(problem: tuple[torch.Tensor, torch.Tensor, int, bool]) -> None:
    q, x, k, exclude_self = problem
    assert_same(
        kdtree_knn(q, x, k, exclude_self=exclude_self), oracle(q, x, k, exclude_self=exclude_self)
    )


# ------------------------------------------------------------------------------------------------
# range, validation, cost model
# ------------------------------------------------------------------------------------------------


def test_float64_underflow_raises_like_the_engine() -> None:
    """Near-duplicates 1e-200 apart: the float64 square underflows; both backends refuse."""
    x = torch.tensor([[0.0, 0.0], [1e-200, 0.0], [1.0, 1.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="below the smallest normal"):
        kdtree_knn(x, x, 1, exclude_self=True)
    with pytest.raises(ValueError, match="below the smallest normal"):
        gemm(x, x, 1, exclude_self=True)


def test_bad_arguments() -> None:
    x = _random(10, 2, 19, torch.float64)
    with pytest.raises(ValueError, match="`k`"):
        kdtree_knn(x, x, 11)
    with pytest.raises(ValueError, match="`k`"):
        kdtree_knn(x, x, 10, exclude_self=True)
    with pytest.raises(ValueError, match="`k`"):
        kdtree_knn(x, x, 0)
    with pytest.raises(ValueError, match="exclude_self"):
        kdtree_knn(x[:5], x, 1, exclude_self=True)
    with pytest.raises(ValueError, match="same D"):
        kdtree_knn(x[:, :1], x, 1)
    with pytest.raises(ValueError, match="`points`"):
        kdtree_knn(x, x[:, 0], 1)
    with pytest.raises(ValueError, match="`queries`"):
        kdtree_knn(x.long(), x, 1)


def test_prefer_kdtree_cost_model() -> None:
    cpu = torch.device("cpu")
    assert prefer_kdtree(100_000, 100_000, 3, 1, device=cpu)
    assert prefer_kdtree(50_000, 50_000, 2, 10, device=cpu)
    assert not prefer_kdtree(100_000, 100_000, 3, 1, device=torch.device("cuda"))
    assert not prefer_kdtree(100_000, 100_000, 3, 1, device=torch.device("mps"))
    assert not prefer_kdtree(100_000, 100_000, 64, 1, device=cpu)
    assert not prefer_kdtree(500, 500, 3, 1, device=cpu)  # small: the GEMM is cheap
    assert not prefer_kdtree(10, 10**9, 3, 1, device=cpu)  # few queries: the build dominates
    assert not prefer_kdtree(100_000, 100_000, 3, 1000, device=cpu)
    # Low intrinsic dimension extends the range of ambient dimensions, not beyond.
    high = kdtree.KDTREE_MID_DIM + 1
    assert not prefer_kdtree(100_000, 100_000, high, 1, device=cpu)
    assert prefer_kdtree(100_000, 100_000, high, 1, device=cpu, intrinsic_dim=2.0)
    assert not prefer_kdtree(100_000, 100_000, 100, 1, device=cpu, intrinsic_dim=2.0)
    # The middle band needs larger sets.
    mid = kdtree.KDTREE_MID_DIM
    assert not prefer_kdtree(3000, 3000, mid, 10, device=cpu)
    assert prefer_kdtree(kdtree.KDTREE_MID_POINTS, kdtree.KDTREE_MID_POINTS, mid, 10, device=cpu)
    # k = 1, the GEMM path's cheapest case, needs larger sets.
    assert prefer_kdtree(3000, 3000, 3, 10, device=cpu)
    assert not prefer_kdtree(3000, 3000, 3, 1, device=cpu)
    assert prefer_kdtree(kdtree.KDTREE_MIN_POINTS_K1, kdtree.KDTREE_MIN_POINTS_K1, 3, 1, device=cpu)
    assert not prefer_kdtree(kdtree.KDTREE_MID_POINTS, kdtree.KDTREE_MID_POINTS, mid, 1, device=cpu)


def test_intrinsic_probe_reads_low_and_high_dimensional_data() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.rand(5000, 2, generator=g, dtype=torch.float64)
    plane = torch.cat([z, torch.zeros(5000, 10, dtype=torch.float64)], dim=1)
    assert 1.5 < kdtree.probe_intrinsic_dimension(plane) < 2.6
    cube = torch.rand(5000, 12, generator=g, dtype=torch.float64)
    assert kdtree.probe_intrinsic_dimension(cube) > 7
    dup = torch.zeros(3000, 8)  # every point a duplicate: no estimate
    assert kdtree.probe_intrinsic_dimension(dup) == float("inf")
    cpu = torch.device("cpu")
    assert kdtree.needs_intrinsic_probe(5000, 5000, 12, 1, cpu)
    assert not kdtree.needs_intrinsic_probe(5000, 5000, 3, 1, cpu)  # the tree anyway
    assert not kdtree.needs_intrinsic_probe(5000, 5000, 64, 1, cpu)  # never the tree


def test_auto_backend_follows_the_probe() -> None:
    from gapcallback.search import choose_backend

    g = torch.Generator().manual_seed(1)
    z = torch.rand(4000, 2, generator=g)
    plane = (
        torch.cat([z, torch.zeros(4000, 6)], dim=1)
        @ torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    )
    assert choose_backend(plane, plane, 10) == "kdtree"
    assert (
        choose_backend(torch.rand(4000, 12, generator=g), torch.rand(4000, 12, generator=g), 1)
        == "gemm"
    )
