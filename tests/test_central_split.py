"""The central-involution split of permutation groups (gapcallback.symmetry.central_split).

Oracles: float64 brute force over the explicit orbit, the plain stacked-orbit search (same result
bit for bit), and the closed-form character identity <e y, z> = sum_c chi_c(e) <y_c, z_c>.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapcallback.functional import knn
from gapcallback.symmetry import CyclicShifts, FiniteGroup
from gapcallback.symmetry.central_split import (
    SPLIT_CACHE,
    central_split,
    compose,
    eigen_coordinates,
)
from gapcallback.symmetry.orbit_search import stacked_orbit_knn

GROUPS = {
    "flips-1d": (lambda: FiniteGroup.flips((-1,)), (12,)),
    "flips-2d": (lambda: FiniteGroup.flips((-2, -1)), (2, 4, 6)),
    "rot90": (lambda: FiniteGroup.rotations90(), (2, 4, 4)),
    "dihedral": (lambda: FiniteGroup.dihedral(), (1, 6, 6)),
    "shifts-1d": (lambda: CyclicShifts((-1,), method="gemm"), (2, 10)),
    "shifts-2d": (lambda: CyclicShifts((-2, -1), method="gemm"), (2, 4, 6)),
}


def group_perms(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """``[|G|, D]`` permutations read off the explicit orbit of the code point ``arange(D)``."""
    sym = GROUPS[name][0]()
    dim = int(torch.tensor(shape).prod())
    code = torch.arange(dim, dtype=torch.float64).reshape(1, *shape)
    return sym.orbit(code).reshape(-1, dim).round().long()


def images(perms):
    """``images`` argument of stacked_orbit_knn: ``[B, D] -> [|G|, B, D]``."""
    return lambda chunk: chunk[:, perms].movedim(1, 0)


def brute(queries, points, sym, k, exclude_self):
    """Float64 top-k of min over the explicit orbit of the points."""
    m = points.shape[0]
    orbit = sym.orbit(points.double()).reshape(-1, m, points[0].numel())
    q = queries.double().reshape(queries.shape[0], -1)
    d = ((q[None, :, None, :] - orbit[:, None, :, :]) ** 2).sum(-1).amin(0)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    order = torch.sort(d, dim=1, stable=True).indices[:, :k]
    return d.gather(1, order), order


@pytest.mark.parametrize("name", list(GROUPS))
def test_factorisation_is_a_central_elementary_abelian_split(name):
    perms = group_perms(name, GROUPS[name][1])
    split = central_split(perms)
    assert split is not None
    order, dim = torch.unique(perms, dim=0).shape
    n_e, n_h = split.involutions.shape[0], split.cosets.shape[0]
    assert n_e >= 2 and n_e * n_h == order
    ident = torch.arange(dim)
    assert torch.equal(split.involutions[0], ident) and torch.equal(split.cosets[0], ident)
    for e in split.involutions:
        assert torch.equal(compose(e, e), ident)  # involution
        for g in perms:
            assert torch.equal(compose(e, g), compose(g, e))  # central
    # H E is the whole group, each element exactly once.
    products = {tuple(compose(h, e).tolist()) for h in split.cosets for e in split.involutions}
    assert products == {tuple(p.tolist()) for p in perms}


@pytest.mark.parametrize("name", list(GROUPS))
def test_character_identity_against_float64_inner_products(name):
    shape = GROUPS[name][1]
    perms = group_perms(name, shape)
    split = central_split(perms)
    g = torch.Generator().manual_seed(0)
    dim = perms.shape[1]
    y = torch.randn(5, dim, generator=g, dtype=torch.float64)
    z = torch.randn(7, dim, generator=g, dtype=torch.float64)
    uy, uz = eigen_coordinates(y, split), eigen_coordinates(z, split)
    assert torch.equal(uy[:, split.augmented], torch.ones(5, dtype=torch.float64))
    w = split.weights
    n_e = split.involutions.shape[0]
    for e in range(n_e):
        want = y[:, split.involutions[e]] @ z.T  # <e y, z>
        got = torch.zeros(5, 7, dtype=torch.float64)
        for c, (a, b) in enumerate(split.sections):
            chi = (-1) ** bin(c & e).count("1")
            got += chi * (uy[:, a:b] * w[a:b]) @ uz[:, a:b].T
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Coset images: coordinates of h y equal those of the permuted points.
    for h in split.cosets:
        torch.testing.assert_close(
            eigen_coordinates(y, split, h), eigen_coordinates(y[:, h], split)
        )


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(list(GROUPS)),
    n=st.integers(1, 14),
    m=st.integers(2, 25),
    k=st.integers(1, 4),
    exclude=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    offset=st.sampled_from([0.0, 1e3]),
    seed=st.integers(0, 10_000),
)
def test_split_search_matches_brute_force_and_the_stacked_search(
    name, n, m, k, exclude, dtype, offset, seed
):
    make, shape = GROUPS[name]
    sym = make()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, *shape, generator=g, dtype=dtype) + offset
    if exclude:
        q = x
    else:
        q = torch.randn(n, *shape, generator=g, dtype=dtype) + offset
        h = min(n, m) // 2
        if h:  # transformed duplicates (the last group element)
            q[:h] = sym.orbit(x[:h])[-h:]
    k = min(k, m - 1 if exclude else m)
    res = knn(q, x, k, symmetry=sym, exclude_self=exclude)
    want_d, want_i = brute(q, x, sym, k, exclude)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(res.sq_dists.double(), want_d, rtol=rtol, atol=0.0)
    gaps = (want_d[:, 1:] - want_d[:, :-1]).abs() > 1e-6 * (1 + want_d[:, 1:])
    clear = torch.ones_like(want_i, dtype=torch.bool)
    clear[:, 1:] &= gaps
    clear[:, :-1] &= gaps
    assert bool(((res.indices == want_i) | ~clear).all())
    # The same exact search without the split, bit for bit.
    flat_q = q.reshape(q.shape[0], -1)
    flat_x = x.reshape(m, -1)
    perms = group_perms(name, shape)
    plain = stacked_orbit_knn(flat_q, flat_x, k, exclude, images(perms), perms.shape[0])
    with_split = stacked_orbit_knn(flat_q, flat_x, k, exclude, images(perms), len(perms), perms)
    assert torch.equal(plain.indices, with_split.indices)
    assert torch.equal(plain.sq_dists, with_split.sq_dists)


def test_transformed_duplicates_are_exactly_zero_far_from_the_origin():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, 8, 8, generator=g) + 1e4
    sym = FiniteGroup.dihedral()
    q = torch.rot90(x[:20], 1, (-2, -1)).flip(-1)
    res = knn(q, x, 1, symmetry=sym)
    assert bool((res.sq_dists == 0).all()) and res.indices[:, 0].tolist() == list(range(20))
    shifts = CyclicShifts((-2, -1), method="gemm")
    res = knn(torch.roll(x[:20], (3, 5), (-2, -1)), x, 1, symmetry=shifts)
    assert bool((res.sq_dists == 0).all()) and res.indices[:, 0].tolist() == list(range(20))


def test_small_blocks_and_degenerate_ties_flush_pending_candidates():
    # Binary images: masses of exact ties, so candidate lists overflow and are re-checked early.
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 2, (70, 1, 4, 4), generator=g).double()
    q = torch.randint(0, 2, (30, 1, 4, 4), generator=g).double()
    sym = FiniteGroup.dihedral()
    for k, exclude, queries in ((3, False, q), (2, True, x)):
        perms = sym.coordinate_permutations(x)
        res = stacked_orbit_knn(
            queries.reshape(len(queries), -1),
            x.reshape(70, -1),
            k,
            exclude,
            images(perms),
            8,
            perms,
            query_block=7,
            point_block=16,
            pending_per_row=2,
        )
        want_d, _ = brute(queries, x, sym, k, exclude)
        torch.testing.assert_close(res.sq_dists, want_d, rtol=0, atol=0)


def test_groups_without_central_involutions_or_permutations_fall_back():
    # Rotations of order 3 on 3-cycles: no involution at all.
    perms = torch.tensor([[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    assert central_split(perms) is None
    # Negation is an isometry but not a permutation of entries: no permutations, stacked search.
    neg = FiniteGroup([lambda z: -z], names=["neg"])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 8, generator=g, dtype=torch.float64)
    q = -x[:6] + 1e-3
    assert neg.coordinate_permutations(x) is None
    res = knn(q, x, 2, symmetry=neg)
    want_d, want_i = brute(q, x, neg, 2, False)
    torch.testing.assert_close(res.sq_dists, want_d)
    assert torch.equal(res.indices, want_i)
    # A value-dependent map (sorting) passes the code point but not the probe.
    sort = FiniteGroup([lambda z: z.sort(dim=-1).values])
    assert sort.coordinate_permutations(x) is None


def test_coordinate_permutations_of_the_built_in_groups():
    x = torch.zeros(1, 2, 3, 3)
    for sym in (FiniteGroup.flips((-2, -1)), FiniteGroup.rotations90(), FiniteGroup.dihedral()):
        perms = sym.coordinate_permutations(x)
        code = torch.arange(18.0).reshape(1, 2, 3, 3)
        for g, p in enumerate(perms):
            assert torch.equal(sym.apply(code, g).reshape(-1), code.reshape(-1)[p])
    assert len({tuple(p.tolist()) for p in perms}) == 8


def test_factorisation_is_cached_by_value_not_by_address():
    perms = group_perms("dihedral", (1, 6, 6))
    first = central_split(perms)
    again = central_split(perms.clone())  # equal values, other memory: the cached result
    assert again is first
    other = central_split(group_perms("rot90", (1, 6, 6)))  # same shape, other group
    assert other is not first and other.cosets.shape[0] * other.involutions.shape[0] == 4
    for _ in range(SPLIT_CACHE.maxsize + 1):  # relabelled copies: the cache stays bounded
        tau = torch.randperm(perms.shape[1])
        assert central_split(tau.argsort()[perms[:, tau]]) is not None
    assert len(SPLIT_CACHE) <= SPLIT_CACHE.maxsize
    SPLIT_CACHE.clear()
    assert len(SPLIT_CACHE) == 0 and central_split(perms) is not first  # factored anew
