r"""The data-copying test :math:`C_T` of Meehan, Chaudhuri and Dasgupta (AISTATS 2020).

A model *copies* its training set :math:`T` when its samples :math:`Q_m` lie systematically
closer to :math:`T` than held-out test points :math:`P_n` from the data distribution do. The test
compares, cell by cell, the distances to the nearest training point with a Mann-Whitney U test.

Cells: :math:`k` cells :math:`\pi` are the Voronoi cells of k-means centroids fitted on the training
set (``scipy.cluster.vq.kmeans2``, k-means++ initialisation, a fixed ``seed``); every training,
test and generated point belongs to the cell of its nearest centroid (exact distances, ties by the
lower centroid index). Within a cell, distances go to the cell's own training points :math:`T_\pi`
(the paper's :math:`Z_U(L(P_n^\pi), L(Q_m^\pi); T_\pi)` and the authors' code):

.. math:: L(P^\pi) = \{\min_{t \in T_\pi} \lVert x - t\rVert : x \in P_n \cap \pi\}, \qquad
    L(Q^\pi) = \{\min_{t \in T_\pi} \lVert z - t\rVert : z \in Q_m \cap \pi\}.

With :math:`n_\pi = |P_n \cap \pi|`, :math:`m_\pi = |Q_m \cap \pi|`, the U statistic of the
samples (ties count one half) and its normal z-score under the null hypothesis of equal
distributions:

.. math:: U_\pi = \sum_{a \in L(Q^\pi)} \sum_{b \in L(P^\pi)} \Big([a > b] + \tfrac12 [a = b]\Big),
    \qquad Z_\pi = \frac{U_\pi - n_\pi m_\pi / 2}{\sqrt{n_\pi m_\pi (n_\pi + m_\pi + 1) / 12}}

(``continuity_correction=True`` adds :math:`+1/2` to the numerator, as the authors' code does for
its one-sided test). The statistic averages the cells' z-scores weighted by their share of test
points :math:`P_n(\pi) = n_\pi / n`, over the cells :math:`\Pi_\tau` with enough samples,
:math:`Q_m(\pi) \ge \tau` with :math:`\tau = \text{min\_samples} / m` (the authors use 20 / m):

.. math:: C_T = \frac{\sum_{\pi \in \Pi_\tau} P_n(\pi)\, Z_\pi}{\sum_{\pi \in \Pi_\tau} P_n(\pi)}.

:math:`C_T \ll 0` (e.g. below -3) is evidence of data copying, :math:`C_T \gg 0` of
under-fitting, :math:`C_T \approx 0` of neither. Cells without test points have weight 0; cells
left without training points by k-means (possible with duplicated training points) are excluded,
with the points in them.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from scipy.cluster.vq import kmeans2
from torch import Tensor

from gapcallback.functional.knn_balls import check_point_sets
from gapcallback.functional.nearest_neighbours import exact_knn
from gapcallback.utils.checks import check_bool, check_positive_int, compute_dtype

__all__ = ["DataCopyingResult", "data_copying_statistic", "mann_whitney_z"]


class DataCopyingResult(NamedTuple):
    """Result of :func:`data_copying_statistic`.

    Attributes:
        statistic: 0-dim :math:`C_T` (float32, or float64 when an input is float64).
        cell_z: ``[k]`` float64 z-score :math:`Z_\\pi` of each cell (NaN where not computed: no
            test point, no sample or no training point in the cell).
        test_fraction: ``[k]`` float64 :math:`P_n(\\pi)`, the share of test points per cell.
        sample_fraction: ``[k]`` float64 :math:`Q_m(\\pi)`, the share of samples per cell.
        used: ``[k]`` bool, the cells :math:`\\Pi_\\tau` entering the statistic.
        centroids: ``[k, D]`` the k-means centroids (the cells), flattened features.
    """

    statistic: Tensor
    cell_z: Tensor
    test_fraction: Tensor
    sample_fraction: Tensor
    used: Tensor
    centroids: Tensor


def data_copying_statistic(
    test: Tensor,
    samples: Tensor,
    train: Tensor,
    *,
    n_cells: int = 10,
    min_samples: int = 20,
    seed: int = 0,
    continuity_correction: bool = False,
) -> DataCopyingResult:
    r""":math:`C_T` of ``samples`` against the training set ``train``, with held-out ``test`` points.

    Args:
        test: ``[n, D]`` (or ``[n, *dims]``, flattened) held-out points from the data distribution
            (not used in training).
        samples: ``[m, D]`` generated samples.
        train: ``[l, D]`` the model's training set, ``l >= n_cells``.
        n_cells: number of k-means cells.
        min_samples: a cell enters the statistic when it holds at least this many samples
            (:math:`\tau = \text{min\_samples} / m`).
        seed: seed of the k-means initialisation (the cells, hence the statistic, depend on it).
        continuity_correction: add 1/2 to each U (the authors' code); default off (the paper).

    Returns:
        :class:`DataCopyingResult` (module docstring).

    Raises:
        TypeError: non-tensor or non-float inputs, non-int options.
        ValueError: empty sets, NaN/Inf, mismatched shapes or devices, ``n_cells`` above the
            number of training points, or no cell with at least ``min_samples`` samples and one
            test point (lower ``n_cells`` or ``min_samples``, or draw more samples).
    """
    n_cells = check_positive_int(n_cells, "n_cells")
    min_samples = check_positive_int(min_samples, "min_samples")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {seed!r}.")
    check_bool(continuity_correction, "continuity_correction")
    test, train = check_point_sets(test, train, ("test", "train"))
    samples, train = check_point_sets(samples, train, ("samples", "train"))
    if n_cells > train.shape[0]:
        raise ValueError(
            f"`n_cells`={n_cells} k-means cells need at least as many training points; `train` has "
            f"{train.shape[0]}. Use n_cells <= {train.shape[0]}."
        )
    data = train.detach().to("cpu", torch.float64).numpy()
    with warnings.catch_warnings():
        # An empty cluster keeps its previous centroid (the cell is then excluded, docstring).
        warnings.simplefilter("ignore", UserWarning)
        centroids_np, _ = kmeans2(
            data, n_cells, iter=30, minit="++", seed=np.random.default_rng(seed)
        )
    dtype = compute_dtype(test, samples, train)
    centroids = torch.as_tensor(centroids_np, device=train.device).to(dtype)

    def cells(x: Tensor, name: str) -> Tensor:
        return exact_knn(x, centroids, 1, names=(name, "centroids")).indices[:, 0]

    train_cell, test_cell, sample_cell = (
        cells(train, "train"),
        cells(test, "test"),
        cells(samples, "samples"),
    )
    n, m = test.shape[0], samples.shape[0]
    z = torch.full((n_cells,), float("nan"), dtype=torch.float64)
    test_counts = torch.bincount(test_cell, minlength=n_cells).cpu()
    sample_counts = torch.bincount(sample_cell, minlength=n_cells).cpu()
    train_counts = torch.bincount(train_cell, minlength=n_cells).cpu()
    for cell in range(n_cells):
        if test_counts[cell] == 0 or sample_counts[cell] == 0 or train_counts[cell] == 0:
            continue
        cell_train = train[train_cell == cell]
        to_test = exact_knn(test[test_cell == cell], cell_train, 1, names=("test", "train"))
        to_samples = exact_knn(
            samples[sample_cell == cell], cell_train, 1, names=("samples", "train")
        )
        # Squared distances: the same order as the distances, and exact.
        z[cell] = mann_whitney_z(
            to_samples.sq_dists[:, 0], to_test.sq_dists[:, 0], continuity_correction
        )
    used = (sample_counts >= min_samples) & (test_counts > 0) & (train_counts > 0)
    if not bool(used.any()):
        raise ValueError(
            f"no k-means cell holds at least `min_samples`={min_samples} of the {m} samples and a "
            f"test point (samples per cell: {sample_counts.tolist()}); lower `n_cells` or "
            "`min_samples`, or pass more samples."
        )
    weights = test_counts.to(torch.float64) / n
    statistic = (weights[used] * z[used]).sum() / weights[used].sum()
    return DataCopyingResult(
        statistic.to(dtype),
        z,
        weights,
        sample_counts.to(torch.float64) / m,
        used,
        centroids,
    )


def mann_whitney_z(a: Tensor, b: Tensor, continuity_correction: bool = False) -> float:
    r"""z-score of the Mann-Whitney U statistic of ``a`` ``[m]`` against ``b`` ``[n]`` (1-D,
    real): :math:`U = \sum_{i,j} [a_i > b_j] + \frac12 [a_i = b_j]`, :math:`Z = (U - nm/2 (+\frac12))
    / \sqrt{nm(n+m+1)/12}` (no tie correction of the variance). Negative when ``a`` tends to be
    smaller. Exact counts by sorting ``b`` (``O((n + m) log n)``), no ``n x m`` comparison."""
    sorted_b = torch.sort(b.to(torch.float64)).values
    a = a.to(torch.float64)
    below = torch.searchsorted(sorted_b, a, side="left").to(torch.float64)
    not_above = torch.searchsorted(sorted_b, a, side="right").to(torch.float64)
    u = float((below + 0.5 * (not_above - below)).sum())
    m, n = a.numel(), b.numel()
    if continuity_correction:
        u += 0.5
    return (u - n * m / 2.0) / math.sqrt(n * m * (n + m + 1) / 12.0)
