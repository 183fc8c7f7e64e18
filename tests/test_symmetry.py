"""Orbit kNN of every symmetry against independent float64 brute-force oracles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from gapcallback.functional import knn
from gapcallback.functional.gap import representation_gap
from gapcallback.symmetry import (
    CyclicShifts,
    FiniteGroup,
    Permutations,
    RigidMotions,
    Symmetry,
    kabsch,
)


def brute_orbit_knn(queries, images, k, exclude_self=False):
    """Top-k over points of min over the explicit list of transformed point sets ``images``."""
    q = queries.reshape(queries.shape[0], -1).double()
    d = torch.stack(
        [((q[:, None] - im.reshape(im.shape[0], -1).double()[None]) ** 2).sum(-1) for im in images]
    ).amin(0)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, order), order


def all_rolls(x, dims):
    sizes = [x.shape[d] for d in dims]
    return [torch.roll(x, list(s), dims) for s in itertools.product(*[range(n) for n in sizes])]


def assert_matches(result, oracle_d, oracle_i, atol=1e-9):
    torch.testing.assert_close(result.sq_dists.double(), oracle_d, atol=atol, rtol=1e-6)
    # Indices must agree wherever the distances are not tied.
    d = oracle_d
    tied = torch.zeros_like(d, dtype=torch.bool)
    tied[:, 1:] |= (d[:, 1:] - d[:, :-1]).abs() < 1e-6
    tied[:, :-1] |= (d[:, 1:] - d[:, :-1]).abs() < 1e-6
    assert bool(((result.indices == oracle_i) | tied).all())


# ----------------------------------------------------------------------------------- FiniteGroup
@settings(max_examples=15)
@given(
    n=st.integers(1, 12),
    m=st.integers(2, 20),
    k=st.integers(1, 3),
    exclude=st.booleans(),
    group=st.sampled_from(["flips", "rot90", "dihedral"]),
    integer=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_finite_group_matches_brute_force(n, m, k, exclude, group, integer, seed):
    g = torch.Generator().manual_seed(seed)
    if integer:  # exact ties, symmetric images and transformed duplicates
        x = torch.randint(0, 2, (m, 2, 4, 4), generator=g).double()
        q = x.clone() if exclude else torch.randint(0, 2, (n, 2, 4, 4), generator=g).double()
    else:
        x = torch.randn(m, 2, 4, 4, generator=g, dtype=torch.float64)
        q = x.clone() if exclude else torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    k = min(k, m - 1 if exclude else m)
    sym = {
        "flips": FiniteGroup.flips((-2, -1)),
        "rot90": FiniteGroup.rotations90(),
        "dihedral": FiniteGroup.dihedral(),
    }[group]
    assert sym.order == {"flips": 4, "rot90": 4, "dihedral": 8}[group]
    images = list(sym.orbit(x).reshape(sym.order, m, 2, 4, 4))
    res = knn(q, x, k, symmetry=sym, exclude_self=exclude)
    assert_matches(res, *brute_orbit_knn(q, images, k, exclude))


def test_finite_group_large_query_set_is_chunked_and_exact(monkeypatch):
    import gapcallback.symmetry.orbit_search as search

    monkeypatch.setattr(search, "STACK_BUDGET", 8 * 16 * 7)  # chunks of 7 queries
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 1, 4, 4, generator=g, dtype=torch.float64)
    x[20:] = torch.rot90(x[:20], 1, (-2, -1))  # every point has a rotated duplicate
    sym = FiniteGroup.dihedral()
    res = knn(x, x, 3, symmetry=sym, exclude_self=True)
    images = list(sym.orbit(x).reshape(8, 40, 1, 4, 4))
    assert_matches(res, *brute_orbit_knn(x, images, 3, exclude_self=True))
    assert bool((res.sq_dists[:, 0] == 0).all())


def test_finite_group_that_is_not_a_group_uses_the_given_maps():
    # {identity, rot90} is not closed (rot90 o rot90 = rot180 is missing): the distance is the
    # minimum over the maps applied to the points, exactly as the set defines it.
    sym = FiniteGroup([lambda x: torch.rot90(x, 1, (-2, -1))])
    g = torch.Generator().manual_seed(4)
    x = torch.randn(15, 1, 3, 3, generator=g, dtype=torch.float64)
    q = torch.randn(9, 1, 3, 3, generator=g, dtype=torch.float64)
    assert not sym.is_group(x)
    assert FiniteGroup.dihedral().is_group(x) and FiniteGroup.flips((-2, -1)).is_group(x)
    res = knn(q, x, 2, symmetry=sym)
    assert_matches(res, *brute_orbit_knn(q, [x, torch.rot90(x, 1, (-2, -1))], 2))


def test_finite_group_mixed_precision_and_float32_output():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(30, 1, 4, 4, generator=g, dtype=torch.float64)
    q = torch.randn(12, 1, 4, 4, generator=g)
    sym = FiniteGroup.rotations90()
    res = knn(q, x, 2, symmetry=sym)
    assert res.sq_dists.dtype == torch.float64
    images = list(sym.orbit(x).reshape(4, 30, 1, 4, 4))
    assert_matches(res, *brute_orbit_knn(q.double(), images, 2))
    res32 = knn(q, x.float(), 2, symmetry=sym)
    assert res32.sq_dists.dtype == torch.float32
    assert bool((res32.indices == res.indices).all())


def test_dihedral_has_eight_distinct_elements():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    orbit = FiniteGroup.dihedral().orbit(x)
    assert len({tuple(o.flatten().tolist()) for o in orbit}) == 8


def test_finite_group_transformed_duplicates_are_exactly_zero_far_from_origin():
    x = torch.randn(50, 3, 6, 6) + 1e3
    q = torch.rot90(x[:10], 1, (-2, -1)).flip(-1)
    res = knn(q, x, 1, symmetry=FiniteGroup.dihedral())
    assert bool((res.sq_dists == 0).all())
    assert res.indices[:, 0].tolist() == list(range(10))


# ---------------------------------------------------------------------------------- CyclicShifts
@settings(max_examples=15)
@given(
    shape=st.sampled_from([(9,), (2, 7), (3, 4, 5), (1, 6, 6)]),
    two_d=st.booleans(),
    n=st.integers(1, 10),
    m=st.integers(2, 15),
    k=st.integers(1, 3),
    exclude=st.booleans(),
    integer=st.booleans(),
    method=st.sampled_from(["auto", "gemm", "fft"]),
    seed=st.integers(0, 1000),
)
def test_cyclic_shifts_match_torch_roll_brute_force(
    shape, two_d, n, m, k, exclude, integer, method, seed
):
    dims = (-2, -1) if two_d and len(shape) >= 2 else (-1,)
    g = torch.Generator().manual_seed(seed)
    if integer:  # many exact ties, periodic signals and duplicates
        x = torch.randint(0, 2, (m, *shape), generator=g).double()
        q = x.clone() if exclude else torch.randint(0, 2, (n, *shape), generator=g).double()
    else:
        x = torch.randn(m, *shape, generator=g, dtype=torch.float64)
        q = x.clone() if exclude else torch.randn(n, *shape, generator=g, dtype=torch.float64)
    k = min(k, m - 1 if exclude else m)
    res = knn(q, x, k, symmetry=CyclicShifts(dims, method=method), exclude_self=exclude)
    assert_matches(res, *brute_orbit_knn(q, all_rolls(x, dims), k, exclude))


@pytest.mark.parametrize("method", ["gemm", "fft"])
def test_cyclic_shifts_shifted_duplicates_exactly_zero_in_float32_with_large_offset(method):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, 32, generator=g) * 1e-2 + 5e2
    shifts = torch.randint(0, 32, (40,), generator=g)
    q = torch.stack([x[i].roll(int(s), -1) for i, s in enumerate(shifts)])
    q[::2] += 1e-3 * torch.randn(20, 3, 32, generator=g)  # near-duplicates
    sym = CyclicShifts(method=method)
    res = knn(q, x, 1, symmetry=sym)
    assert res.indices[:, 0].tolist() == list(range(40))
    assert bool((res.sq_dists[1::2, 0] == 0).all())
    exact = torch.stack(
        [
            (q[i].double() - x[i].double().roll(int(s), -1)).square().sum()
            for i, s in enumerate(shifts)
        ]
    )
    torch.testing.assert_close(res.sq_dists[::2, 0].double(), exact[::2], rtol=1e-5, atol=0)
    idx, best = sym.align(q[1::2], x)
    assert idx.tolist() == list(range(1, 40, 2))
    assert best[:, 0].tolist() == shifts[1::2].tolist()


def test_cyclic_shifts_cost_model_and_methods_agree():
    # Short signals and small images: stacked GEMM; long signals and large images: FFT.
    assert CyclicShifts().choose_method(torch.zeros(1, 16)) == "gemm"
    assert CyclicShifts().choose_method(torch.zeros(1, 256)) == "fft"
    assert CyclicShifts((-2, -1)).choose_method(torch.zeros(1, 3, 8, 8)) == "gemm"
    assert CyclicShifts((-2, -1)).choose_method(torch.zeros(1, 1, 32, 32)) == "fft"
    assert CyclicShifts(method="fft").choose_method(torch.zeros(1, 16)) == "fft"
    g = torch.Generator().manual_seed(7)
    x = torch.randn(60, 2, 6, 5, generator=g)
    q = torch.randn(25, 2, 6, 5, generator=g)
    a = knn(q, x, 4, symmetry=CyclicShifts((-2, -1), method="gemm"))
    b = knn(q, x, 4, symmetry=CyclicShifts((-2, -1), method="fft"))
    assert bool((a.indices == b.indices).all())
    torch.testing.assert_close(a.sq_dists, b.sq_dists, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="method"):
        CyclicShifts(method="direct")


def test_cyclic_shifts_order_and_orbit():
    sym = CyclicShifts((-2, -1))
    x = torch.randn(3, 2, 4, 5)
    orbit = sym.orbit(x)
    assert sym.order_on(x) == 20 and sym.order is None and orbit.shape == (60, 2, 4, 5)
    torch.testing.assert_close(orbit[7 * 3 + 1], x[1].roll((1, 2), (-2, -1)))


# ---------------------------------------------------------------------------------- RigidMotions
def scipy_rigid_sq_dist(y, z):
    """Independent oracle: scipy's optimal rotation of centred z onto centred y."""
    yc, zc = y - y.mean(0), z - z.mean(0)
    rot, _ = Rotation.align_vectors(yc, zc)
    return float(((yc - rot.apply(zc)) ** 2).sum())


@settings(max_examples=8)
@given(n=st.integers(1, 8), m=st.integers(2, 12), k=st.integers(1, 3), seed=st.integers(0, 1000))
def test_rigid_motions_match_scipy_alignment(n, m, k, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, 7, 3))
    rots = Rotation.random(n, random_state=seed).as_matrix()
    q = np.einsum("nij,npj->npi", rots, x[rng.integers(0, m, n)]) + rng.normal(size=(n, 1, 3))
    q += rng.normal(scale=rng.choice([0.0, 0.1, 1.0]), size=q.shape)
    k = min(k, m)
    d = torch.tensor([[scipy_rigid_sq_dist(a, b) for b in x] for a in q], dtype=torch.float64)
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    res = knn(torch.from_numpy(q), torch.from_numpy(x), k, symmetry=RigidMotions())
    assert_matches(res, d.gather(1, order), order, atol=1e-8)


def test_rigid_motions_reflections_and_dimension():
    x = torch.randn(20, 9, 3, dtype=torch.float64)
    mirrored = x * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    so3 = knn(mirrored, x, 1, symmetry=RigidMotions())
    o3 = knn(mirrored, x, 1, symmetry=RigidMotions(allow_reflections=True))
    assert bool((o3.sq_dists < 1e-20).all()) and o3.indices[:, 0].tolist() == list(range(20))
    assert bool((so3.sq_dists > 1e-3).all())  # a chiral cloud is not a rotation of its mirror
    assert RigidMotions().dimension == 6
    assert RigidMotions(translations=False).dimension == 3
    assert RigidMotions(dim=2).dimension == 3
    assert RigidMotions().order is None


def test_kabsch_returns_proper_rotation_that_aligns():
    y = torch.randn(5, 10, 3, dtype=torch.float64)
    rot = torch.from_numpy(Rotation.random(5, random_state=3).as_matrix())
    z = y @ rot  # y = z R^T with R = rot
    found = kabsch(y, z)
    torch.testing.assert_close(found, rot)
    assert bool((torch.linalg.det(found) > 0).all())


def test_rigid_duplicates_are_exactly_zero():
    x = torch.randn(30, 12, 3) + 100.0
    res = knn(x[:10], x, 1, symmetry=RigidMotions())
    assert bool((res.sq_dists == 0).all())


# ---------------------------------------------------------------------------------- Permutations
@settings(max_examples=10)
@given(
    n=st.integers(1, 8),
    m=st.integers(2, 12),
    k=st.integers(1, 3),
    exclude=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_permutations_match_all_permutations(n, m, k, exclude, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 5, 2, generator=g, dtype=torch.float64)
    q = x.clone() if exclude else torch.randn(n, 5, 2, generator=g, dtype=torch.float64)
    if not exclude:  # permuted copies: orbit distance exactly 0
        c = min(3, n, m)
        q[:c] = x[:c][:, torch.randperm(5, generator=g)]
    k = min(k, m - 1 if exclude else m)
    sym = Permutations()
    res = knn(q, x, k, symmetry=sym, exclude_self=exclude)
    assert sym.order_on(x) == 120 and sym.order is None
    assert_matches(res, *brute_orbit_knn(q, list(sym.orbit(x).reshape(120, m, 5, 2)), k, exclude))


def test_permutations_with_rigid_motions_recovers_moved_shuffled_copies():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(25, 10, 3, generator=g, dtype=torch.float64)
    rots = torch.from_numpy(Rotation.random(8, random_state=4).as_matrix())
    q = (x[:8] @ rots.transpose(1, 2))[:, torch.randperm(10, generator=g)] + 3.0
    sym = Permutations(rigid=RigidMotions())
    res = knn(q, x, 2, symmetry=sym)
    assert res.indices[:, 0].tolist() == list(range(8))
    assert bool((res.sq_dists[:, 0] < 1e-18).all())
    # A local optimum: never above the permutation-only distance (the identity motion is one of
    # the starts) and never below the rigid-only lower bound on sorted centred norms.
    perm_only = knn(q, x, 25, symmetry=Permutations())
    assert not sym.exact and sym.dimension == 6 and sym.order is None
    for i in range(8):
        j = int(res.indices[i, 1])
        d_perm = perm_only.sq_dists[i][perm_only.indices[i] == j]
        assert 0 < float(res.sq_dists[i, 1]) <= float(d_perm) + 1e-9
        qc, xc = q[i] - q[i].mean(0), x[j] - x[j].mean(0)
        bound = (qc.norm(dim=1).sort().values - xc.norm(dim=1).sort().values).square().sum()
        assert float(res.sq_dists[i, 1]) >= float(bound) - 1e-9


# ------------------------------------------------------------------------------ shared contract
SYMMETRIES = [
    (FiniteGroup.dihedral(), (6, 6)),
    (CyclicShifts(), (3, 8)),
    (CyclicShifts((-2, -1)), (2, 4, 4)),
    (RigidMotions(), (6, 3)),
    (Permutations(), (5, 3)),
]


@pytest.mark.parametrize(("sym", "shape"), SYMMETRIES, ids=lambda v: repr(v))
def test_orbit_distance_is_symmetric_and_below_plain(sym, shape):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, *shape, generator=g, dtype=torch.float64)
    b = torch.randn(9, *shape, generator=g, dtype=torch.float64)
    ab = knn(a, b, 9, symmetry=sym)
    ba = knn(b, a, 6, symmetry=sym)
    d_ab = torch.empty(6, 9, dtype=torch.float64).scatter_(1, ab.indices, ab.sq_dists)
    d_ba = torch.empty(9, 6, dtype=torch.float64).scatter_(1, ba.indices, ba.sq_dists)
    torch.testing.assert_close(d_ab, d_ba.T, atol=1e-10, rtol=1e-10)
    plain = representation_gap(a, b)
    orbit = representation_gap(a, b, symmetry=sym)
    assert 0 < float(orbit) <= float(plain)


@pytest.mark.parametrize("sym", [s for s, _ in SYMMETRIES], ids=repr)
def test_float32_inputs_give_float32_outputs(sym):
    shape = dict((repr(s), sh) for s, sh in SYMMETRIES)[repr(sym)]
    x = torch.randn(7, *shape)
    res = knn(x, x, 2, symmetry=sym, exclude_self=True)
    assert res.sq_dists.dtype == torch.float32 and res.indices.dtype == torch.long
    assert bool((res.indices != torch.arange(7)[:, None]).all())
    assert bool((res.sq_dists[:, 0] <= res.sq_dists[:, 1]).all())


@pytest.mark.parametrize(
    ("sym", "bad", "match"),
    [
        (RigidMotions(), torch.randn(4, 10, 2), r"\[N, n_points, 3\]"),
        (RigidMotions(), torch.randn(4, 30), r"\[N, n_points, 3\]"),
        (CyclicShifts((-2, -1)), torch.randn(4, 16), "dims=\\(-2, -1\\)"),
        (Permutations(), torch.randn(4, 16), "n_elements, n_features"),
        (FiniteGroup.rotations90(), torch.randn(4, 3, 5), "square images"),
        (FiniteGroup([lambda x: 2 * x]), torch.randn(4, 3), "isometry"),
    ],
    ids=["rigid-2d", "rigid-flat", "shift2d-on-1d", "perm-flat", "rot90-nonsquare", "scaling"],
)
def test_shape_not_matching_symmetry_raises_clear_error(sym, bad, match):
    with pytest.raises(ValueError, match=match):
        knn(bad, bad, 1, symmetry=sym)


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="negative"):
        CyclicShifts(dims=(1,))
    with pytest.raises(TypeError, match="callable"):
        FiniteGroup([1])
    with pytest.raises(ValueError, match="two axes"):
        FiniteGroup.dihedral(dims=(-1,))
    with pytest.raises(TypeError, match="RigidMotions"):
        Permutations(rigid=CyclicShifts())
    with pytest.raises(ValueError, match="dim"):
        RigidMotions(dim=0)
    with pytest.raises(TypeError, match="symmetry"):
        knn(torch.randn(3, 2), torch.randn(3, 2), symmetry="shifts")
    with pytest.raises(NotImplementedError, match="continuous"):
        RigidMotions().orbit(torch.randn(2, 4, 3))


def test_all_symmetries_are_symmetry_subclasses():
    for sym, _ in SYMMETRIES:
        assert isinstance(sym, Symmetry)
        assert isinstance(sym.dimension, int)


@pytest.mark.parametrize("method", ["gemm", "fft"])
@pytest.mark.parametrize(("shape", "dims"), [((2, 24), (-1,)), ((1, 6, 8), (-2, -1))])
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_cyclic_shifts_float32_screening_stays_exact(shape, dims, offset, method):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(80, *shape, generator=g) + offset
    q = torch.randn(30, *shape, generator=g) + offset
    q[:10] = x[:10].roll(3, dims[-1]) + 1e-3 * torch.randn(10, *shape, generator=g)
    res = knn(q, x, 3, symmetry=CyclicShifts(dims, method=method))
    oracle_d, oracle_i = brute_orbit_knn(q, all_rolls(x, dims), 3)
    assert res.sq_dists.dtype == torch.float32
    torch.testing.assert_close(res.sq_dists.double(), oracle_d, rtol=1e-6, atol=1e-9)
    assert bool((res.indices == oracle_i).all())
