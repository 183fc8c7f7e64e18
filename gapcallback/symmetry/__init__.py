"""Symmetry groups: orbit distances for equivariant models (issue 5).

Pass any of these as ``symmetry=`` to ``knn``, ``representation_gap``, ``RepresentationGap``,
``GapLaw``, the intrinsic-dimension estimators and ``GapCallback``; every distance becomes the orbit
distance :math:`\\min_{g \\in G} \\lVert y - g z \\rVert^2`.

=====================  ==========================================================  =========
class                  group                                                       dim / |G|
=====================  ==========================================================  =========
``FiniteGroup``        a list of isometries (flips, 90-degree rotations, dihedral)  0 / |G|
``CyclicShifts``       all circular shifts along some axes (GEMM or FFT screen)     0 / prod S
``RigidMotions``       rotations (+ translations) of point clouds (Kabsch)          6 in 3-D
``Permutations``       reorderings of set elements (Hungarian); ``rigid=`` option   0 / n!
=====================  ==========================================================  =========
"""

from gapcallback.symmetry.base import Symmetry
from gapcallback.symmetry.cyclic_shifts import CyclicShifts
from gapcallback.symmetry.finite_group import FiniteGroup
from gapcallback.symmetry.ideal_score import ideal_denoiser, sample_ideal_diffusion
from gapcallback.symmetry.permutations import Permutations
from gapcallback.symmetry.quotient import effective_sample_size, quotient_dimension
from gapcallback.symmetry.rigid_motions import RigidMotions, kabsch

__all__ = [
    "CyclicShifts",
    "FiniteGroup",
    "Permutations",
    "RigidMotions",
    "Symmetry",
    "effective_sample_size",
    "ideal_denoiser",
    "kabsch",
    "quotient_dimension",
    "sample_ideal_diffusion",
]
