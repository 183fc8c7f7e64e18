"""Quotient dimension and the gap law under symmetry, on cases with a known answer.

* flat 2-torus in R^4 under a reflection (finite group, |G| = 2): d is unchanged and
  R^G_n ~ R_{2n}, i.e. half the plain gap at the same n (p = 2, d = 2);
* point clouds from a 2-parameter family moved by random rigid motions: plain intrinsic dimension
  2 + 6 = 8, orbit (quotient) dimension 2;
* the Kamb & Ganguli ideal-score oracle: the ideal equivariant diffusion model samples the orbit
  G(D), so its orbit gap equals R(reference, G(D)), below the plain R(reference, D).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.spatial.transform import Rotation

from gapcallback.functional import knn
from gapcallback.functional.gap import representation_gap
from gapcallback.symmetry import (
    CyclicShifts,
    FiniteGroup,
    Permutations,
    RigidMotions,
    effective_sample_size,
    ideal_denoiser,
    quotient_dimension,
    sample_ideal_diffusion,
)


def flat_torus(n: int, g: torch.Generator) -> torch.Tensor:
    angles = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 * math.pi
    a, b = angles[:, :1], angles[:, 1:]
    return torch.cat([a.cos(), a.sin(), b.cos(), b.sin()], dim=1)


def twonn(x: torch.Tensor, symmetry=None) -> float:
    """TwoNN MLE (Facco et al. 2017), inline oracle: d = (N - 1) / sum log(r2 / r1)."""
    r = knn(x, x, 2, exclude_self=True, symmetry=symmetry).sq_dists.double().sqrt()
    return float((x.shape[0] - 1) / (r[:, 1] / r[:, 0]).log().sum())


def test_finite_group_gap_at_n_equals_plain_gap_at_order_times_n_on_torus():
    reflect = FiniteGroup([lambda x: x * torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=x.dtype)])
    assert reflect.order == 2 and reflect.dimension == 0
    n = 1000
    orbit, plain_2n, plain_n = [], [], []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        reference, train = flat_torus(3000, g), flat_torus(2 * n, g)
        orbit.append(float(representation_gap(reference, train[:n], symmetry=reflect)))
        plain_2n.append(float(representation_gap(reference, train)))
        plain_n.append(float(representation_gap(reference, train[:n])))
    r_orbit, r_2n, r_n = (sum(v) / len(v) for v in (orbit, plain_2n, plain_n))
    assert effective_sample_size(n, reflect) == 2 * n
    assert r_orbit / r_2n == pytest.approx(1.0, abs=0.05)  # R^G_n ~ R_{|G| n}
    # d unchanged (quotient_dimension(2, G) = 2), constant shrinks by |G|^(-p/d) = 1/2.
    assert quotient_dimension(2.0, reflect) == 2.0
    assert r_orbit / r_n == pytest.approx(
        2.0 ** (-2.0 / quotient_dimension(2.0, reflect)), abs=0.05
    )


def test_rigid_motions_remove_six_dimensions_from_twonn_estimate():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 6, 3, generator=g, dtype=torch.float64)
    n = 600
    theta = torch.rand(n, 2, generator=g, dtype=torch.float64)
    clouds = basis[0] + theta[:, 0, None, None] * basis[1] + theta[:, 1, None, None] * basis[2]
    rot = torch.from_numpy(Rotation.random(n, random_state=0).as_matrix())
    moved = clouds @ rot.transpose(1, 2) + torch.randn(n, 1, 3, generator=g, dtype=torch.float64)
    d_plain = twonn(moved)  # true 2 + 6 = 8; TwoNN is biased low at d = 8, N = 600
    d_orbit = twonn(moved, RigidMotions())
    assert d_orbit == pytest.approx(2.0, abs=0.4)
    assert d_orbit == pytest.approx(twonn(clouds.reshape(n, -1)), abs=0.2)  # same as unmoved
    assert 6.5 <= d_plain <= 9.0
    assert quotient_dimension(8.0, RigidMotions()) == 2.0


def test_quotient_helpers_contract():
    assert quotient_dimension(5.0, None) == 5.0
    assert quotient_dimension(torch.tensor(7.5), RigidMotions()).item() == 1.5
    assert quotient_dimension(3, CyclicShifts()) == 3
    assert quotient_dimension(9.0, Permutations(rigid=RigidMotions())) == 3.0
    with pytest.raises(ValueError, match="dim G=6"):
        quotient_dimension(5.0, RigidMotions())
    with pytest.raises(TypeError, match="symmetry"):
        quotient_dimension(5.0, "rigid")
    with pytest.raises(ValueError, match="order"):
        effective_sample_size(10, CyclicShifts())
    shifts = CyclicShifts()
    signals = torch.zeros(2, 3, 16)
    assert shifts.order_on(signals) == 16
    assert shifts.order is None  # checking a shape never changes the object
    assert effective_sample_size(10, shifts, points=signals) == 160
    with pytest.raises(ValueError, match="points="):
        effective_sample_size(10, shifts)
    assert Permutations().order_on(torch.zeros(2, 4, 3)) == 24
    assert FiniteGroup.dihedral().order_on(torch.zeros(2, 5, 5)) == 8
    assert RigidMotions().order_on(torch.zeros(2, 5, 3)) is None
    assert effective_sample_size(10, RigidMotions()) == 10
    assert effective_sample_size(10, None) == 10


def test_ideal_denoiser_limits():
    atoms = torch.tensor([[0.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[0.5, 0.1], [3.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(ideal_denoiser(x, atoms, 1e-3), atoms)  # nearest atom
    torch.testing.assert_close(ideal_denoiser(x, atoms, 1e4), atoms.mean(0).expand(2, 2))
    with pytest.raises(ValueError, match="sigma"):
        ideal_denoiser(x, atoms, 0.0)


@pytest.mark.parametrize(
    ("symmetry", "shape"),
    [(CyclicShifts(), (8,)), (FiniteGroup.dihedral(), (1, 3, 3))],
    ids=["cyclic-shifts", "dihedral"],
)
def test_ideal_equivariant_model_samples_orbit_and_attains_orbit_gap(symmetry, shape):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(5, *shape, generator=g, dtype=torch.float64)
    reference = torch.randn(200, *shape, generator=g, dtype=torch.float64)
    orbit = symmetry.orbit(data)
    samples = sample_ideal_diffusion(
        data, 200, symmetry=symmetry, generator=torch.Generator().manual_seed(1)
    )
    # Samples collapse onto G(D) ...
    assert float(knn(samples, orbit).sq_dists.max()) < 1e-12
    # ... and hit the orbit of every training point (coupon collector: 200 >> 5 log 5).
    assert set(knn(samples, data, symmetry=symmetry).indices[:, 0].tolist()) == set(range(5))
    r_orbit_set = representation_gap(reference, orbit)  # R(reference, G(D)), plain distances
    torch.testing.assert_close(
        representation_gap(reference, samples, symmetry=symmetry), r_orbit_set
    )
    torch.testing.assert_close(representation_gap(reference, data, symmetry=symmetry), r_orbit_set)
    # The non-equivariant ideal model reproduces D itself: its plain gap R(reference, D) is larger.
    plain_samples = sample_ideal_diffusion(data, 60, generator=torch.Generator().manual_seed(2))
    assert float(knn(plain_samples, data).sq_dists.max()) < 1e-12
    r_plain = representation_gap(reference, plain_samples)
    torch.testing.assert_close(r_plain, representation_gap(reference, data))
    assert float(r_plain) > 1.2 * float(r_orbit_set)


def test_sample_ideal_diffusion_rejects_continuous_group_and_bad_arguments():
    data = torch.randn(4, 5, 3)
    with pytest.raises(NotImplementedError, match="continuous"):
        sample_ideal_diffusion(data, 3, symmetry=RigidMotions())
    with pytest.raises(ValueError, match="sigma_min"):
        sample_ideal_diffusion(data, 3, sigma_min=1e6)
    with pytest.raises(TypeError, match="num_samples"):
        sample_ideal_diffusion(data, 2.5)
