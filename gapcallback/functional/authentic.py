r"""Authenticity of generated samples (Alaa et al. 2022, "How faithful is your synthetic data?").

A sample is *unauthentic* (a copy, or too close to be told apart from one) when it is at least as
close to its nearest training point as that training point is to its own nearest training
neighbour; otherwise it is *authentic*:

.. math:: i^*(z) = \arg\min_i \lVert z - x_i\rVert, \qquad
    \text{authentic}(z) = \Big[\lVert z - x_{i^*}\rVert > \min_{l \ne i^*} \lVert x_{i^*} - x_l\rVert\Big],
    \qquad A = \frac1M \sum_j \text{authentic}(z_j).

So ``authenticity`` is the fraction of samples that are *not* inside the closed ball around their
nearest training point whose radius is that point's 1-NN distance (the ball of the k-NN family
with ``k = 1``). This is the orientation of Alaa et al. (their Eq. for :math:`A_j` and their code:
authentic iff the real-to-real distance is *smaller* than the sample-to-real distance); higher is
better and an exact copy of a training point is never authentic.

Ties: a sample exactly on that sphere (distance equal to the 1-NN distance) is unauthentic (the
closed ball, as elsewhere in this family); so is a copy of a duplicated training point (distance
0 = 0). Among several equally near training points, :math:`i^*` is the lowest index (the engine's
tie rule).

Exact distances from the engine (:func:`gapcallback.functional.knn`): the training side's 1-NN
distances are computed once (:func:`knn_sq_radii` with ``k = 1``), each sample costs one exact
1-NN search. Memory bounded by blocks.
"""

from __future__ import annotations

from torch import Tensor

from gapcallback.functional.knn_balls import check_point_sets, fraction, knn_sq_radii
from gapcallback.functional.nearest_neighbours import exact_knn
from gapcallback.utils.checks import compute_dtype

__all__ = ["authentic_samples", "authenticity", "train_sq_radii"]


def authenticity(samples: Tensor, train: Tensor) -> Tensor:
    r"""Fraction of ``samples`` that are authentic with respect to ``train`` (module docstring).

    Args:
        samples: ``[M, D]`` (or ``[M, *dims]``, flattened) generated samples.
        train: ``[n, D]`` training set of the same per-point shape, ``n >= 2``.

    Returns:
        0-dim tensor in ``[0, 1]`` (float32, or float64 when an input is float64).

    Raises:
        TypeError: non-tensor or non-float inputs.
        ValueError: empty sets, NaN/Inf, mismatched shapes or devices, fewer than 2 training points.

    Example:
        >>> import torch
        >>> from gapcallback.functional import authenticity
        >>> train = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
        >>> samples = torch.tensor([[0.0, 0.0], [0.4, 0.0], [5.0, -3.0]])  # copy, near, far
        >>> authenticity(samples, train)
        tensor(0.3333)
    """
    samples, train = check_point_sets(samples, train, ("samples", "train"))
    authentic = authentic_samples(samples, train, train_sq_radii(train))
    return fraction(authentic.sum(), samples.shape[0], compute_dtype(samples, train))


def train_sq_radii(train: Tensor) -> Tensor:
    """``[n]`` exact squared distance of each training point to its nearest other training point
    (float64), computed once per training set; ``n >= 2``."""
    train = check_point_sets(train, train, ("train", "train"))[0]
    if train.shape[0] < 2:
        raise ValueError(
            "`train` needs at least 2 points (authenticity compares a sample's distance with a "
            f"training point's distance to its nearest other training point), got {train.shape[0]}."
        )
    return knn_sq_radii(train, 1, name="train")


def authentic_samples(samples: Tensor, train: Tensor, train_sq_nn: Tensor) -> Tensor:
    """``[M]`` bool: which samples are authentic, given the training set's squared 1-NN distances
    ``train_sq_nn`` (:func:`train_sq_radii`)."""
    res = exact_knn(samples, train, 1, names=("samples", "train"))
    nearest_sq, nearest = res.sq_dists[:, 0], res.indices[:, 0]
    return nearest_sq > train_sq_nn.to(nearest_sq)[nearest]
