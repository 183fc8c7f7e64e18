"""gapcallback: watch why a model generalizes, geometrically, while it trains.

Public API (see ``../DESIGN.md``)::

    import gapcallback as gc
    from gapcallback import functional as F

    F.knn, F.representation_gap, F.memorization      # functional/
    gc.RepresentationGap                              # metrics/
"""

from gapcallback import functional
from gapcallback.metrics import RepresentationGap

__version__ = "0.1.0"

__all__ = ["RepresentationGap", "__version__", "functional"]
