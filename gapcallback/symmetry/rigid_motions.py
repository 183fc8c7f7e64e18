r"""Point clouds up to rotation and translation (Kabsch alignment).

For clouds :math:`Y, Z \in \mathbb R^{n \times d}` (rows are points, in corresponding order), with
centred copies :math:`Y_c, Z_c` and :math:`M = Y_c^\top Z_c = U \Sigma V^\top`,

.. math::

    d_G(Y, Z)^2 = \min_{R \in SO(d),\, t} \lVert Y - Z R^\top - \mathbf 1 t^\top \rVert^2
                = \lVert Y_c \rVert^2 + \lVert Z_c \rVert^2
                  - 2 \big(\sigma_1 + \dots + \sigma_{d-1} + \operatorname{sign}(\det M)\, \sigma_d\big),

attained at :math:`R = U \operatorname{diag}(1, \dots, 1, \operatorname{sign}\det M) V^\top`
(Kabsch 1976 with the reflection fix; with ``allow_reflections`` the group is :math:`O(d)` and all
signs are +). The group is continuous: ``dimension`` :math:`= d(d-1)/2 + d` (6 in 3-D; 3 without
translations).

Search: all pairs are screened with the singular-value formula (batched float64 SVD of the
:math:`d \times d` matrices, blocked so memory is bounded); pairs within the formula's rounding error
of the running k-th distance are re-checked by applying the optimal motion and taking the direct
difference (also against the identity, so duplicates give exactly 0). Cost: one small SVD per pair.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gapcallback.search import KNNResult
from gapcallback.symmetry.base import Symmetry
from gapcallback.symmetry.orbit_search import bounded_search
from gapcallback.utils.precision import full_precision

__all__ = ["RigidMotions", "kabsch"]

_PAIR_BUDGET = 1 << 18  # pairs per screening block


class RigidMotions(Symmetry):
    r"""Rotations (and translations) of point clouds ``[N, n_points, dim]``.

    Args:
        dim: dimension of the ambient space of the cloud (3 for 3-D point clouds).
        allow_reflections: use :math:`O(d)` (rotations and reflections) instead of :math:`SO(d)`.
        translations: also quotient translations (centre each cloud); default ``True``.

    Attributes:
        dimension: :math:`d(d-1)/2` (+ :math:`d` with translations): 6 for rigid motions in 3-D.
        order: ``None`` (continuous group).

    Example:
        >>> import torch
        >>> from gapcallback.functional import knn
        >>> from gapcallback.symmetry import RigidMotions
        >>> x = torch.randn(1, 10, 3, dtype=torch.float64)
        >>> rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
        >>> bool(knn(x @ rot.T + 5.0, x, symmetry=RigidMotions()).sq_dists < 1e-20)
        True
    """

    def __init__(self, dim: int = 3, *, allow_reflections: bool = False, translations: bool = True):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"`dim` must be a positive int (3 for 3-D clouds), got {dim!r}.")
        self.dim = dim
        self.allow_reflections = bool(allow_reflections)
        self.translations = bool(translations)

    @property
    def dimension(self) -> int:  # type: ignore[override]
        return self.dim * (self.dim - 1) // 2 + (self.dim if self.translations else 0)

    def check_shape(self, x: Tensor, name: str) -> None:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"RigidMotions(dim={self.dim}) acts on point clouds of shape [N, n_points, {self.dim}],"
                f" but `{name}` has shape {tuple(x.shape)}. Reshape each cloud to "
                f"[n_points, {self.dim}] (e.g. `x.reshape(N, -1, {self.dim})`)."
            )

    def _centre(self, x: Tensor) -> Tensor:
        return x - x.mean(dim=1, keepdim=True) if self.translations else x

    def align(self, y: Tensor, z: Tensor) -> Tensor:
        """``z`` moved onto ``y`` pair by pair (``[T, n, d]`` each): the optimal ``R z + t``."""
        y64, z64 = y.double(), z.double()
        rot = kabsch(self._centre(y64), self._centre(z64), self.allow_reflections)
        moved = self._centre(z64) @ rot.transpose(1, 2)
        if self.translations:
            moved = moved + y64.mean(dim=1, keepdim=True)
        return moved.to(torch.promote_types(y.dtype, z.dtype))

    def knn(
        self, queries: Tensor, points: Tensor, k: int, *, exclude_self: bool = False
    ) -> KNNResult:
        self.check_shape(queries, "queries")
        self.check_shape(points, "points")
        n, m = queries.shape[0], points.shape[0]
        n_pts, dim = points.shape[1], points.shape[2]
        with full_precision(points.device.type):
            q_raw, x_raw = queries.double(), points.double()
            q_c, x_c = self._centre(q_raw), self._centre(x_raw)
            q_norm = q_c.square().sum(dim=(1, 2))
            x_norm = x_c.square().sum(dim=(1, 2))
            eps = torch.finfo(torch.float64).eps
            factor = (4 * n_pts * dim + 64) * eps
            qb = max(1, min(n, int(math.sqrt(_PAIR_BUDGET))))
            pb = max(1, min(m, _PAIR_BUDGET // qb))

            def screen(qs: int, qe: int, ps: int, pe: int) -> tuple[Tensor, Tensor]:
                mat = torch.einsum("bni,cnj->bcij", q_c[qs:qe], x_c[ps:pe])
                trace = _max_trace(mat.reshape(-1, dim, dim), self.allow_reflections)
                total = q_norm[qs:qe, None] + x_norm[None, ps:pe]
                approx = total - 2.0 * trace.reshape(qe - qs, pe - ps)
                slack = factor * total
                return approx - slack, approx + slack

            def exact(rows: Tensor, cols: Tensor) -> Tensor:
                y, z = q_c[rows], x_c[cols]
                rot = kabsch(y, z, self.allow_reflections)
                moved = (y - z @ rot.transpose(1, 2)).square().sum(dim=(1, 2))
                centred = (y - z).square().sum(dim=(1, 2))
                raw = (q_raw[rows] - x_raw[cols]).square().sum(dim=(1, 2))
                return torch.minimum(torch.minimum(moved, centred), raw)

            dists, idx = bounded_search(
                n, m, k, exclude_self, points.device, screen, exact,
                query_block=qb, point_block=pb,
            )  # fmt: skip
        return KNNResult(dists, idx)

    def __repr__(self) -> str:
        return (
            f"RigidMotions(dim={self.dim}, allow_reflections={self.allow_reflections}, "
            f"translations={self.translations})"
        )


def _max_trace(mat: Tensor, allow_reflections: bool) -> Tensor:
    r""":math:`\max_R \operatorname{tr}(R^\top M)` over :math:`SO(d)` (or :math:`O(d)`), batched."""
    sv = torch.linalg.svdvals(mat)
    if allow_reflections:
        return sv.sum(dim=-1)
    sign = torch.where(torch.linalg.det(mat) < 0, -1.0, 1.0).to(sv.dtype)
    return sv[..., :-1].sum(dim=-1) + sign * sv[..., -1]


def kabsch(y: Tensor, z: Tensor, allow_reflections: bool = False) -> Tensor:
    r"""Optimal rotations :math:`R` minimising :math:`\lVert y - z R^\top \rVert` pair by pair.

    Args:
        y: ``[T, n, d]`` target clouds (already centred if translations are quotiented).
        z: ``[T, n, d]`` clouds to rotate.
        allow_reflections: optimise over :math:`O(d)` instead of :math:`SO(d)`.

    Returns:
        ``[T, d, d]`` orthogonal matrices (determinant +1 unless ``allow_reflections``).
    """
    mat = torch.einsum("tni,tnj->tij", y, z)
    u, _, vh = torch.linalg.svd(mat)
    if not allow_reflections:
        sign = torch.where(torch.linalg.det(u @ vh) < 0, -1.0, 1.0).to(u.dtype)
        u = torch.cat([u[..., :-1], u[..., -1:] * sign[:, None, None]], dim=-1)
    return u @ vh
