"""Symmetry groups: orbit distances for equivariant models."""

from gapcallback.symmetry.base import Symmetry

__all__ = ["Symmetry"]
