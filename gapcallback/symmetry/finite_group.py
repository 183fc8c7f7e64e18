r"""Finite groups of isometries given as a list of transforms (flips, 90-degree rotations, ...).

.. math:: d_G(y, z)^2 = \min_{g \in G} \lVert y - g\,z \rVert^2, \qquad G = \{g_1, \dots, g_{|G|}\}

Search: because :math:`G` is a group of isometries,
:math:`\min_g \lVert y - g z\rVert = \min_g \lVert g y - z\rVert`, so the queries' orbit
:math:`[g_1 Q; \dots; g_{|G|} Q]` is stacked and searched against the untouched points in *one*
exact blocked-GEMM search (:func:`gapcallback.symmetry.orbit_search.stacked_orbit_knn`), then the minimum
over :math:`g` is taken per point index and the k smallest distinct indices kept. The points'
centring, norms and exact re-check are shared by all elements, so the cost is at most about
:math:`|G|` plain searches (the GEMM work of the stacked search is exactly :math:`|G|` times the plain
one); memory: one chunk of the stacked query orbit (32 MiB), never :math:`N \times M \times |G|`.
When every transform permutes the entries of a point (:meth:`FiniteGroup.coordinate_permutations`)
and the group has central involutions (the flip, the rotation by 180 degrees), each GEMM of length
:math:`D` screens :math:`2^r` group elements at once (:mod:`gapcallback.symmetry.central_split`):
measured 0.62-0.82 :math:`|G|` plain searches for flips, rotations and the dihedral group
(``benchmarks/symmetry/results.md``).

Group check: closure under composition is verified once per point shape on a random probe point
(:math:`g(h(p))` must be some :math:`f(p)`). A set of transforms that is *not* a group falls back to one
exact search of the queries against each transformed copy :math:`g \cdot` ``points`` (the minimum
over the given maps, which is what the set defines), merged by index: about :math:`|G|` plain
searches plus the per-element overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from gapcallback.search import KNNResult, exact_search, merge_distinct
from gapcallback.symmetry.base import Symmetry, point_dims
from gapcallback.symmetry.orbit_search import stacked_orbit_knn

__all__ = ["FiniteGroup"]

Transform = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


class FiniteGroup(Symmetry):
    r"""A finite group of isometries :math:`G = \{g_1, \dots, g_{|G|}\}` acting on ``[N, *shape]``.

    Args:
        transforms: callables mapping a batch ``[B, *shape]`` to ``[B, *shape]``, each an orthogonal
            linear map of the point (entry permutations, sign flips, rotations by 90 degrees...).
            The identity is always part of the group: it is added in front (an identity passed in the
            list is harmless: transforms acting as the identity on the data are skipped). The set
            should be closed under composition and inverses for :math:`d_G` to be an orbit distance;
            the constructors :meth:`flips`, :meth:`rotations90` and :meth:`dihedral` give full groups.
        names: optional labels of the transforms (for ``repr``).

    Attributes:
        dimension: 0 (a finite group).
        order: :math:`|G|`, the identity included.

    Example:
        >>> import torch
        >>> from gapcallback.functional import knn
        >>> from gapcallback.symmetry import FiniteGroup
        >>> x = torch.tensor([[1.0, 2.0, 3.0]])
        >>> knn(x.flip(-1), x, symmetry=FiniteGroup.flips(dims=(-1,))).sq_dists
        tensor([[0.]])
    """

    def __init__(self, transforms: Sequence[Transform], *, names: Sequence[str] | None = None):
        if isinstance(transforms, (str, bytes)) or not isinstance(transforms, Sequence):
            raise TypeError(
                "`transforms` must be a list of callables mapping [B, *shape] -> [B, *shape], got "
                f"{type(transforms).__name__}."
            )
        for i, t in enumerate(transforms):
            if not callable(t):
                raise TypeError(f"`transforms[{i}]` is not callable: {t!r}.")
        if names is not None and len(names) != len(transforms):
            raise ValueError(
                f"`names` has {len(names)} entries but there are {len(transforms)} transforms."
            )
        self.transforms: list[Transform] = [_identity, *transforms]
        self.names: list[str] = [
            "identity",
            *(names or [f"g{i + 1}" for i in range(len(transforms))]),
        ]
        self._closed: dict[tuple, bool] = {}  # is_group result per (shape, dtype, device)
        self._perms: dict[tuple, Tensor | None] = {}  # coordinate permutations per shape

    @property
    def order(self) -> int:  # type: ignore[override]
        return len(self.transforms)

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def flips(cls, dims: Sequence[int] = (-1,)) -> FiniteGroup:
        """All combinations of reversals along ``dims`` (``2^len(dims)`` elements).

        ``dims`` index the per-point shape from the end (``-1``: last axis).
        """
        dims = point_dims(dims, "dims")
        transforms: list[Transform] = []
        names: list[str] = []
        for mask in range(1, 2 ** len(dims)):
            chosen = tuple(d for b, d in enumerate(dims) if mask >> b & 1)
            transforms.append(lambda x, c=chosen: x.flip(c))
            names.append(f"flip{chosen}")
        return cls(transforms, names=names)

    @classmethod
    def rotations90(cls, dims: Sequence[int] = (-2, -1)) -> FiniteGroup:
        """Rotations by 0, 90, 180, 270 degrees in the plane ``dims`` (square images), order 4."""
        dims = point_dims(dims, "dims")
        if len(dims) != 2:
            raise ValueError(f"`dims` must name two axes (the image plane), got {dims}.")
        transforms: list[Transform] = [lambda x, r=r: torch.rot90(x, r, dims) for r in (1, 2, 3)]
        return cls(transforms, names=[f"rot{90 * r}" for r in (1, 2, 3)])

    @classmethod
    def dihedral(cls, dims: Sequence[int] = (-2, -1)) -> FiniteGroup:
        """The dihedral group of the square in the plane ``dims``: 4 rotations x reflection, order 8."""
        dims = point_dims(dims, "dims")
        if len(dims) != 2:
            raise ValueError(f"`dims` must name two axes (the image plane), got {dims}.")
        transforms: list[Transform] = []
        names: list[str] = []
        for flip in (False, True):
            for r in range(4):
                if not flip and r == 0:
                    continue
                transforms.append(
                    lambda x, r=r, f=flip: torch.rot90(x.flip(dims[1]) if f else x, r, dims)
                )
                names.append(f"{'flip-' if flip else ''}rot{90 * r}")
        return cls(transforms, names=names)

    # --------------------------------------------------------------------------------- action
    def apply(self, x: Tensor, index: int) -> Tensor:
        """``g_index x`` for a batch ``[N, *shape]``, checked to keep shape and norms."""
        y = self.transforms[index](x)
        if not isinstance(y, Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"transform {self.names[index]!r} maps points of shape {tuple(x.shape[1:])} to "
                f"{got[1:] if isinstance(got, tuple) else got}; every transform of a FiniteGroup must "
                "keep the shape [N, *shape] (e.g. rot90 needs square images)."
            )
        if index:
            xn = x.reshape(x.shape[0], -1).double().norm(dim=1)
            yn = y.reshape(y.shape[0], -1).double().norm(dim=1)
            tol = 1e-4 * xn.clamp_min(1e-30) + 1e-30
            if not bool(((xn - yn).abs() <= tol).all()):
                raise ValueError(
                    f"transform {self.names[index]!r} changes the norm of the points, so it is not an "
                    "isometry; FiniteGroup needs orthogonal maps (flips, rotations, permutations of "
                    "entries)."
                )
        return y

    def check_shape(self, x: Tensor, name: str) -> None:
        for i in range(1, self.order):
            try:
                self.apply(x[:1], i)
            except ValueError as err:
                raise ValueError(f"`{name}`: {err}") from None
            except (RuntimeError, IndexError) as err:
                raise ValueError(
                    f"`{name}` of shape {tuple(x.shape)} cannot be transformed by "
                    f"{self.names[i]!r} ({err}); pass points of the shape the group acts on."
                ) from None

    def orbit(self, x: Tensor) -> Tensor:
        """``[|G| * N, *shape]``: row ``g * N + i`` holds ``g_g x_i`` (identity first)."""
        self.check_shape(x, "x")
        return torch.cat([self.apply(x, g) for g in range(self.order)], dim=0)

    def is_group(self, x: Tensor) -> bool:
        """Whether the transforms are closed under composition on points shaped like ``x``.

        Checked on one random probe point ``p`` (``[1, *shape]``, ``x``'s dtype and device): every
        :math:`g(h(p))` must equal some :math:`f(p)` up to rounding. A finite set of invertible maps
        closed under composition is a group (inverses are powers). For linear maps a generic probe
        decides this with probability one. The answer is cached per point shape.
        """
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._closed:
            self.check_shape(x, "x")
            gen = torch.Generator(device="cpu").manual_seed(0)
            probe = torch.randn(1, *x.shape[1:], generator=gen, dtype=torch.float64)
            probe = probe.to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
            imgs = [self.apply(probe, g) for g in range(self.order)]
            flat = torch.cat([im.reshape(1, -1) for im in imgs]).double()
            tol = 1e-3 * float(flat[0].norm())
            closed = True
            for h in range(1, self.order):
                for g in range(1, self.order):
                    c = self.apply(imgs[h], g).reshape(1, -1).double()
                    if float((flat - c).abs().amax(dim=1).min()) > tol:
                        closed = False
                        break
                if not closed:
                    break
            self._closed[key] = closed
        return self._closed[key]

    def coordinate_permutations(self, x: Tensor) -> Tensor | None:
        """``[|G|, D]`` long permutations ``p_g`` with ``g(z).flatten() == z.flatten()[p_g]`` for
        points shaped like ``x``, or ``None`` when some transform is not a permutation of entries.

        Read off by transforming the code point ``arange(D)`` and confirmed on a random probe point
        in ``x``'s dtype (a map that is not a fixed permutation of entries fails it). Flips, 90-degree
        rotations, transposes and shifts are permutations; the answer is cached per point shape.
        """
        key = (tuple(x.shape[1:]), x.dtype, x.device)
        if key not in self._perms:
            self._perms[key] = self._find_permutations(x)
        return self._perms[key]

    def _find_permutations(self, x: Tensor) -> Tensor | None:
        dim = x[0].numel()
        code_dtype = torch.float32 if x.device.type == "mps" else torch.float64
        if dim >= 2**24 or not x.is_floating_point():
            return None
        code = torch.arange(dim, dtype=code_dtype, device=x.device).reshape(1, *x.shape[1:])
        gen = torch.Generator(device="cpu").manual_seed(1)
        probe = torch.randn(1, *x.shape[1:], generator=gen).to(device=x.device, dtype=x.dtype)
        ident = torch.arange(dim, device=x.device)
        perms = []
        for g in range(self.order):
            try:
                moved = self.transforms[g](code).reshape(-1)
                p = moved.round().long()
                if not torch.equal(moved, p.to(code_dtype)) or not torch.equal(p.sort()[0], ident):
                    return None
                if not torch.equal(self.transforms[g](probe).reshape(-1), probe.reshape(-1)[p]):
                    return None
            except (RuntimeError, TypeError, ValueError):
                return None
            perms.append(p)
        return torch.stack(perms)

    def knn(
        self, queries: Tensor, points: Tensor, k: int, *, exclude_self: bool = False
    ) -> KNNResult:
        self.check_shape(points, "points")
        if self.is_group(points):
            return stacked_orbit_knn(
                queries, points, k, exclude_self, self._query_orbit, self.order,
                permutations=self.coordinate_permutations(points),
            )  # fmt: skip
        return knn_over_images(
            queries, (self.apply(points, g) for g in range(self.order)), k, exclude_self
        )

    def _query_orbit(self, chunk: Tensor) -> Tensor:
        """``[G', B, *shape]``: ``chunk`` and its images, skipping maps acting as the identity."""
        out = [chunk]
        for g in range(1, self.order):
            moved = self.transforms[g](chunk)  # shape and isometry checked by check_shape
            if moved.shape != chunk.shape:
                moved = self.apply(chunk, g)  # raises the shape error
            if not torch.equal(moved, chunk):
                out.append(moved)
        return torch.stack(out)

    def __repr__(self) -> str:
        return f"FiniteGroup(order={self.order}, elements={self.names})"


def knn_over_images(
    queries: Tensor, images: Iterable[Tensor], k: int, exclude_self: bool
) -> KNNResult:
    """Top-k over point indices of ``min_g ||q - (g points)_j||^2``, one exact kNN per image.

    ``images`` yields the transformed point sets ``g . points`` (row ``j`` the image of point
    ``j``); later images equal to the first (the identity's) are skipped. Returns exact float64
    squared distances (float32 on MPS).
    """
    n = queries.shape[0]
    best_d: Tensor | None = None
    best_i: Tensor | None = None
    first: Tensor | None = None
    for moved in images:
        if first is not None and torch.equal(moved[:1], first[:1]) and torch.equal(moved, first):
            continue  # acts on the data as the identity: nothing new to search
        if best_d is None:
            first = moved
            best_d = torch.full((n, k), float("inf"), dtype=torch.float64, device=moved.device)
            best_i = torch.full((n, k), -1, dtype=torch.long, device=moved.device)
        res = exact_search(
            queries.reshape(n, -1), moved.reshape(moved.shape[0], -1), k, exclude_self=exclude_self
        )
        rows = torch.arange(n, device=moved.device).repeat_interleave(k)
        best_d, best_i = merge_distinct(
            best_d, best_i, rows, res.sq_dists.reshape(-1), res.indices.reshape(-1)
        )
    assert best_d is not None and best_i is not None
    return KNNResult(best_d, best_i)
