"""gapcallback: watch why a model generalizes, geometrically, while it trains.

Public API (see the README)::

    import gapcallback as gc
    from gapcallback import functional as F

    F.knn, F.representation_gap, F.memorization, F.intrinsic_dimension   # functional/
    gc.RepresentationGap, gc.IntrinsicDimension                          # metrics/
    gc.GapLaw                                                            # law.py
    gc.GapCallback, gc.GapEarlyStopping, gc.GradientSNR                  # callbacks/
    gc.evaluate, gc.prepare_reference, gc.load_reference, gc.save_reference  # evaluation/
    python -m gapcallback evaluate|plan|checkpoints|reference            # cli/
    gapcallback.symmetry: FiniteGroup, CyclicShifts, RigidMotions, Permutations
    gapcallback.optim: PopulationRiskAdamW
"""

from gapcallback import functional, optim, symmetry
from gapcallback.callbacks import GapCallback, GapEarlyStopping, GapEvaluationWarning, GradientSNR
from gapcallback.evaluation.evaluate import evaluate
from gapcallback.evaluation.prepared import PreparedReference, prepare_reference
from gapcallback.evaluation.reference_file import load_reference, save_reference
from gapcallback.law import GapLaw
from gapcallback.metrics import IntrinsicDimension, RepresentationGap

__version__ = "0.1.0"

__all__ = [
    "GapCallback",
    "GapEarlyStopping",
    "GapEvaluationWarning",
    "GapLaw",
    "GradientSNR",
    "IntrinsicDimension",
    "PreparedReference",
    "RepresentationGap",
    "__version__",
    "evaluate",
    "functional",
    "load_reference",
    "optim",
    "prepare_reference",
    "save_reference",
    "symmetry",
]
