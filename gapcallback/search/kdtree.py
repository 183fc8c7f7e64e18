r"""Exact k nearest neighbours in low dimension on scipy's ``cKDTree`` (CPU, float64).

For queries :math:`q_i` ``[N, D]`` and points :math:`x_j` ``[M, D]`` the result is, like the GEMM
engine's (:func:`gapcallback.functional.nearest_neighbours.exact_knn`), the ``k`` smallest

.. math:: t_{ij} = \operatorname{fl}\Big(\sum_d \operatorname{fl}\big((q_{id} - x_{jd})^2\big)\Big),

computed by direct difference in torch float64 exactly as the engine's re-check does
(``diff = q[rows].to(torch.float64) - x[cols].to(torch.float64); diff.square().sum(dim=1)``), in
ascending order with ties broken by the lower index, so distances and indices are bit-identical to
the GEMM path. ``cKDTree`` only *pre-selects*: its own distances are never returned.

Algorithm. For each query, ``cKDTree`` returns its ``w`` nearest points (``w = k`` + 1 with
``exclude_self`` + a margin), by its own float64 distances :math:`c_{ij}` (a differently ordered
sum, returned as :math:`\hat\rho = \operatorname{fl}(\sqrt{c})`). Their :math:`t_{ij}` are
recomputed, the query itself is dropped (``exclude_self``), and the window is sorted by
``(t, index)``; the first ``k`` are the answer if the row is *safe*:

.. math:: \operatorname{fl}(\hat\rho_w^2) > t_{(k)} (1 + \delta) + \eta, \qquad
   \delta = (4D + 2M + 16)\,\varepsilon, \quad \eta = (4D + 2M + 16)\cdot 2^{-1074},

with :math:`\hat\rho_w` the window's largest ``cKDTree`` distance, :math:`t_{(k)}` the k-th
selected recomputed distance, :math:`\varepsilon = 2^{-52}`. Unsafe rows (ties or near-ties at
the window's edge: many duplicates, lattice data) are queried again with a doubled window; a row
whose window would reach ``M`` is brute-forced over all ``M`` points in torch (trivially exact).

Why exact. Write :math:`S_{ij}` for the exact squared distance of the float64 inputs and
:math:`u = 2^{-53}`, :math:`\gamma_n = nu / (1 - nu)`. Any float64 sum of the ``D`` rounded
squares of rounded differences, in any order, is :math:`S(1 + \theta)` with
:math:`|\theta| \le \gamma_{D+2}`: true of :math:`t` and of :math:`c`. A point ``p`` outside the
window was either evaluated by the tree and rejected (:math:`c_p \ge` the final window bound
:math:`c_w`, the heap's largest distance, since the bound only decreases) or lies in a pruned cell,
whose computed lower bound exceeded :math:`c_w` (``query_single_point`` in scipy's
``spatial/ckdtree/src/query.cxx``; ``eps=0``). That lower bound is a sum of per-dimension side
terms, each :math:`\le` the point's own rounded square (rounding is monotone), maintained by at
most :math:`D + \text{depth} \le D + M` incremental updates ``min += new - old`` (``new >= old``),
so it is at most :math:`(1 + \gamma_{2(D + M)})` times the exact sum of the side terms, hence
:math:`c_p \ge c_w (1 - \gamma_{D-1}) / (1 + \gamma_{2(D+M)})`. With
:math:`\operatorname{fl}(\hat\rho_w^2) \le c_w (1 + \gamma_3)` this gives :math:`t_p \ge
\operatorname{fl}(\hat\rho_w^2) / (1 + \delta')`, :math:`\delta' \approx (5D + 2M + 6)\,u`, and
:math:`\delta \ge 1.6\,\delta'` covers the higher-order terms: in a safe row every point outside the
window has :math:`t_p > t_{(k)}` *strictly*, so the top ``k`` by ``(t, index)`` of the window are the
top ``k`` over all ``M``. Rounding into the subnormal range adds at most :math:`2^{-1075}` per
operation, which :math:`\eta` covers. Exact zeros (duplicates) are zero in both sums.

Range. The re-check is the engine's own (:func:`~gapcallback.search.recheck.direct_sq_dists`, on
the inputs cast to the engine's compute dtype), so float64 squared distances that underflow
(below :math:`2.2 \cdot 10^{-308}`) raise :class:`~gapcallback.search.DistanceRangeError` there
as they do in the GEMM path, for the pairs this backend re-checks (its window, not the GEMM's
candidates: the two may differ on which near-zero pair trips the check). Distances that overflow
float64 make a row unsafe until it is brute-forced (its distances are then ``inf``, which the output
cast rejects). The dispatcher selects this backend only for data whose centred magnitudes lie within
:math:`2^{[-30, 30]}`, where neither happens except for near-duplicates closer than
:math:`10^{-154}`.

Cost. Build :math:`O(M \log M)`, query about :math:`O(N (w + 2^D) \log M)`: far cheaper than the
:math:`N M` GEMM for small ``D`` (or low intrinsic dimension) and large sets;
:func:`prefer_kdtree` is the selection rule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gapcallback.search.gemm import gemm_knn
from gapcallback.search.recheck import direct_sq_dists
from gapcallback.utils.checks import compute_dtype

__all__ = [
    "kdtree_knn",
    "needs_intrinsic_probe",
    "prefer_kdtree",
    "probe_intrinsic_dimension",
]

# ------------------------------------------------------------------------------------------------
# Cost model of prefer_kdtree, set from benchmarks/bench_kdtree.py (benchmarks/results/kdtree.json,
# 2-core Intel Xeon, 2 threads; benchmarks/README.md section 8). A tree's cost grows with the
# *intrinsic* dimension of the data: on a 2-manifold it beat the GEMM path from N = M = 2000 at
# every ambient D up to 16 (0.1-0.75x), on uniform data only up to D = 4 from N = 2000 and D = 6
# from N = 5000-10000 (it lost 1.1-17x at D >= 8).
# ------------------------------------------------------------------------------------------------
KDTREE_MIN_POINTS = 2000  # both sets at least this large: below, the GEMM path is a few ms anyway
KDTREE_LOW_DIM = 4  # effective dimension where the tree wins from KDTREE_MIN_POINTS
KDTREE_MID_DIM = 6  # ... and up to this one, from KDTREE_MID_POINTS
KDTREE_MID_POINTS = 5000
KDTREE_MIN_POINTS_K1 = 5000  # k = 1, where the GEMM path is cheapest: larger sets
KDTREE_MID_POINTS_K1 = 10000
KDTREE_MAX_AMBIENT_DIM = 16  # largest ambient D measured (with a low intrinsic dimension)
KDTREE_MAX_K = 32  # the window (and the per-row sort) grows with k
PROBE_POINTS = 256  # points whose two nearest neighbours estimate the intrinsic dimension
PROBE_POOL = 1024  # ... among this many (evenly strided subsamples: deterministic); 512 among
# 4096 cost 5-7 ms (a third of the 2000-point search it chose for) for estimates within 0.5 of these
# (benchmarks/README.md section 8), and the cost model's thresholds are 4 and 6

# ------------------------------------------------------------------------------------------------
# Search parameters.
# ------------------------------------------------------------------------------------------------
_LEAFSIZE = 16  # cKDTree's default
_BALANCED_TREE = True  # cKDTree's default (median splits)
_WINDOW_MARGIN = 1  # extra neighbours queried beyond k (+1 with exclude_self) ...
_WINDOW_FRACTION = 0.0  # ... or this fraction of k, whichever is larger (ties: doubled windows)
_WINDOW_ENTRIES = 1 << 20  # query x neighbour entries per cKDTree call (~50 MiB working memory)
_THREADED_ENTRIES = 1 << 16  # below this many query x neighbour entries, one cKDTree worker: the
# threads' start-up cost more than they saved (1.1-1.2x slower at 8000-24000 entries, 0.9x above)
_RECHECK_ELEMENTS = 1 << 22  # float64 elements per chunk of the brute force (32 MiB)
_EPS64 = 2.0**-52
_SUBNORMAL64 = 2.0**-1074


def prefer_kdtree(
    n_queries: int,
    n_points: int,
    dim: int,
    k: int,
    *,
    device: torch.device,
    intrinsic_dim: float | None = None,
) -> bool:
    r"""Whether :func:`kdtree_knn` is expected to beat the GEMM path on this problem.

    The measured cost model (CPU only; ``False`` on any other device). With the effective
    dimension :math:`d = \min(D, d_\mathrm{int})` (``intrinsic_dim`` when known, else the
    ambient ``dim``): the tree is preferred when both sets have at least ``KDTREE_MIN_POINTS``
    points, ``k <= KDTREE_MAX_K``, ``dim <= KDTREE_MAX_AMBIENT_DIM`` and either
    ``d <= KDTREE_LOW_DIM``, or ``d <= KDTREE_MID_DIM`` with both sets at least
    ``KDTREE_MID_POINTS``; for ``k = 1``, where the GEMM path is cheapest, the sizes are 5000 and
    10000. The choice only changes the time: both backends return the same values.
    """
    if torch.device(device).type != "cpu":
        return False
    smaller = min(n_queries, n_points)
    low, mid = KDTREE_MIN_POINTS, KDTREE_MID_POINTS
    if k == 1:
        low, mid = KDTREE_MIN_POINTS_K1, KDTREE_MID_POINTS_K1
    if k > KDTREE_MAX_K or smaller < low or dim > KDTREE_MAX_AMBIENT_DIM:
        return False
    d = dim if intrinsic_dim is None else min(float(dim), float(intrinsic_dim))
    if d <= KDTREE_LOW_DIM:
        return True
    return d <= KDTREE_MID_DIM and smaller >= mid


def needs_intrinsic_probe(
    n_queries: int, n_points: int, dim: int, k: int, device: torch.device
) -> bool:
    """Whether :func:`prefer_kdtree` can only decide with an intrinsic dimension: the ambient
    dimension alone says GEMM, but a low intrinsic dimension would say tree."""
    return not prefer_kdtree(n_queries, n_points, dim, k, device=device) and prefer_kdtree(
        n_queries, n_points, dim, k, device=device, intrinsic_dim=1.0
    )


def probe_intrinsic_dimension(points: Tensor) -> float:
    r"""A cheap, deterministic intrinsic-dimension estimate for the cost model (not a measurement:
    use :func:`gapcallback.functional.intrinsic_dimension` for that).

    TwoNN's maximum likelihood :math:`\hat d = n / \sum_i \log(r_{2,i} / r_{1,i})` over
    ``PROBE_POINTS`` evenly strided points of ``points`` ``[M, D]`` and their two nearest others
    among ``PROBE_POOL`` evenly strided points (one small GEMM-path search, about a millisecond);
    points with a duplicate (``r_1 = 0``) are left out. Returns ``inf`` when nothing is left.
    """
    m = points.shape[0]
    pool = points[:: max(1, m // PROBE_POOL)][:PROBE_POOL]
    probe_rows = torch.arange(0, pool.shape[0], max(1, pool.shape[0] // PROBE_POINTS))
    sq, idx = gemm_knn(pool[probe_rows], pool, 3)
    # Drop each probe point itself (distance 0 at its own index), keep the two nearest others.
    own = idx == probe_rows[:, None]
    sq = sq.masked_fill(own, float("inf")).sort(dim=1).values[:, :2]
    keep = (sq[:, 0] > 0) & torch.isfinite(sq[:, 1])
    if not bool(keep.any()):
        return math.inf
    log_ratio = 0.5 * torch.log(sq[keep, 1] / sq[keep, 0])
    total = float(log_ratio.sum())
    return math.inf if total <= 0 else int(keep.sum()) / total


def kdtree_knn(
    queries: Tensor,
    points: Tensor,
    k: int,
    *,
    exclude_self: bool = False,
    workers: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours of ``queries`` among ``points`` on a ``cKDTree``.

    Args:
        queries: ``[N, D]`` CPU floating tensor (float32 or float64; fp16/bf16 are cast exactly),
            finite: validated and flattened by the caller.
        points: ``[M, D]`` CPU floating tensor, finite.
        k: number of neighbours, ``1 <= k <= M`` (``M - 1`` with ``exclude_self``).
        exclude_self: ``queries`` and ``points`` are the same set (same ``N``); index ``i`` is
            never a neighbour of query ``i`` (duplicates of it still count, at distance 0).
        workers: threads of the tree queries; default ``torch.get_num_threads()``, or one for a
            query of fewer than ``_THREADED_ENTRIES`` query x neighbour entries.

    Returns:
        ``(sq_dists [N, k] float64, indices [N, k] int64)``: bit-identical to the GEMM engine
        (direct-difference float64 distances, ascending, ties by the lower index). See the module
        docstring for why the result is exact.
    """
    from scipy.spatial import cKDTree

    n, m = _check(queries, points, k, exclude_self)
    dim = points.shape[1]
    # The tensors the GEMM path re-checks from (same dtype, so the same bits), and the tree's
    # float64 copy of the points (no copy for contiguous float64 input).
    dtype = compute_dtype(queries, points)
    x = points.detach().to(dtype)
    q = x if queries is points else queries.detach().to(dtype)
    out_d = torch.empty(n, k, dtype=torch.float64)
    out_i = torch.empty(n, k, dtype=torch.long)
    if n == 0:
        return out_d, out_i
    factor = 4 * dim + 2 * m + 16
    delta, eta = factor * _EPS64, factor * _SUBNORMAL64
    need = k + (1 if exclude_self else 0)
    window = need + max(_WINDOW_MARGIN, math.ceil(_WINDOW_FRACTION * need))
    if workers is None:
        workers = 1 if n * window < _THREADED_ENTRIES else torch.get_num_threads()
    workers = int(workers)
    rows: Tensor | None = None  # None: all rows (first pass, no index copy)
    tree = None
    while True:
        if window >= m:  # the window would hold every point: brute force, trivially exact
            _brute_force(
                q, x, torch.arange(n) if rows is None else rows, k, exclude_self, out_d, out_i
            )
            break
        if tree is None:
            data = x.to(torch.float64).contiguous().numpy()
            tree = cKDTree(data, leafsize=_LEAFSIZE, balanced_tree=_BALANCED_TREE, copy_data=False)
        n_rows = n if rows is None else rows.numel()
        chunk = max(1, _WINDOW_ENTRIES // window)
        unsafe = []
        for s in range(0, n_rows, chunk):
            e = min(s + chunk, n_rows)
            r = torch.arange(s, e) if rows is None else rows[s:e]
            qr = q[s:e] if rows is None else q[r]
            rho, idx = tree.query(
                qr.to(torch.float64).contiguous().numpy(), k=window, workers=workers
            )
            rho_t = torch.from_numpy(rho).reshape(e - s, window)
            cols = torch.from_numpy(idx).reshape(e - s, window).to(torch.long)
            d, i, safe = _select(q, x, r, rho_t, cols, k, m, exclude_self, delta, eta)
            if bool(safe.all()):  # the common case: every row proved exact in this window
                out_d[r] = d
                out_i[r] = i
            else:
                out_d[r[safe]] = d[safe]
                out_i[r[safe]] = i[safe]
                unsafe.append(r[~safe])
        if not unsafe:
            break
        rows = torch.cat(unsafe)
        window *= 2
    return out_d, out_i


def _check(queries: Tensor, points: Tensor, k: int, exclude_self: bool) -> tuple[int, int]:
    """Cheap preconditions (the caller validated the data itself); returns ``(N, M)``."""
    for name, t in (("queries", queries), ("points", points)):
        if t.ndim != 2 or t.device.type != "cpu" or not t.is_floating_point():
            raise ValueError(
                f"`{name}` must be a real floating CPU tensor [rows, D], got "
                f"{tuple(t.shape)} {t.dtype} on {t.device}."
            )
    if queries.shape[1] != points.shape[1] or points.shape[1] == 0:
        raise ValueError(
            f"`queries` and `points` need the same D >= 1, got {queries.shape[1]} and "
            f"{points.shape[1]}."
        )
    n, m = queries.shape[0], points.shape[0]
    if exclude_self and n != m:
        raise ValueError(f"`exclude_self=True` needs the same set, got {n} and {m} points.")
    available = m - (1 if exclude_self else 0)
    if not 1 <= k <= available:
        raise ValueError(f"`k`={k} must be between 1 and {available}.")
    return n, m


def _select(
    q: Tensor,
    x: Tensor,
    rows: Tensor,
    rho: Tensor,
    cols: Tensor,
    k: int,
    m: int,
    exclude_self: bool,
    delta: float,
    eta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k by ``(t, index)`` of one window ``cols`` ``[R, w]`` (tree distances ``rho``) of the
    query rows ``rows`` ``[R]``, and which rows are provably exact (module docstring)."""
    n_rows, width = cols.shape
    missing = cols >= m  # cKDTree's filler (index M, distance inf): only when c overflows
    any_missing = bool(missing.any())
    if any_missing:
        cols = cols.masked_fill(missing, 0)
    t = direct_sq_dists(q, x, rows.repeat_interleave(width), cols.reshape(-1), torch.float64)
    t = t.view(n_rows, width)
    if any_missing:
        t = t.masked_fill(missing, float("inf"))
    if exclude_self:
        t = t.masked_fill(cols == rows[:, None], float("inf"))
    # Sort by (t, index). Without ties among a row's k + 1 smallest t the order by t alone is
    # that order (the common case: one sort); with ties, by index first, then stably by t.
    t_sorted, order = t.sort(dim=1)
    edge = min(k + 1, width)
    if bool((t_sorted[:, 1:edge] == t_sorted[:, : edge - 1]).any()):
        by_index = cols.argsort(dim=1)
        cols = cols.gather(1, by_index)
        t_sorted, order = t.gather(1, by_index).sort(dim=1, stable=True)
    t = t_sorted
    best_d = t[:, :k]
    best_i = cols.gather(1, order[:, :k])
    bound = rho[:, -1].square()
    safe = bound > best_d[:, -1] * (1.0 + delta) + eta  # False for NaN / inf distances
    if any_missing:
        safe &= ~missing.any(dim=1)
    return best_d, best_i, safe


def _brute_force(
    q: Tensor,
    x: Tensor,
    rows: Tensor,
    k: int,
    exclude_self: bool,
    out_d: Tensor,
    out_i: Tensor,
) -> None:
    """Exact top-k of the query ``rows`` over all ``M`` points (direct differences), in place."""
    m, dim = x.shape
    all_cols = torch.arange(m)
    chunk = max(1, _RECHECK_ELEMENTS // (m * dim))
    for s in range(0, rows.numel(), chunk):
        r = rows[s : s + chunk]
        t = direct_sq_dists(q, x, r.repeat_interleave(m), all_cols.repeat(r.numel()), torch.float64)
        t = t.view(-1, m)
        if exclude_self:
            t[torch.arange(r.numel()), r] = float("inf")
        # Columns are in index order, so a stable sort breaks ties by the lower index.
        t, order = t.sort(dim=1, stable=True)
        out_d[r] = t[:, :k]
        out_i[r] = order[:, :k]
