r"""Base class of symmetry groups accepted as ``symmetry=`` across gapcallback.

A :class:`Symmetry` is a group :math:`G` of isometries acting on points. Every distance that
gapcallback computes with ``symmetry=G`` is the *orbit distance*

.. math:: d_G(y, z)^2 = \min_{g \in G} \lVert y - g\,z \rVert^2 ,

which is symmetric because each :math:`g` is an isometry. Two attributes describe the group for the
gap law (see :mod:`gapcallback.symmetry.quotient`):

* ``dimension`` (``int``): :math:`\dim G`, 0 for a finite group; the law on the quotient
  :math:`\Omega/G` has dimension :math:`d - \dim G` when :math:`G` acts freely;
* ``order`` (``int | None``): :math:`|G|` for a finite group, ``None`` for a continuous one; for a
  finite group the dimension is unchanged and :math:`R^G_n \approx R_{|G| n}`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from gapcallback.search import KNNResult

__all__ = ["Symmetry", "point_dims"]


class Symmetry(ABC):
    r"""A group :math:`G` acting on points; distances become orbit distances.

    Subclasses implement :meth:`knn` with the orbit distance
    :math:`d_G(x, y)^2 = \min_{g \in G} \lVert x - g\,y \rVert^2`, and set :attr:`dimension`
    (:math:`\dim G`) and :attr:`order` (:math:`|G|`, ``None`` when infinite).
    """

    #: Dimension of the group as a manifold (0 for a finite group).
    dimension: int = 0
    #: Number of group elements for a finite group; ``None`` for a continuous group.
    order: int | None = None

    @abstractmethod
    def knn(
        self, queries: Tensor, points: Tensor, k: int, *, exclude_self: bool = False
    ) -> KNNResult:
        """Exact k nearest neighbours in orbit distance; inputs are already validated.

        Returns exact squared orbit distances ``[N, k]`` (ascending; float64, or float32 on MPS)
        and indices ``[N, k]`` into ``points``; :func:`gapcallback.functional.knn` casts them to
        the output dtype (:func:`gapcallback.functional.nearest_neighbours.output_sq_dists`). With
        ``exclude_self`` the whole orbit of point ``i`` is excluded for query ``i``. Squared
        distances that float64 cannot hold raise
        :class:`gapcallback.functional.nearest_neighbours.DistanceRangeError`.
        """

    def check_shape(self, x: Tensor, name: str) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` when ``x`` (``[N, *shape]``) is not a shape this group acts on."""

    def order_on(self, x: Tensor) -> int | None:
        """:attr:`order` for points shaped like ``x`` (``[N, *shape]``), after checking the shape.

        Some finite groups only know their order from the point shape (``CyclicShifts``: the
        number of shifts; ``Permutations``: ``n!``), so read it through this method.
        """
        self.check_shape(x, "x")
        return self.order

    def orbit(self, x: Tensor) -> Tensor:
        """All images ``g x``: ``[|G| * N, *shape]`` with row ``g * N + i`` holding ``g x_i``.

        Only finite groups have a finite orbit; continuous groups raise ``NotImplementedError``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} is a continuous group (dimension {self.dimension}); its orbits"
            " are manifolds, not finite sets. `orbit` exists for finite groups only."
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def point_dims(dims: Sequence[int], name: str) -> tuple[int, ...]:
    """Validate per-point axes and return them as negative indices (counted from the end)."""
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, Sequence) or not dims:
        raise TypeError(f"`{name}` must be a non-empty tuple of ints, got {dims!r}.")
    out = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"`{name}` must hold ints, got {d!r}.")
        if d >= 0:
            raise ValueError(
                f"`{name}` indexes the per-point shape from the end and must be negative (-1 is the "
                f"last axis), got {d}; e.g. (-2, -1) for the height and width of [N, C, H, W] images."
            )
        out.append(d)
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}` has repeated axes: {tuple(dims)}.")
    return tuple(out)
