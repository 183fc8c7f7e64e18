r"""The gap curve: the representation gap measured at a grid of training-set sizes.

For training-set sizes :math:`n_1 < \dots < n_K` the gap

.. math::

    R_{n} = \frac{1}{|Q|} \sum_{y \in Q} \min_{z \in S_n} \lVert y - z \rVert^p

is measured on random subsets :math:`S_n` of ``n`` points. Each *pass* at a size shuffles the
points once; ``subsets="all"`` cuts the shuffled points into :math:`\lfloor N / b \rfloor`
disjoint subsets of ``b`` points and measures every one (every point used once per pass, small
sizes average many subsets); ``subsets="first"`` measures the first subset only (one random subset
of the size per pass, drawn without replacement). Both draw one permutation per pass from the
generator, so ``"first"`` measures the first subset of ``"all"``.

Two ways to pair queries and subsets:

* ``pooled=True``: training and reference points are one i.i.d. sample (:math:`N = n + m`
  points). A block holds ``b = size + 1`` points and each of them queries the ``size`` others
  (leave-one-out), so the gap is measured up to ``N - 1`` with :math:`N` terms.
* ``pooled=False``: the ``m`` references query blocks of ``b = size`` training points.

The same search also yields the *k-th neighbour terms* :math:`\rho_{k,i}^p` (the
Leonenko-Pronzato-Savani estimator of the gap's constant, see :mod:`gapcallback.law`) and each
reference's squared distance to its nearest training point (the references' gap to the whole
training set), so a caller never searches again for them.

Cost: one ``max(k, 5)``-neighbour search of the pool (leave-one-out when pooled) serves the largest
size, the k-th neighbour terms, the references' distances and most queries of every pass: the
nearest neighbour of a query within its block is the first of its listed neighbours that lies in
the block, exactly. Only the (query, block) pairs with none listed are searched within their block;
the values equal one exact search per block.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from torch import Tensor

from gapcallback.functional.nearest_neighbours import KNNResult, exact_knn
from gapcallback.utils.checks import (
    check_bool,
    check_choice,
    check_exponent,
    check_point_set,
    check_positive_int,
    check_same_device,
    check_same_features,
)

if TYPE_CHECKING:
    from gapcallback.symmetry.base import Symmetry

__all__ = [
    "GapCurve",
    "LineFit",
    "as_generator",
    "curve_knn",
    "fit_line",
    "gap_size_grid",
    "measure_gap_curve",
    "size_values",
    "slope_rounding",
]

SHARED_NEIGHBOURS = 5
"""Neighbours listed by the one search of the whole pool that most block searches reuse."""


class GapCurve(NamedTuple):
    r"""Result of :func:`measure_gap_curve` (``K`` sizes, ``Q`` queries; every tensor float64, CPU).

    The queries are the pool's points when ``pooled`` (``Q = n + m``, training points first),
    the references otherwise (``Q = m``).

    Attributes:
        sizes: ``[K]`` training-set sizes :math:`n_k`, increasing.
        gaps: ``[K]`` the gap at each size: the mean of ``subset_gaps[k]``.
        subset_gaps: ``K`` tensors ``[B_k]``: the gap of each measured subset (pass after pass),
            an unbiased estimate of :math:`R_{n_k}`.
        subset_stderr: ``K`` tensors ``[B_k]``: the standard error of each subset's gap over its
            per-query terms (0 for a single query).
        term_sums: ``[K, Q]`` for each size and query, the sum of its terms
            :math:`\min_{z \in S} \lVert y - z\rVert^p` over the passes in which it queried a subset.
        term_counts: ``[K, Q]`` how many terms ``term_sums`` adds up (0: the query was never used
            at that size). ``term_sums.sum(1) / term_counts.sum(1)`` equals ``gaps`` up to
            rounding.
        neighbour_terms: ``[Q]`` :math:`\rho_{k,i}^p`, the ``k``-th neighbour distance of each query
            in the whole pool (leave-one-out when pooled) to the power ``p``.
        reference_sq_dists: ``[m]`` exact squared distance of each reference to its nearest
            training point (orbit distance with a symmetry).
        n_train: ``n``, the number of training points.
        anchor_size: :math:`N_\mathrm{eff}`, the number of points each query sees in the whole
            pool: ``n + m - 1`` pooled, ``n`` otherwise (also ``sizes[-1]`` at most).
        p: loss exponent.
        k: neighbour rank of ``neighbour_terms``.
        pooled: whether training and reference points were pooled.
    """

    sizes: Tensor
    gaps: Tensor
    subset_gaps: tuple[Tensor, ...]
    subset_stderr: tuple[Tensor, ...]
    term_sums: Tensor
    term_counts: Tensor
    neighbour_terms: Tensor
    reference_sq_dists: Tensor
    n_train: int
    anchor_size: float
    p: float
    k: int
    pooled: bool


class LineFit(NamedTuple):
    """Result of :func:`fit_line`: least-squares slope(s) and their standard error(s)."""

    slope: Tensor
    stderr: Tensor


def gap_size_grid(n_max: int, num_sizes: int, smallest: float) -> Tensor:
    """``num_sizes`` sizes spaced geometrically from ``smallest`` to ``n_max``, as integers.

    The sizes :math:`10^{t}` for ``t`` evenly spaced from :math:`\\log_{10}` ``smallest`` to
    :math:`\\log_{10}` ``n_max``, rounded to the nearest integer (half to even), duplicates
    merged, the last one exactly ``n_max``. Each caller picks its own ``smallest`` (``GapLaw.fit``:
    ``n_max / 16``; ``gap_slope_dimension``: ``max(8, n // 32)``).

    Args:
        n_max: largest size (>= 1).
        num_sizes: number of geometric steps (>= 2); fewer sizes come back where they round
            to the same integer.
        smallest: smallest size, in ``[1, n_max]``.

    Returns:
        ``[K]`` float64 tensor of increasing integer sizes, ``K <= num_sizes``.

    Example:
        >>> gap_size_grid(500, 6, 15).long().tolist()
        [15, 30, 61, 123, 248, 500]
    """
    n_max = check_positive_int(n_max, "n_max")
    num_sizes = check_positive_int(num_sizes, "num_sizes", minimum=2)
    if isinstance(smallest, bool) or not isinstance(smallest, (int, float)):
        raise TypeError(f"`smallest` must be a number, got {smallest!r}.")
    if not 1 <= smallest <= n_max:
        raise ValueError(f"`smallest` must lie in [1, n_max={n_max}], got {smallest}.")
    grid = torch.logspace(math.log10(smallest), math.log10(n_max), num_sizes, dtype=torch.float64)
    grid = torch.unique(grid.round())
    grid[-1] = n_max
    return grid


def fit_line(x: Tensor, y: Tensor) -> LineFit:
    r"""Ordinary least-squares slope of ``y`` on ``x`` and its standard error.

    :math:`\hat b = \sum_i (x_i - \bar x)(y_i - \bar y) / \sum_i (x_i - \bar x)^2`, standard error
    :math:`\sqrt{\sum_i r_i^2 / (K - 2) / \sum_i (x_i - \bar x)^2}` from the residuals
    :math:`r_i` (``K - 2`` floored at 1). On the gap curve (``x = log n``, ``y = log R``) the
    dimension is :math:`-p / \hat b`.

    Args:
        x: ``[K]`` abscissae (not all equal).
        y: ``[K]`` ordinates, or ``[B, K]`` for ``B`` curves fitted at once.

    Returns:
        :class:`LineFit` ``(slope, stderr)``: 0-dim tensors for ``[K]`` inputs, ``[B]`` otherwise.

    Example:
        >>> n = torch.tensor([100.0, 200.0, 400.0], dtype=torch.float64)
        >>> fit = fit_line(n.log(), (40 / n).log())  # R = 40 / n: slope -1
        >>> round(float(fit.slope), 12), float(fit.stderr) < 1e-12
        (-1.0, True)
    """
    xc = x - x.mean()
    sxx = xc.square().sum()
    yc = y - y.mean(dim=-1, keepdim=True)
    slope = yc @ xc / sxx
    resid = yc - slope.unsqueeze(-1) * xc
    dof = max(1, x.numel() - 2)
    stderr = (resid.square().sum(dim=-1) / dof / sxx).sqrt()
    return LineFit(slope, stderr)


def slope_rounding(x: Tensor, y: Tensor) -> float:
    r"""The largest slope rounding alone can give :func:`fit_line` on a flat ``y`` (``[K]`` or
    ``[B, K]``, float64): :math:`64\,\varepsilon \max_i |y_i| / (\max x - \min x)`.

    Equal ordinates (a gap curve that does not move) fit to a slope of a few ulps, of either
    sign; only a slope beyond this bound is evidence of a trend.
    """
    spread = float(x.max() - x.min())
    return 64 * torch.finfo(torch.float64).eps * float(y.abs().max()) / spread


def as_generator(seed: int | torch.Generator | None, name: str = "seed") -> torch.Generator:
    """``seed`` as a CPU ``torch.Generator``: an int seeds a new one, ``None`` means seed 0, a
    CPU generator is used as given (and advanced)."""
    if seed is None:
        return torch.Generator().manual_seed(0)
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(f"`{name}` must be an int or a CPU torch.Generator.")
        return seed
    seed = check_positive_int(seed, name, minimum=0)
    return torch.Generator().manual_seed(seed)


def measure_gap_curve(
    train: Tensor,
    reference: Tensor,
    sizes: Sequence[int] | Tensor,
    *,
    p: float = 2.0,
    repeats: int = 5,
    k: int = 5,
    pooled: bool = True,
    subsets: Literal["all", "first"] = "all",
    symmetry: Symmetry | None = None,
    generator: int | torch.Generator | None = None,
) -> GapCurve:
    r"""Measure the gap :math:`R_n` at every size of ``sizes`` (see the module docstring).

    Args:
        train: ``[n, D]`` (or ``[n, *dims]``) training points.
        reference: ``[m, D]`` (or ``[m, *dims]``) reference points.
        sizes: strictly increasing sizes in ``[1, n_max]``, ``n_max = n + m - 1`` when ``pooled``
            else ``n`` (e.g. from :func:`gap_size_grid`).
        p: loss exponent, :math:`\lVert y - z\rVert^p`.
        repeats: passes per size (one pass at ``n_max``, where every subset is the whole pool).
        k: neighbour rank of ``neighbour_terms`` (``<= n_max``).
        pooled: pool training and reference points, leave-one-out queries.
        subsets: ``"all"`` disjoint subsets of each pass, or the ``"first"`` only.
        symmetry: optional :class:`gapcallback.symmetry.Symmetry` (orbit distances).
        generator: int seed or CPU ``torch.Generator`` for the permutations (``None``: seed 0).

    Returns:
        :class:`GapCurve`. A zero gap (duplicates) is returned as measured; callers that take
        logarithms check for it.

    Raises:
        TypeError, ValueError: invalid points or arguments (the message names them), sizes out
            of range, ``k > n_max``, or terms that overflow float64.
    """
    train = check_point_set(train, "train")
    reference = check_point_set(reference, "reference")
    check_same_device(train, reference, "train", "reference")
    check_same_features(train, reference, "train", "reference")
    p = check_exponent(p)
    repeats = check_positive_int(repeats, "repeats")
    k = check_positive_int(k, "k")
    pooled = check_bool(pooled, "pooled")
    check_choice(subsets, "subsets", ("all", "first"))
    generator = as_generator(generator, "generator")
    n = train.shape[0]
    pool = torch.cat([train, reference]) if pooled else train
    n_max = pool.shape[0] - 1 if pooled else n
    size_list = _check_sizes(sizes, n_max)
    if k > n_max:
        raise ValueError(
            f"`k`={k} exceeds the {n_max} points available at the largest size; lower `k`."
        )

    shared_k = min(max(k, SHARED_NEIGHBOURS), n_max)
    if pooled:
        shared = curve_knn(pool, pool, shared_k, exclude_self=True, symmetry=symmetry)
    else:
        shared = curve_knn(reference, train, shared_k, symmetry=symmetry)
    num_queries = shared.sq_dists.shape[0]

    subset_gaps, subset_stderr = [], []
    term_sums = torch.zeros(len(size_list), num_queries, dtype=torch.float64)
    term_counts = torch.zeros(len(size_list), num_queries, dtype=torch.float64)
    for row, size in enumerate(size_list):
        cells: list[Tensor] = []
        for _ in range(1 if size == n_max else repeats):
            for queries, terms in _pass_terms(
                pool, reference, size, p, pooled, subsets, symmetry, generator, shared
            ):
                cells.append(terms)
                term_sums[row, queries] += terms
                term_counts[row, queries] += 1.0
        subset_gaps.append(torch.stack([c.mean() for c in cells]))
        subset_stderr.append(
            torch.stack(
                [
                    c.std() / math.sqrt(c.numel()) if c.numel() > 1 else c.new_zeros(())
                    for c in cells
                ]
            )
        )
    neighbour_terms = _power(shared.sq_dists[:, k - 1], p)
    if not (bool(torch.isfinite(term_sums).all()) and bool(torch.isfinite(neighbour_terms).all())):
        raise ValueError(
            f"The gap terms ||y - z||^p (p={p:g}) of `train` and `reference` overflow float64; "
            "rescale the data (the gap scales as s^p) or use a smaller `p`."
        )
    return GapCurve(
        sizes=torch.tensor(size_list, dtype=torch.float64),
        gaps=torch.stack([g.mean() for g in subset_gaps]),
        subset_gaps=tuple(subset_gaps),
        subset_stderr=tuple(subset_stderr),
        term_sums=term_sums,
        term_counts=term_counts,
        neighbour_terms=neighbour_terms,
        reference_sq_dists=_reference_sq_dists(train, reference, pooled, symmetry, shared),
        n_train=n,
        anchor_size=float(n_max),
        p=p,
        k=k,
        pooled=pooled,
    )


# ---------------------------------------------------------------------- helpers


def curve_knn(
    queries: Tensor,
    points: Tensor,
    k: int = 1,
    *,
    exclude_self: bool = False,
    symmetry: Symmetry | None = None,
) -> KNNResult:
    """Every search of :func:`measure_gap_curve` (the one place to count or time them).

    :func:`~gapcallback.functional.nearest_neighbours.exact_knn`: exact float64 squared distances
    whatever the inputs' dtype (every term is taken to the power p in float64 anyway), errors
    naming ``train``/``reference``.
    """
    return exact_knn(
        queries,
        points,
        k,
        exclude_self=exclude_self,
        symmetry=symmetry,
        names=("train", "reference"),
    )


def size_values(sizes: object) -> list[int]:
    """The ints of a training-set size grid given as a sequence or tensor (not yet range-checked).

    Raises:
        TypeError: not a sequence or tensor of integers (floats with a fractional part, bools,
            complex, strings), naming ``sizes``.
    """
    if isinstance(sizes, Tensor):
        if sizes.is_complex() or sizes.dtype == torch.bool:
            raise TypeError(f"`sizes` must hold integers, got dtype {sizes.dtype}.")
        if sizes.is_floating_point() and not bool((sizes == sizes.round()).all()):
            raise TypeError(f"`sizes` must be integers, got {sizes.tolist()}.")
        return [int(v) for v in sizes.reshape(-1).tolist()]
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"`sizes` must be a sequence of ints, got {sizes!r}.")
    try:
        return [check_positive_int(v, "sizes[i]") for v in sizes]
    except TypeError as err:
        raise TypeError(f"`sizes` must be a sequence of ints, got {sizes!r}.") from err


def _check_sizes(sizes: Sequence[int] | Tensor, n_max: int) -> list[int]:
    values = size_values(sizes)
    if not values or any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"`sizes` must be non-empty and strictly increasing, got {values}.")
    if values[0] < 1 or values[-1] > n_max:
        raise ValueError(f"`sizes` must lie in [1, {n_max}], got {values}.")
    return values


def _power(sq_dists: Tensor, p: float) -> Tensor:
    """``(d^2)^(p/2)`` in float64 on CPU."""
    values = sq_dists.detach().to(device="cpu", dtype=torch.float64)
    return values if p == 2.0 else values.pow(p / 2.0)


def _pass_terms(
    pool: Tensor,
    reference: Tensor,
    size: int,
    p: float,
    pooled: bool,
    subsets: str,
    symmetry: Symmetry | None,
    generator: torch.Generator,
    shared: KNNResult,
) -> list[tuple[Tensor, Tensor]]:
    """One pass at ``size``: ``(query indices, per-query ||y - nearest||^p)`` for each subset.

    The pool is shuffled and cut into ``len(pool) // block`` disjoint blocks (``block = size + 1``
    when pooled: each point of a block is a reference to the ``size`` others; ``block = size``
    otherwise: the references query each block); ``subsets="first"`` keeps the first block only.
    Every block is an i.i.d. sample of the right size, so each block's mean is an unbiased gap
    estimate, and together they use every point once.

    ``shared`` holds the ``K`` nearest neighbours of every query in the whole pool (leave-one-out
    when pooled), ascending. A query's nearest neighbour within a block is the first of its ``K``
    neighbours that lies in that block, whenever one does: any block member outside the list is
    at least as far as the ``K``-th neighbour. The distance is then read off the list, exactly as
    a search of the block would return it. Only the (query, block) pairs with no listed neighbour
    in the block are searched, within their block: the result equals one exact search per block.
    """
    block = size + 1 if pooled else size
    total = pool.shape[0]
    num_queries = shared.sq_dists.shape[0]
    if block >= total:  # one block, the whole pool: the first shared neighbour
        return [(torch.arange(num_queries), _power(shared.sq_dists[:, 0], p))]
    order = torch.randperm(total, generator=generator).to(pool.device)
    num_blocks = total // block if subsets == "all" else 1
    members = order[: num_blocks * block].view(num_blocks, block)
    labels = torch.full((total,), -1, dtype=torch.long, device=pool.device)
    labels[members] = torch.arange(num_blocks, device=pool.device)[:, None]
    neighbour_labels = labels[shared.indices]  # [queries, K]; -1: not in any block
    if pooled:
        # Point i of block b: its first listed neighbour with label b.
        same = (
            neighbour_labels[members] == torch.arange(num_blocks, device=pool.device)[:, None, None]
        )
        found = same.any(dim=2)
        first = same.to(torch.uint8).argmax(dim=2, keepdim=True)
        sq = shared.sq_dists[members].gather(2, first).squeeze(2)  # [blocks, block]
        out = []
        for b in range(num_blocks):
            missing = (~found[b]).nonzero().squeeze(1)
            if missing.numel():
                subset = pool[members[b]]
                if 2 * missing.numel() >= block:  # most of the block: one leave-one-out search
                    sq[b] = curve_knn(
                        subset, subset, 1, exclude_self=True, symmetry=symmetry
                    ).sq_dists[:, 0]
                else:
                    sq[b, missing] = _nearest_other(subset, missing, symmetry)
            out.append((members[b].cpu(), _power(sq[b], p)))
        return out
    # Unpooled: every reference queries every block; mark the (reference, block) pairs found.
    k = neighbour_labels.shape[1]
    sq = torch.empty(num_queries, num_blocks, dtype=shared.sq_dists.dtype, device=pool.device)
    found = torch.zeros(num_queries, num_blocks, dtype=torch.bool, device=pool.device)
    rows = torch.arange(num_queries, device=pool.device)
    for col in reversed(range(k)):  # the nearest listed neighbour of each block is written last
        listed = neighbour_labels[:, col] >= 0
        r, lab = rows[listed], neighbour_labels[listed, col]
        sq[r, lab] = shared.sq_dists[listed, col]
        found[r, lab] = True
    out = []
    everyone = torch.arange(num_queries)
    for b in range(num_blocks):
        missing = (~found[:, b]).nonzero().squeeze(1)
        if 2 * missing.numel() >= num_queries:  # most references: search them all
            sq[:, b] = curve_knn(reference, pool[members[b]], 1, symmetry=symmetry).sq_dists[:, 0]
        elif missing.numel():
            subset = pool[members[b]]
            sq[missing, b] = curve_knn(reference[missing], subset, 1, symmetry=symmetry).sq_dists[
                :, 0
            ]
        out.append((everyone, _power(sq[:, b], p)))
    return out


def _nearest_other(subset: Tensor, rows: Tensor, symmetry: Symmetry | None) -> Tensor:
    """Squared distance from ``subset[rows]`` to the nearest *other* point of ``subset``.

    A point is its own nearest neighbour (distance 0), so it is among the two nearest; the other
    one of the two is the answer (a duplicate, at distance 0, when there is one).
    """
    result = curve_knn(subset[rows], subset, 2, symmetry=symmetry)
    is_self = result.indices[:, 0] == rows
    return torch.where(is_self, result.sq_dists[:, 1], result.sq_dists[:, 0])


def _reference_sq_dists(
    train: Tensor, reference: Tensor, pooled: bool, symmetry: Symmetry | None, shared: KNNResult
) -> Tensor:
    """``[m]`` squared distances of the references to their nearest training point (float64, CPU).

    Unpooled, the first shared neighbour. Pooled, the shared search ran over ``cat(train,
    reference)``: the first listed neighbour with an index below ``n`` is the nearest training
    point (exactly); the few references with none listed are searched in ``train``.
    """
    if not pooled:
        return shared.sq_dists[:, 0].to(device="cpu", dtype=torch.float64)
    n = train.shape[0]
    indices = shared.indices[n:]
    in_train = indices < n
    found = in_train.any(dim=1)
    first = in_train.to(torch.uint8).argmax(dim=1, keepdim=True)
    sq = shared.sq_dists[n:].gather(1, first).squeeze(1)
    missing = (~found).nonzero().squeeze(1)
    if missing.numel():
        sq[missing] = curve_knn(reference[missing], train, 1, symmetry=symmetry).sq_dists[:, 0]
    return sq.to(device="cpu", dtype=torch.float64)
