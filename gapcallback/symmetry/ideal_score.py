r"""Closed-form ideal denoiser and sampler: the oracle of a diffusion model trained to optimality.

For a finite training set :math:`D = \{x_1, \dots, x_n\}` and the variance-exploding process
:math:`x_\sigma = x_0 + \sigma \varepsilon`, the optimal denoiser (the minimiser of the denoising loss
over all functions) is the posterior mean of the empirical distribution,

.. math::

    \hat x_0(x, \sigma) = \sum_{a \in A} w_a(x, \sigma)\, a, \qquad
    w_a = \operatorname{softmax}_a\!\Big(-\frac{\lVert x - a \rVert^2}{2 \sigma^2}\Big),

with atoms :math:`A = D`. For a model constrained to be :math:`G`-equivariant, the optimum is the same
formula with :math:`A = G(D)`, the orbit of the training set (Kamb & Ganguli 2025). Integrating the
probability-flow ODE :math:`dx/d\sigma = (x - \hat x_0(x, \sigma))/\sigma` from a large
:math:`\sigma` down to a small one collapses every sample onto an atom: the ideal model reproduces
its training set (or its orbit), which makes it an exact oracle for the representation gap:
:math:`R(\text{ref}, \text{samples}) \to R(\text{ref}, A)` once every atom has been sampled.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from gapcallback.symmetry.base import Symmetry
from gapcallback.utils.checks import check_point_set, check_positive_int

__all__ = ["ideal_denoiser", "sample_ideal_diffusion"]


def ideal_denoiser(x: Tensor, atoms: Tensor, sigma: float) -> Tensor:
    r"""Posterior mean :math:`\sum_a \operatorname{softmax}(-\lVert x - a\rVert^2 / 2\sigma^2)\, a`.

    Args:
        x: ``[B, *shape]`` noisy points.
        atoms: ``[A, *shape]`` support of the empirical distribution (``D`` or its orbit ``G(D)``).
        sigma: noise level (> 0).

    Returns:
        ``[B, *shape]`` denoised points, in ``x``'s dtype (computed in float64).
    """
    if not sigma > 0:
        raise ValueError(f"`sigma` must be positive, got {sigma}.")
    xf = x.reshape(x.shape[0], -1).double()
    af = atoms.reshape(atoms.shape[0], -1).double()
    sq = xf.square().sum(1, keepdim=True) + af.square().sum(1) - 2.0 * xf @ af.T
    weights = torch.softmax(-sq.clamp_min(0.0) / (2.0 * sigma**2), dim=1)
    return (weights @ af).reshape(x.shape).to(x.dtype)


@torch.no_grad()
def sample_ideal_diffusion(
    data: Tensor,
    num_samples: int,
    *,
    symmetry: Symmetry | None = None,
    steps: int = 40,
    sigma_max: float | None = None,
    sigma_min: float = 1e-3,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Samples of the ideal (optionally :math:`G`-equivariant) diffusion model trained on ``data``.

    Deterministic probability-flow sampling (DDIM / Euler in :math:`\sigma` on a geometric schedule)
    with the closed-form denoiser :func:`ideal_denoiser` over the atoms ``data`` or, with a finite
    ``symmetry``, its orbit ``symmetry.orbit(data)``.

    Args:
        data: ``[n, *shape]`` training set.
        num_samples: number of samples ``M``.
        symmetry: a finite :class:`~gapcallback.symmetry.base.Symmetry` (with ``orbit``).
        steps: Euler steps from ``sigma_max`` to ``sigma_min``.
        sigma_max: initial noise level; default ``4 x`` the data's largest distance from its mean.
        sigma_min: final noise level; the last step returns the denoiser's output at it.
        generator: optional ``torch.Generator`` for the initial noise.

    Returns:
        ``[M, *shape]`` samples (``data``'s dtype) lying on the atoms up to ``O(sigma_min)``.
    """
    data = check_point_set(data, "data")
    num_samples = check_positive_int(num_samples, "num_samples")
    steps = check_positive_int(steps, "steps")
    atoms = data if symmetry is None else symmetry.orbit(data)
    flat = atoms.reshape(atoms.shape[0], -1).double()
    mean = flat.mean(0)
    if sigma_max is None:
        sigma_max = 4.0 * float((flat - mean).norm(dim=1).max().clamp_min(1e-12))
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}.")
    noise = torch.randn(num_samples, flat.shape[1], generator=generator, dtype=torch.float64).to(
        data.device
    )
    x = mean + sigma_max * noise
    ratio = math.log(sigma_min / sigma_max) / steps
    sigmas = [sigma_max * math.exp(ratio * i) for i in range(steps + 1)]
    for s, s_next in itertools.pairwise(sigmas):
        denoised = ideal_denoiser(x, flat, s)
        x = x + (s_next - s) * (x - denoised) / s
    out = ideal_denoiser(x, flat, sigmas[-1])
    return out.reshape(num_samples, *data.shape[1:]).to(data.dtype)
