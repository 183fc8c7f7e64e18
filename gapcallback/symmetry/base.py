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
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from gapcallback.functional.nearest_neighbours import KNNResult

__all__ = ["Symmetry"]


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
