r"""Sets of elements up to reordering (Hungarian assignment), optionally also up to rigid motions.

For sets :math:`Y, Z` of :math:`n` elements with features in :math:`\mathbb R^f`,

.. math:: d_G(Y, Z)^2 = \min_{\pi \in S_n} \sum_{i=1}^n \lVert y_i - z_{\pi(i)} \rVert^2 ,

a linear assignment problem solved exactly by :func:`scipy.optimize.linear_sum_assignment` on the
cost matrix :math:`C_{ij} = \lVert y_i - z_j \rVert^2` (computed by direct difference in float64, so
permuted duplicates give exactly 0). ``order_on(x)`` :math:`= n!`, ``dimension`` 0.

Cost: one :math:`O(n^3)` assignment per *evaluated* pair. Pairs are screened with the lower bound
:math:`\max(\sum_i \min_j C_{ij}, \sum_j \min_i C_{ij})` and the upper bound of the identity matching,
then evaluated by increasing lower bound until the k-th distance is below every remaining lower
bound (branch and bound), which keeps the result exact while skipping most assignments. Fine for
sets of a few dozen elements and a few thousand points; the screening itself is
:math:`O(N M n^2 f)`.

With ``rigid=RigidMotions()`` the group is :math:`S_n \times SE(d)` acting on point clouds
``[N, n, d]``: translation is solved exactly (centring), rotation and assignment by alternating
Kabsch and Hungarian steps from several starts (identity and principal-axes alignments). That
alternation converges to a *local* optimum, so the computed distance is an upper bound on the true
orbit distance (exact whenever one start lands in the right basin, the usual case for distinct
clouds); it is labelled as such in :attr:`exact`. Screening then uses the rotation- and
permutation-invariant lower bound :math:`\sum_i (\lVert y_{(i)} \rVert - \lVert z_{(i)} \rVert)^2` over
sorted centred norms.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from gapcallback.search import KNNResult
from gapcallback.symmetry.base import Symmetry
from gapcallback.symmetry.orbit_search import bounded_search
from gapcallback.symmetry.rigid_motions import RigidMotions
from gapcallback.utils.precision import full_precision

__all__ = ["Permutations"]

_SCREEN_BUDGET = 1 << 22  # float64 cost-matrix entries per screening block (32 MiB)


class Permutations(Symmetry):
    r"""Reordering of the elements of sets ``[N, n_elements, n_features]``.

    Args:
        rigid: optional :class:`RigidMotions` composed with the permutations (point clouds without
            correspondences); the distance is then a local optimum, see the module notes.
        max_iter: alternating iterations per start when ``rigid`` is given.

    Attributes:
        dimension: 0, or ``rigid.dimension`` when composed.
        order: ``None`` (it depends on the set size): read :math:`n!` with :meth:`order_on`.
        exact: ``True`` for pure permutations, ``False`` when composed (upper bound).

    Example:
        >>> import torch
        >>> from gapcallback.functional import knn
        >>> from gapcallback.symmetry import Permutations
        >>> x = torch.randn(1, 5, 2)
        >>> knn(x[:, [3, 1, 4, 0, 2]], x, symmetry=Permutations()).sq_dists
        tensor([[0.]])
    """

    def __init__(self, *, rigid: RigidMotions | None = None, max_iter: int = 30):
        if rigid is not None and not isinstance(rigid, RigidMotions):
            raise TypeError(f"`rigid` must be a RigidMotions instance or None, got {rigid!r}.")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"`max_iter` must be a positive int, got {max_iter!r}.")
        self.rigid = rigid
        self.max_iter = max_iter

    @property
    def exact(self) -> bool:
        return self.rigid is None

    @property
    def dimension(self) -> int:  # type: ignore[override]
        return 0 if self.rigid is None else self.rigid.dimension

    def order_on(self, x: Tensor) -> int | None:
        """:math:`n!` for sets of ``n`` elements shaped like ``x`` ``[N, n, F]`` (``None`` with
        ``rigid``: the group is then continuous). :attr:`order` itself is ``None``: it depends on
        the set size, and checking a shape never changes the object."""
        self.check_shape(x, "x")
        return None if self.rigid is not None else math.factorial(int(x.shape[1]))

    def check_shape(self, x: Tensor, name: str) -> None:
        if x.ndim != 3:
            raise ValueError(
                f"Permutations acts on sets of shape [N, n_elements, n_features], but `{name}` has "
                f"shape {tuple(x.shape)}. Use `x.unsqueeze(-1)` for sets of scalars."
            )
        if self.rigid is not None:
            self.rigid.check_shape(x, name)

    def orbit(self, x: Tensor) -> Tensor:
        if self.rigid is not None:
            return super().orbit(x)
        self.check_shape(x, "x")
        if x.shape[1] > 7:
            raise ValueError(
                f"the orbit of sets of {x.shape[1]} elements has {math.factorial(x.shape[1])} "
                "permutations per point; `orbit` is limited to n_elements <= 7."
            )
        perms = list(itertools.permutations(range(x.shape[1])))
        return torch.cat([x[:, list(p)] for p in perms], dim=0)

    def knn(
        self, queries: Tensor, points: Tensor, k: int, *, exclude_self: bool = False
    ) -> KNNResult:
        self.check_shape(queries, "queries")
        self.check_shape(points, "points")
        n, m = queries.shape[0], points.shape[0]
        n_el, feat = points.shape[1], points.shape[2]
        eps = torch.finfo(torch.float64).eps
        with full_precision(points.device.type):
            q_raw, x_raw = queries.double(), points.double()
            if self.rigid is not None and self.rigid.translations:
                q_c = q_raw - q_raw.mean(dim=1, keepdim=True)
                x_c = x_raw - x_raw.mean(dim=1, keepdim=True)
            elif self.rigid is not None:  # rotations about the origin: no centring allowed
                q_c, x_c = q_raw, x_raw
            else:
                centre = x_raw.mean(dim=(0, 1), keepdim=True)  # invariant under permutations
                q_c, x_c = q_raw - centre, x_raw - centre
            q_sq = q_c.square().sum(-1)  # [N, n]
            x_sq = x_c.square().sum(-1)
            q_norm, x_norm = q_sq.sum(1), x_sq.sum(1)
            factor = (4 * n_el * feat + 64) * eps
            pairs = max(1, _SCREEN_BUDGET // (n_el * n_el))
            qb = max(1, min(n, int(math.sqrt(pairs))))
            pb = max(1, min(m, pairs // qb))
            q_sorted = q_sq.sqrt().sort(dim=1).values
            x_sorted = x_sq.sqrt().sort(dim=1).values

            def screen(qs: int, qe: int, ps: int, pe: int) -> tuple[Tensor, Tensor]:
                total = q_norm[qs:qe, None] + x_norm[None, ps:pe]
                slack = factor * total
                upper = (q_c[qs:qe, None] - x_c[None, ps:pe]).square().sum(dim=(2, 3))
                if self.rigid is not None:
                    diff = q_sorted[qs:qe, None] - x_sorted[None, ps:pe]
                    lower = diff.square().sum(-1)
                else:
                    cost = (
                        q_sq[qs:qe, None, :, None]
                        + x_sq[None, ps:pe, None, :]
                        - 2.0 * torch.einsum("bif,cjf->bcij", q_c[qs:qe], x_c[ps:pe])
                    )
                    lower = torch.maximum(cost.amin(dim=3).sum(dim=2), cost.amin(dim=2).sum(dim=2))
                return lower - slack, upper + slack

            def exact(rows: Tensor, cols: Tensor) -> Tensor:
                return self._pair_distances(q_raw[rows], x_raw[cols])

            dists, idx = bounded_search(
                n, m, k, exclude_self, points.device, screen, exact,
                query_block=qb, point_block=pb, first_batch=k + 1,
            )  # fmt: skip
        return KNNResult(dists, idx)

    def _pair_distances(self, y: Tensor, z: Tensor) -> Tensor:
        """Orbit distances of paired sets ``[T, n, f]`` (float64), one assignment per pair."""
        out = torch.empty(y.shape[0], dtype=torch.float64)
        y_np = y.detach().cpu().double().numpy()
        z_np = z.detach().cpu().double().numpy()
        for t in range(y.shape[0]):
            out[t] = _assignment_cost(y_np[t], z_np[t])
            if self.rigid is not None:
                out[t] = min(float(out[t]), self._rigid_assignment(y_np[t], z_np[t]))
        return out.to(y.device)

    def _rigid_assignment(self, y: np.ndarray, z: np.ndarray) -> float:
        """Alternating Kabsch / Hungarian from several starts; a local optimum (upper bound)."""
        rigid = self.rigid
        assert rigid is not None
        if rigid.translations:
            y = y - y.mean(axis=0)
            z = z - z.mean(axis=0)
        best = math.inf
        for rot in _starts(y, z, rigid.allow_reflections):
            value = math.inf
            for _ in range(self.max_iter):
                moved = z @ rot.T
                cost = ((y[:, None, :] - moved[None, :, :]) ** 2).sum(-1)
                r, c = linear_sum_assignment(cost)
                new_value = float(cost[r, c].sum())
                if new_value >= value * (1 - 1e-12):
                    value = min(value, new_value)
                    break
                value = new_value
                rot = _kabsch_np(y, z[c], rigid.allow_reflections)
            best = min(best, value)
        return best

    def __repr__(self) -> str:
        return "Permutations()" if self.rigid is None else f"Permutations(rigid={self.rigid!r})"


def _assignment_cost(y: np.ndarray, z: np.ndarray) -> float:
    cost = ((y[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    r, c = linear_sum_assignment(cost)
    return float(cost[r, c].sum())


def _kabsch_np(y: np.ndarray, z: np.ndarray, allow_reflections: bool) -> np.ndarray:
    """Single-pair :func:`~gapcallback.symmetry.rigid_motions.kabsch` in numpy (no torch overhead)."""
    u, _, vh = np.linalg.svd(y.T @ z)
    if not allow_reflections and np.linalg.det(u @ vh) < 0:
        u[:, -1] *= -1
    return u @ vh


def _starts(y: np.ndarray, z: np.ndarray, allow_reflections: bool) -> list[np.ndarray]:
    """Initial rotations: identity and the principal-axes alignments of ``z`` onto ``y``."""
    d = y.shape[1]
    starts = [np.eye(d)]
    _, _, vy = np.linalg.svd(y, full_matrices=False)
    _, _, vz = np.linalg.svd(z, full_matrices=False)
    if vy.shape[0] < d or vz.shape[0] < d:
        return starts
    for signs in itertools.product((1.0, -1.0), repeat=d):
        rot = vy.T @ np.diag(signs) @ vz  # maps z's principal axes onto y's
        if allow_reflections or np.linalg.det(rot) > 0:
            starts.append(rot)
    return starts
