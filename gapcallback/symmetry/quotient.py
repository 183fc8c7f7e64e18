r"""Quotient dimension and effective sample size: the gap law on :math:`\Omega / G`.

An equivariant model trained to optimality produces the orbit :math:`G(D)` of its training set, so
its gap is governed by the quotient space :math:`\Omega / G`:

* **continuous group acting freely** (rigid motions of generic point clouds): the orbits are
  :math:`\dim G`-dimensional, the quotient has dimension :math:`d - \dim G`, and
  :math:`R^G_n \sim J_G\, n^{-p/(d - \dim G)}`: the law's exponent improves;
* **finite group** (flips, 90-degree rotations, cyclic shifts of a discrete signal, permutations):
  :math:`\dim G = 0`, the dimension is unchanged, and each training point stands for :math:`|G|`
  points of the orbit, so :math:`R^G_n \approx R_{|G| n}`: only the constant shrinks, by
  :math:`|G|^{-p/d}` (asymptotically, when :math:`G` acts freely on the data).

How the rest of gapcallback uses it: ``representation_gap``, ``RepresentationGap``, the intrinsic
dimension estimators and ``GapLaw.fit`` take ``symmetry=`` and pass it down to
:func:`gapcallback.functional.nearest_neighbours.knn`, so every distance is an orbit distance and the estimated
dimension *is* the quotient dimension (no correction needed). The two helpers below convert
between the ambient and the quotient view: :func:`quotient_dimension` (uses the group's
``dimension`` attribute) and :func:`effective_sample_size` (uses its ``order`` attribute).
"""

from __future__ import annotations

from torch import Tensor

from gapcallback.symmetry.base import Symmetry

__all__ = ["effective_sample_size", "quotient_dimension"]


def quotient_dimension(d: float | Tensor, symmetry: Symmetry | None) -> float | Tensor:
    r"""Dimension :math:`d - \dim G` of :math:`\Omega / G` for data of intrinsic dimension ``d``.

    Args:
        d: intrinsic dimension of the data manifold :math:`\Omega` (float or 0-dim tensor).
        symmetry: the group (``None``: no symmetry, ``d`` is returned unchanged).

    Returns:
        ``d - symmetry.dimension`` (same type as ``d``); ``d`` for finite groups.

    Raises:
        ValueError: when ``d <= dim G`` (the group cannot act freely on a manifold that small).

    Example:
        >>> from gapcallback.symmetry import RigidMotions, quotient_dimension
        >>> quotient_dimension(10.0, RigidMotions())
        4.0
    """
    if symmetry is None:
        return d
    if not isinstance(symmetry, Symmetry):
        raise TypeError(f"`symmetry` must be a gapcallback.symmetry object, got {symmetry!r}.")
    dim_g = int(symmetry.dimension)
    if float(d) <= dim_g:
        raise ValueError(
            f"intrinsic dimension d={float(d):.3g} is not larger than dim G={dim_g} of {symmetry!r};"
            " a group acting freely needs d > dim G. Check that `d` was measured with plain"
            " (not orbit) distances, or that the data vary beyond the group's motions."
        )
    return d - dim_g


def effective_sample_size(
    n: int | float, symmetry: Symmetry | None, points: Tensor | None = None
) -> float:
    r"""Number of orbit points standing for ``n`` training points: :math:`|G|\,n` for finite ``G``.

    For a finite group acting freely, :math:`R^G_n \approx R_{|G| n}` asymptotically, so the plain
    law evaluated at ``effective_sample_size(n, G)`` predicts the gap of an equivariant model.
    Continuous groups change the dimension instead (see :func:`quotient_dimension`); they return
    ``n``.

    Args:
        n: number of training points.
        symmetry: the group, or ``None``.
        points: ``[N, *shape]`` points (one is enough) for groups whose order depends on the point
            shape (``CyclicShifts``, ``Permutations``: :meth:`~Symmetry.order_on`).

    Raises:
        ValueError: a finite group whose order depends on the point shape, without ``points``.
    """
    if symmetry is None or symmetry.dimension > 0:
        return float(n)
    order = symmetry.order if points is None else symmetry.order_on(points)
    if order is None:
        raise ValueError(
            f"the order of {symmetry!r} depends on the point shape; pass `points=` (the points, or"
            " one of them as a [1, *shape] tensor)."
        )
    return float(n) * order
