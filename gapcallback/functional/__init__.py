"""Pure tensor functions (no state), torchmetrics style.

==========================  ===============================================================
``knn``                     exact k nearest neighbours (``functional/knn.py``)
``representation_gap``      mean distance from references to nearest samples
``memorization``            fraction of samples copying a training point (Gu et al. 2023)
==========================  ===============================================================
"""

from gapcallback.functional.knn import KNNResult, knn
from gapcallback.functional.memorization import MemorizationResult, memorization
from gapcallback.functional.representation_gap import gap_from_sq_dists, representation_gap

__all__ = [
    "KNNResult",
    "MemorizationResult",
    "gap_from_sq_dists",
    "knn",
    "memorization",
    "representation_gap",
]
