"""Synthetic manifolds of known intrinsic dimension for the intrinsic-dimension benchmarks.

Every generator takes ``(n, rng)`` (a ``numpy.random.Generator``) and returns an ``[n, D]`` float64
array. :data:`SUITE` lists ``(name, d, D, generator)``: spheres, flat tori, hypercubes, the Swiss
roll, linear and nonlinear embeddings, non-uniform densities, with and without noise, d = 1..30.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Generator = Callable[[int, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Manifold:
    name: str
    d: int
    D: int
    sample: Generator
    noisy: bool = False


def _rotation(rng: np.random.Generator, d: int, big_d: int) -> np.ndarray:
    """A random ``[d, D]`` matrix with orthonormal rows (a fixed seed per (d, D))."""
    q, _ = np.linalg.qr(np.random.default_rng(1000 * d + big_d).standard_normal((big_d, d)))
    return q.T


def sphere(d: int, big_d: int | None = None) -> Generator:
    """Uniform on the unit sphere S^d in R^{d+1}, rotated into R^D."""

    def gen(n: int, rng: np.random.Generator) -> np.ndarray:
        x = rng.standard_normal((n, d + 1))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x if big_d is None else x @ _rotation(rng, d + 1, big_d)

    return gen


def torus(d: int) -> Generator:
    """Flat torus T^d = (S^1)^d in R^{2d}: uniform angles, (cos, sin) pairs."""

    def gen(n: int, rng: np.random.Generator) -> np.ndarray:
        t = rng.uniform(0.0, 2.0 * np.pi, (n, d))
        return np.concatenate([np.cos(t), np.sin(t)], axis=1)

    return gen


def cube(d: int, big_d: int) -> Generator:
    """Uniform hypercube [0, 1]^d, linearly (isometrically) embedded in R^D."""

    def gen(n: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.uniform(size=(n, d))
        return u if big_d == d else u @ _rotation(rng, d, big_d)

    return gen


def gaussian(d: int, big_d: int) -> Generator:
    """Standard normal in a random d-dimensional linear subspace of R^D (non-uniform density)."""

    def gen(n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal((n, d)) @ _rotation(rng, d, big_d)

    return gen


def beta_cube(d: int, big_d: int) -> Generator:
    """Hypercube with a Beta(2, 5) density per coordinate (skewed, non-uniform), embedded in R^D."""

    def gen(n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.beta(2.0, 5.0, size=(n, d)) @ _rotation(rng, d, big_d)

    return gen


def swiss_roll() -> Generator:
    """The Swiss roll (d = 2) in R^3."""

    def gen(n: int, rng: np.random.Generator) -> np.ndarray:
        t = 1.5 * np.pi * (1.0 + 2.0 * rng.uniform(size=n))
        h = 21.0 * rng.uniform(size=n)
        return np.stack([t * np.cos(t), h, t * np.sin(t)], axis=1)

    return gen


def helix() -> Generator:
    """A closed helix-like curve (d = 1) in R^3 (Hein and Audibert's M5 style)."""

    def gen(n: int, rng: np.random.Generator) -> np.ndarray:
        t = rng.uniform(0.0, 2.0 * np.pi, n)
        return np.stack(
            [(2 + np.cos(8 * t)) * np.cos(t), (2 + np.cos(8 * t)) * np.sin(t), np.sin(8 * t)], 1
        )

    return gen


def curved_cube(d: int) -> Generator:
    """Nonlinear embedding of [0, 1]^d in R^{2d}: (u, sin(pi u) * cos(2 pi u_shifted)) (Hein M12 style)."""

    def gen(n: int, rng: np.random.Generator) -> np.ndarray:
        u = rng.uniform(size=(n, d))
        v = np.sin(np.pi * u) * np.cos(2.0 * np.pi * np.roll(u, 1, axis=1))
        return np.concatenate([u, v], axis=1)

    return gen


def with_noise(gen: Generator, sigma: float, big_d: int) -> Generator:
    """Add isotropic Gaussian noise of standard deviation ``sigma`` in all D ambient directions."""

    def noisy(n: int, rng: np.random.Generator) -> np.ndarray:
        x = gen(n, rng)
        if x.shape[1] < big_d:
            x = np.concatenate([x, np.zeros((n, big_d - x.shape[1]))], axis=1)
        return x + sigma * rng.standard_normal(x.shape)

    return noisy


SUITE: list[Manifold] = [
    Manifold("helix", 1, 3, helix()),
    Manifold("swiss_roll", 2, 3, swiss_roll()),
    Manifold("sphere_2", 2, 3, sphere(2)),
    Manifold("torus_3", 3, 6, torus(3)),
    Manifold("cube_4_in_8", 4, 8, cube(4, 8)),
    Manifold("gaussian_4_in_16", 4, 16, gaussian(4, 16)),
    Manifold("sphere_5_in_11", 5, 11, sphere(5, 11)),
    Manifold("curved_cube_6", 6, 12, curved_cube(6)),
    Manifold("beta_cube_6_in_12", 6, 12, beta_cube(6, 12)),
    Manifold("torus_8", 8, 16, torus(8)),
    Manifold("sphere_10", 10, 11, sphere(10)),
    Manifold("cube_10_in_20", 10, 20, cube(10, 20)),
    Manifold("gaussian_10_in_30", 10, 30, gaussian(10, 30)),
    Manifold("curved_cube_12", 12, 24, curved_cube(12)),
    Manifold("sphere_15_in_32", 15, 32, sphere(15, 32)),
    Manifold("cube_17_in_20", 17, 20, cube(17, 20)),
    Manifold("torus_18", 18, 36, torus(18)),
    Manifold("gaussian_20_in_40", 20, 40, gaussian(20, 40)),
    Manifold("cube_24_in_30", 24, 30, cube(24, 30)),
    Manifold("sphere_30_in_40", 30, 40, sphere(30, 40)),
    Manifold("cube_30", 30, 30, cube(30, 30)),
    Manifold("noisy_sphere_5_in_20", 5, 20, with_noise(sphere(5), 0.01, 20), noisy=True),
    Manifold("noisy_cube_10_in_20", 10, 20, with_noise(cube(10, 20), 0.01, 20), noisy=True),
]
"""The broad suite used for the accuracy table (d = 1..30; 23 manifolds, 2 with noise)."""


def by_name(name: str) -> Manifold:
    for m in SUITE:
        if m.name == name:
            return m
    raise KeyError(name)
