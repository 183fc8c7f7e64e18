"""Base class of symmetry groups accepted as ``symmetry=`` across gapcallback."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from gapcallback.functional.knn import KNNResult

__all__ = ["Symmetry"]


class Symmetry(ABC):
    r"""A group :math:`G` acting on points; distances become orbit distances.

    Subclasses implement :meth:`knn` with the orbit distance
    :math:`d_G(x, y)^2 = \min_{g \in G} \lVert x - g\,y \rVert^2`.
    """

    @abstractmethod
    def knn(
        self, queries: Tensor, points: Tensor, k: int, *, exclude_self: bool = False
    ) -> KNNResult:
        """Exact k nearest neighbours in orbit distance; inputs are already validated."""
