"""gapcallback: watch why a model generalizes, geometrically, while it trains.

Public API (see the README)::

    import gapcallback as gc
    from gapcallback import functional as F

    F.knn, F.representation_gap, F.memorization, F.intrinsic_dimension   # functional/
    gc.RepresentationGap, gc.IntrinsicDimension, gc.PredictionGap        # metrics/
    gc.PrecisionRecall, gc.DensityCoverage, gc.Authenticity              # metrics/
    gc.GapLaw                                                            # law.py
    gc.GapCallback, gc.PredictionGapCallback, gc.GapEarlyStopping        # callbacks/
    gc.GradientSNR, gc.GeneralizationDiagnostics                         # callbacks/
    gc.evaluate, gc.prepare_reference, gc.load_reference, gc.save_reference  # evaluation/
    python -m gapcallback evaluate|plan|checkpoints|reference            # cli/
    gapcallback.symmetry: FiniteGroup, CyclicShifts, RigidMotions, Permutations
    gapcallback.optim: PopulationRiskAdamW
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gapcallback import functional, optim, symmetry
from gapcallback.evaluation.offline import evaluate
from gapcallback.evaluation.prepared import (
    GapEvaluationWarning,
    PreparedReference,
    prepare_reference,
)
from gapcallback.evaluation.reference_file import load_reference, save_reference
from gapcallback.law import GapLaw
from gapcallback.metrics import (
    Authenticity,
    DensityCoverage,
    IntrinsicDimension,
    PrecisionRecall,
    PredictionGap,
    RepresentationGap,
)

if TYPE_CHECKING:
    from gapcallback.callbacks import (
        GapCallback,
        GapEarlyStopping,
        GeneralizationDiagnostics,
        GradientSNR,
        PredictionGapCallback,
    )

__version__ = "0.1.0"

#: Imported on first use: the callbacks import Lightning (seconds), which the command line and
#: the functional API do not need.
_LAZY = {
    "GapCallback": "gapcallback.callbacks",
    "GapEarlyStopping": "gapcallback.callbacks",
    "GeneralizationDiagnostics": "gapcallback.callbacks",
    "GradientSNR": "gapcallback.callbacks",
    "PredictionGapCallback": "gapcallback.callbacks",
    "callbacks": "gapcallback.callbacks",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = module if name == "callbacks" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gapcallback' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Authenticity",
    "DensityCoverage",
    "GapCallback",
    "GapEarlyStopping",
    "GapEvaluationWarning",
    "GapLaw",
    "GeneralizationDiagnostics",
    "GradientSNR",
    "IntrinsicDimension",
    "PrecisionRecall",
    "PredictionGap",
    "PredictionGapCallback",
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
