"""F.knn against a float64 brute-force oracle, plus the numerics traps of DESIGN.md §2."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gapcallback.functional import knn


def brute_force(queries, points, k, exclude_self=False):
    q = queries.reshape(queries.shape[0], -1).double()
    x = points.reshape(points.shape[0], -1).double()
    d = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    # Stable sort: ties resolved by the lower index, as knn documents.
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, order), order


@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    m = draw(st.integers(1, 60))
    dim = draw(st.integers(1, 12))
    k = draw(st.integers(1, m))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 10.0, -1e3]))
    integer_grid = draw(st.booleans())  # many exact ties and duplicates
    bq = draw(st.integers(1, 17))
    bp = draw(st.integers(1, 23))
    g = torch.Generator().manual_seed(seed)
    if integer_grid:
        q = torch.randint(-2, 3, (n, dim), generator=g).double()
        x = torch.randint(-2, 3, (m, dim), generator=g).double()
    else:
        q = torch.randn(n, dim, generator=g, dtype=torch.float64) * scale + offset
        x = torch.randn(m, dim, generator=g, dtype=torch.float64) * scale + offset
    return q, x, k, (bq, bp)


@given(problems(), st.sampled_from([torch.float32, torch.float64]))
def test_matches_brute_force(problem, dtype):
    q, x, k, block = problem
    q, x = q.to(dtype), x.to(dtype)
    sq, idx = knn(q, x, k, block_size=block)
    ref_sq, _ = brute_force(q, x, k)
    assert sq.shape == idx.shape == (q.shape[0], k)
    assert sq.dtype == dtype
    # Distances are exact up to the rounding of the direct difference.
    torch.testing.assert_close(
        sq.double(), ref_sq, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0
    )
    # Returned indices really are at the returned distances.
    direct = ((q.double()[:, None, :] - x.double()[idx]) ** 2).sum(-1)
    torch.testing.assert_close(direct, ref_sq, rtol=1e-6, atol=0)
    assert bool((sq[:, 1:] >= sq[:, :-1]).all())


@given(problems())
def test_exact_ties_and_blocking_independent(problem):
    q, x, k, block = problem
    a = knn(q, x, k, block_size=block)
    b = knn(q, x, k, block_size=(1000, 1000))
    ref_sq, ref_idx = brute_force(q, x, k)
    torch.testing.assert_close(a.sq_dists, ref_sq, rtol=1e-12, atol=0)
    # Deterministic tie-breaking (lower index first), whatever the blocks.
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.indices, ref_idx)


@given(st.integers(2, 50), st.integers(1, 8), st.integers(0, 1000), st.integers(1, 9))
def test_exclude_self(n, dim, seed, bq):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    k = min(3, n - 1)
    sq, idx = knn(x, x, k, exclude_self=True, block_size=(bq, 7))
    ref_sq, _ = brute_force(x, x, k, exclude_self=True)
    torch.testing.assert_close(sq.double(), ref_sq, rtol=1e-6, atol=0)
    assert not bool((idx == torch.arange(n)[:, None]).any())


@given(problems(), st.sampled_from([torch.float32, torch.float64]))
def test_self_search_halved_gemm_matches_general_path_and_oracle(problem, dtype):
    # `knn(x, x, ...)` multiplies each block once and reuses it transposed; a copy of `x` takes
    # the general path. Both must equal the oracle, ties and duplicates included.
    _, x, k, block = problem
    x = x.to(dtype)
    k = min(k, x.shape[0] - 1)
    if k < 1:
        return
    same = knn(x, x, k, exclude_self=True, block_size=block)
    general = knn(x, x.clone(), k, exclude_self=True, block_size=block)
    ref_sq, ref_idx = brute_force(x, x, k, exclude_self=True)
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(same.sq_dists.double(), ref_sq, rtol=rtol, atol=0)
    assert torch.equal(same.sq_dists, general.sq_dists)
    assert torch.equal(same.indices, general.indices)
    direct = ((x.double()[:, None, :] - x.double()[same.indices]) ** 2).sum(-1)
    torch.testing.assert_close(direct, ref_sq, rtol=1e-6, atol=0)
    if dtype == torch.float64:
        assert torch.equal(same.indices, ref_idx)


def test_exclude_self_keeps_duplicates_at_zero():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    sq, idx = knn(x, x, 1, exclude_self=True)
    assert sq[0, 0].item() == 0.0 and idx[0, 0].item() == 1
    assert sq[1, 0].item() == 0.0 and idx[1, 0].item() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_low_precision_inputs_accumulate_in_fp32_or_better(dtype):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(64, 32, generator=g) * 4).to(dtype)
    x = (torch.randn(300, 32, generator=g) * 4).to(dtype)
    sq, _ = knn(q, x, 2)
    # Oracle on the same (rounded) values, in float64.
    ref, _ = brute_force(q.double(), x.double(), 2)
    assert sq.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(sq.double(), ref, rtol=1e-6, atol=0)


def test_offset_near_duplicates_are_exact():
    """DESIGN §2: the GEMM expansion gives ~100% error here; we must not."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3000, 64, generator=g) * 0.5 + 28.0  # ||x||^2 ~ 5e4
    noise = torch.randn(base.shape, generator=g) * 2e-3  # d^2 ~ 5e-4 * ... small
    samples = base + noise
    samples[:300] = base[:300]  # exact duplicates
    sq, idx = knn(samples, base, 1)
    truth = ((samples.double() - base.double()) ** 2).sum(1)
    assert torch.equal(sq[:300, 0], torch.zeros(300))
    assert torch.equal(idx[:, 0], torch.arange(3000))
    rel = (sq[300:, 0].double() - truth[300:]).abs() / truth[300:]
    assert float(rel.max()) < 1e-5
    # The expansion on the raw data really is inaccurate here (the trap is real).
    mm = torch.cdist(samples, base, compute_mode="use_mm_for_euclid_dist").min(1).values ** 2
    assert float(((mm[300:].double() - truth[300:]).abs() / truth[300:]).median()) > 0.1


def test_tf32_and_autocast_do_not_leak():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(200, 48, generator=g) + 30
    x = q + 1e-3 * torch.randn(200, 48, generator=g)
    ref = knn(q, x, 1)
    backend = torch.backends.mkldnn.matmul
    previous = backend.fp32_precision
    try:
        backend.fp32_precision = "bf16"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = knn(q, x, 1)
        assert backend.fp32_precision == "bf16"  # user setting restored
    finally:
        backend.fp32_precision = previous
    assert torch.equal(got.sq_dists, ref.sq_dists) and torch.equal(got.indices, ref.indices)


def test_trailing_dimensions_are_flattened():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, 3, 4, 4, generator=g)
    x = torch.randn(9, 3, 4, 4, generator=g)
    a = knn(q, x, 2)
    b = knn(q.flatten(1), x.flatten(1), 2)
    assert torch.equal(a.sq_dists, b.sq_dists) and torch.equal(a.indices, b.indices)


def test_degenerate_constant_data_is_exact_and_bounded():
    x = torch.ones(2500, 3)
    sq, idx = knn(x, x, 4, exclude_self=True, block_size=(256, 512))
    assert torch.equal(sq, torch.zeros(2500, 4))
    assert not bool((idx == torch.arange(2500)[:, None]).any())


@pytest.mark.parametrize(
    ("queries", "points", "kwargs", "error", "match"),
    [
        (torch.randn(3, 2), torch.randn(4, 3), {}, ValueError, "same space"),
        (torch.randn(0, 2), torch.randn(4, 2), {}, ValueError, "empty"),
        (torch.randn(3, 2), torch.randn(0, 2), {}, ValueError, "empty"),
        (torch.randn(3), torch.randn(4, 3), {}, ValueError, r"unsqueeze"),
        (torch.randn(3, 2), torch.randn(4, 2), {"k": 5}, ValueError, "k <= 4"),
        (torch.randn(4, 2), None, {"k": 4, "exclude_self": True}, ValueError, "k <= 3"),
        (torch.randn(3, 2), torch.randn(4, 2), {"k": 0}, ValueError, ">= 1"),
        (torch.randn(3, 2), torch.randn(4, 2), {"k": 1.5}, TypeError, "int"),
        (torch.randint(0, 3, (3, 2)), torch.randn(4, 2), {}, TypeError, "floating"),
        (torch.randn(3, 2, dtype=torch.complex64), torch.randn(4, 2), {}, TypeError, "floating"),
        ([[1.0, 2.0]], torch.randn(4, 2), {}, TypeError, "torch.Tensor"),
        (torch.randn(3, 2), torch.randn(5, 2), {"exclude_self": True}, ValueError, "same set"),
        (torch.randn(3, 2), torch.randn(5, 2), {"block_size": (0, 3)}, ValueError, "block_size"),
    ],
)
def test_bad_input(queries, points, kwargs, error, match):
    if points is None:
        points = queries
    with pytest.raises(error, match=match):
        knn(queries, points, **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["queries", "points"])
def test_non_finite_input_is_rejected(value, where):
    q, x = torch.randn(6, 3), torch.randn(7, 3)
    (q if where == "queries" else x)[4, 1] = value
    with pytest.raises(
        ValueError, match=rf"`{where}` contains NaN or Inf in 1 of \d+ rows \(first: row 4\)"
    ):
        knn(q, x)


def test_overflowing_values_get_a_clear_error():
    with pytest.raises(ValueError, match="too large"):
        knn(torch.randn(4, 3), torch.full((3, 3), 3e38))


def test_different_devices_rejected():
    q = torch.randn(3, 2)
    x = torch.randn(4, 2, device="meta")
    with pytest.raises(ValueError, match="device"):
        knn(q, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(700, 40, generator=g) + 20
    x = torch.randn(900, 40, generator=g) + 20
    cpu = knn(q, x, 3)
    gpu = knn(q.cuda(), x.cuda(), 3)
    torch.testing.assert_close(gpu.sq_dists.cpu(), cpu.sq_dists, rtol=1e-6, atol=0)
    assert torch.equal(gpu.indices.cpu(), cpu.indices)


def test_float64_beyond_float32_range_falls_back_to_float64_screening():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(30, 5, generator=g, dtype=torch.float64) * 1e30
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) * 1e30
    sq, idx = knn(q, x, 3)
    ref_sq, ref_idx = brute_force(q, x, 3)
    torch.testing.assert_close(sq, ref_sq, rtol=1e-12, atol=0)
    assert torch.equal(idx, ref_idx)


def test_float64_near_duplicates_exact_after_float32_screening():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(500, 16, generator=g, dtype=torch.float64) + 1e3
    samples = base + 1e-9 * torch.randn(base.shape, generator=g, dtype=torch.float64)
    sq, idx = knn(samples, base, 1)
    truth = ((samples - base) ** 2).sum(1)
    assert torch.equal(idx[:, 0], torch.arange(500))
    torch.testing.assert_close(sq[:, 0], truth, rtol=1e-12, atol=0)


def test_backend_and_block_size_options_are_checked():
    from gapcallback.symmetry import FiniteGroup

    x = torch.randn(30, 4, 4)
    flip = FiniteGroup.flips((-1,))
    with pytest.raises(ValueError, match="block_size"):
        knn(x, x, 1, symmetry=flip, block_size=(8, 8))
    with pytest.raises(ValueError, match="backend"):
        knn(x, x, 1, symmetry=flip, backend="kdtree")
    with pytest.raises(ValueError, match="Did you mean 'kdtree'"):
        knn(x, x, 1, backend="kdtre")
    with pytest.raises(ValueError, match="block_size"):
        knn(x, x, 1, backend="kdtree", block_size=(8, 8))
    flat = x.reshape(30, -1)
    want = knn(flat, flat, 3, exclude_self=True, backend="gemm")
    got = knn(flat, flat, 3, exclude_self=True, backend="kdtree")
    assert torch.equal(want.indices, got.indices) and torch.equal(want.sq_dists, got.sq_dists)


def test_default_blocks_follow_the_points_dimension() -> None:
    """Up to D = 64 the plain search takes the narrow blocks (its block stays in cache), above it
    the wide ones; image-shaped points count their flattened dimension."""
    from gapcallback.search import (
        DEFAULT_POINT_BLOCK,
        DEFAULT_QUERY_BLOCK,
        NARROW_BLOCKS,
        NARROW_BLOCKS_UP_TO_DIM,
        default_blocks,
    )

    assert default_blocks(3) == NARROW_BLOCKS
    assert default_blocks(NARROW_BLOCKS_UP_TO_DIM) == NARROW_BLOCKS
    assert default_blocks(NARROW_BLOCKS_UP_TO_DIM + 1) == (DEFAULT_QUERY_BLOCK, DEFAULT_POINT_BLOCK)
    g = torch.Generator().manual_seed(0)
    images, pool = torch.randn(300, 1, 8, 8, generator=g), torch.randn(3000, 1, 8, 8, generator=g)
    flat = knn(images.flatten(1), pool.flatten(1), 2, backend="gemm", block_size=NARROW_BLOCKS)
    got = knn(images, pool, 2, backend="gemm")
    assert torch.equal(got.indices, flat.indices) and torch.equal(got.sq_dists, flat.sq_dists)
